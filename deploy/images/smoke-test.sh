#!/usr/bin/env bash
# Smoke test for the images built by build.sh: real containers on a private
# docker network, official-image interface (POSTGRES_PASSWORD_FILE, POSTGRES_USER,
# POSTGRES_DB, extra postgres args, redis with a mounted read-only config),
# restart on existing data, fast stop, and startup timings.
# Removes every container, network and temp dir it creates; keeps the images.
#
# Usage: deploy/images/smoke-test.sh   (after deploy/images/build.sh)
set -euo pipefail

PREFIX="${ORKESTR_IMAGE_PREFIX:-orkestr-local}"
PG_IMAGE="$PREFIX/postgres:15"
REDIS_IMAGE="$PREFIX/redis:7"
TOOLBOX_IMAGE="$PREFIX/toolbox:bookworm"

ID="orkestr-smoke-$$-$RANDOM"
NET="$ID-net"
TB="$ID-toolbox"
PG="$ID-pg"
PG2="$ID-pg-args"
PG3="$ID-pg-nopass"
RD="$ID-redis"
RD2="$ID-redis-noconf"
TMP="$(mktemp -d "${TMPDIR:-/tmp}/orkestr-smoke.XXXXXX")"
PASS="$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')"

cleanup() {
	local rc=$?
	docker rm -f "$TB" "$PG" "$PG2" "$PG3" "$RD" "$RD2" >/dev/null 2>&1 || true
	docker network rm "$NET" >/dev/null 2>&1 || true
	rm -rf "$TMP"
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

passed=0 failed=0
ok() { passed=$((passed + 1)); printf 'ok    %s\n' "$*"; }
fail() { failed=$((failed + 1)); printf 'FAIL  %s\n' "$*"; }
check() { # check DESCRIPTION CMD...
	local d="$1"; shift
	if "$@" >/dev/null 2>&1; then ok "$d"; else fail "$d"; fi
}
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }
tb() { docker exec "$TB" "$@"; }
# wait (up to 60 s) until CMD succeeds inside the toolbox
tb_wait() { docker exec "$TB" timeout 60 bash -c 'until "$@" >/dev/null 2>&1; do sleep 0.05; done' _ "$@"; }

for image in "$PG_IMAGE" "$REDIS_IMAGE" "$TOOLBOX_IMAGE"; do
	docker image inspect "$image" >/dev/null 2>&1 || { echo "missing $image: run build.sh" >&2; exit 1; }
done

docker network create "$NET" >/dev/null
docker run -d --name "$TB" --network "$NET" "$TOOLBOX_IMAGE" sleep infinity >/dev/null
check "toolbox has psql, pgbench, redis-cli, redis-benchmark" \
	tb bash -c 'psql --version && pgbench --version && redis-cli --version && redis-benchmark --version'

# --- postgres: POSTGRES_PASSWORD_FILE (root-only file), USER, DB -------------
mkdir -p "$TMP/pgdata" "$TMP/secrets"
printf '%s\n' "$PASS" >"$TMP/secrets/pgpass"
chmod 600 "$TMP/secrets/pgpass"
URL="postgresql://app:$PASS@$PG:5432/appdb"

t0="$(now)"
docker run -d --name "$PG" --network "$NET" \
	-e POSTGRES_USER=app -e POSTGRES_DB=appdb \
	-e POSTGRES_PASSWORD_FILE=/run/secrets/pgpass \
	-v "$TMP/secrets/pgpass:/run/secrets/pgpass:ro" \
	-v "$TMP/pgdata:/var/lib/postgresql/data" \
	"$PG_IMAGE" >/dev/null
if tb_wait psql "$URL" -c 'select 1'; then
	t1="$(now)"
	ok "postgres first init: psql $PG/appdb as app (cold start to first query $(secs "$t0" "$t1") s)"
else
	fail "postgres first init: no successful query within 60 s"
	docker logs "$PG" 2>&1 | tail -n 30
fi
check "postgres: query as app works" tb psql "$URL" -c "create table t (v text); insert into t values ('survives')"
check "postgres: wrong password rejected" bash -c "! docker exec $TB psql 'postgresql://app:wrong@$PG:5432/appdb' -c 'select 1'"
check "postgres: PID 1 is postgres, running as uid 999" \
	bash -c "[ \"\$(docker exec $PG cat /proc/1/comm)\" = postgres ] && [ \"\$(docker exec $PG stat -c %u /proc/1)\" = 999 ]"
check "postgres: pg_hba has 'host all all all scram-sha-256'" \
	docker exec "$PG" grep -qx 'host all all all scram-sha-256' /var/lib/postgresql/data/pg_hba.conf
check "postgres: password not in logs" bash -c "! docker logs $PG 2>&1 | grep -qF '$PASS'"
check "postgres: password not in PID 1 environment" bash -c "! docker exec $PG cat /proc/1/environ | tr '\0' '\n' | grep -qF '$PASS'"
check "postgres: data dir owned by 999 on the host" bash -c "[ \"\$(stat -c %u '$TMP/pgdata')\" = 999 ]"

t0="$(now)"
docker stop "$PG" >/dev/null
t1="$(now)"
stop_s="$(secs "$t0" "$t1")"
if awk -v s="$stop_s" 'BEGIN { exit !(s < 5) }'; then ok "postgres: docker stop took $stop_s s (SIGINT fast shutdown)"; else fail "postgres: docker stop took $stop_s s"; fi
check "postgres: clean shutdown logged" bash -c "docker logs $PG 2>&1 | grep -q 'database system is shut down'"

t0="$(now)"
docker start "$PG" >/dev/null
if tb_wait psql "$URL" -c 'select 1'; then
	t1="$(now)"
	ok "postgres restart on existing data: first query after $(secs "$t0" "$t1") s"
else
	fail "postgres restart: no successful query within 60 s"
fi
check "postgres: data survived the restart" bash -c "[ \"\$(docker exec $TB psql '$URL' -Atc 'select v from t')\" = survives ]"
check "postgres: initialised exactly once" bash -c "[ \"\$(docker logs $PG 2>&1 | grep -c 'init process complete')\" = 1 ] && docker logs $PG 2>&1 | grep -q 'Skipping initialization'"
check "postgres: pgbench from the toolbox" tb bash -c "pgbench -q -i -s 1 '$URL' && pgbench -c 2 -t 50 '$URL'"

# --- postgres with extra server args ------------------------------------------
t0="$(now)"
docker run -d --name "$PG2" --network "$NET" -e POSTGRES_PASSWORD="$PASS" \
	"$PG_IMAGE" postgres -c shared_buffers=16MB -c max_connections=50 >/dev/null
URL2="postgresql://postgres:$PASS@$PG2:5432/postgres"
if tb_wait psql "$URL2" -c 'select 1'; then
	ok "postgres with 'postgres -c shared_buffers=16MB': first query after $(secs "$t0" "$(now)") s"
else
	fail "postgres with extra args did not come up"
	docker logs "$PG2" 2>&1 | tail -n 30
fi
check "postgres: shared_buffers=16MB applied" bash -c "[ \"\$(docker exec $TB psql '$URL2' -Atc 'show shared_buffers')\" = 16MB ]"
check "postgres: args starting with '-' imply postgres" bash -c "docker run --rm -e POSTGRES_PASSWORD=x $PG_IMAGE -V | grep -q 'PostgreSQL) 15'"

# --- postgres refuses to init without a password -------------------------------
docker run -d --name "$PG3" "$PG_IMAGE" >/dev/null
docker wait "$PG3" >/dev/null || true
check "postgres: refuses to init without POSTGRES_PASSWORD" bash -c "
	[ \"\$(docker inspect -f '{{.State.ExitCode}}' $PG3)\" = 1 ] &&
	docker logs $PG3 2>&1 | grep -q 'superuser password is not specified'"

# --- redis with a mounted read-only config (requirepass) ----------------------
mkdir -p "$TMP/redisdata"
cat >"$TMP/redis.conf" <<EOF
bind * -::*
port 6379
dir /data
requirepass $PASS
EOF
chmod 644 "$TMP/redis.conf"
t0="$(now)"
docker run -d --name "$RD" --network "$NET" \
	-v "$TMP/redis.conf:/usr/local/etc/redis/redis.conf:ro" \
	-v "$TMP/redisdata:/data" \
	"$REDIS_IMAGE" redis-server /usr/local/etc/redis/redis.conf >/dev/null
# NB: redis-cli 7.0 sends `AUTH "" <pass>` (and fails) for redis://:PASS@host,
# so name the default user; AUTH failures also leave its exit status at 0.
RURL="redis://default:$PASS@$RD:6379"
if tb_wait bash -c "[ \"\$(redis-cli --no-auth-warning -u '$RURL' ping)\" = PONG ]"; then
	ok "redis with mounted conf: PONG after $(secs "$t0" "$(now)") s"
else
	fail "redis with mounted conf: no PONG within 60 s"
	docker logs "$RD" 2>&1 | tail -n 30
fi
check "redis: no password -> NOAUTH" bash -c "docker exec $TB redis-cli -h $RD ping | grep -q NOAUTH"
check "redis: PID 1 is redis-server as uid 999" \
	bash -c "[ \"\$(docker exec $RD cat /proc/1/comm)\" = redis-server ] && [ \"\$(docker exec $RD stat -c %u /proc/1)\" = 999 ]"
check "redis: write a key" bash -c "[ \"\$(docker exec $TB redis-cli --no-auth-warning -u '$RURL' set k survives)\" = OK ]"
t0="$(now)"
docker stop "$RD" >/dev/null
stop_s="$(secs "$t0" "$(now)")"
docker start "$RD" >/dev/null
tb_wait bash -c "[ \"\$(redis-cli --no-auth-warning -u '$RURL' ping)\" = PONG ]" || true
check "redis: stop ($stop_s s) / start keeps data in /data" \
	bash -c "[ \"\$(docker exec $TB redis-cli --no-auth-warning -u '$RURL' get k)\" = survives ]"
check "redis: dump.rdb on the host owned by 999" bash -c "[ \"\$(stat -c %u '$TMP/redisdata/dump.rdb')\" = 999 ]"
check "redis: redis-benchmark from the toolbox" \
	tb redis-benchmark -h "$RD" -a "$PASS" -n 2000 -c 4 -q -t set,get

# --- redis with no config: all interfaces, protected mode off (official) -------
docker run -d --name "$RD2" --network "$NET" "$REDIS_IMAGE" >/dev/null
if tb_wait bash -c "[ \"\$(redis-cli -h $RD2 ping)\" = PONG ]"; then
	ok "redis without config: reachable from another container"
else
	fail "redis without config: not reachable"
	docker logs "$RD2" 2>&1 | tail -n 20
fi
check "redis: args starting with '-' imply redis-server" \
	bash -c "docker run --rm $REDIS_IMAGE --version | grep -q 'Redis server v=7'"

printf '%d passed, %d failed\n' "$passed" "$failed"
[ "$failed" = 0 ]
