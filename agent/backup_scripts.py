"""The shell scripts the backup containers run (toolbox image: bash, psql, pg_dump,
pg_restore, a postgres server, redis-cli, redis-server, redis-check-rdb).

Each script reads its parameters from the environment (never a password: that is read
from the mounted secret directory inside the script, so it is in no container config and
no process argument), writes its files into the add-on's directory of the backup store
mounted at /backup, and exits non-zero on any failure. Counts are written as
`name|number` lines; `agent/backup_checks.py` compares them.
"""

from __future__ import annotations

from agent.specs import PLATFORM_PG_SETTINGS

# libpq's PGOPTIONS: every psql and pg_dump session pins what a tenant's database-level
# settings could otherwise change under the platform's role (agent/specs.py).
PG_OPTIONS = " ".join(f"-c {name}={value}" for name, value in PLATFORM_PG_SETTINGS)

_PRELUDE = (
    r"""
set -euo pipefail
export PATH="$(echo /usr/lib/postgresql/*/bin | tr ' ' ':'):$PATH"
"""
    + f"export PGOPTIONS='{PG_OPTIONS}'\n"
)

# The platform's quota refusal (agent/upkeep.py: a schema `orkestr` of orkestr_admin, its
# two functions, a trigger `orkestr_quota` on every table and an event trigger) is in any
# dump taken while writes were refused. It is not the tenant's data, and its event trigger
# needs a superuser, so such a dump failed every test restore and restore: left out of the
# list pg_restore works through (`toc DUMP LIST`). Triggers of that name only when the
# dump has the platform's function: a tenant's own (renamed aside while writes are
# refused) is the tenant's.
_PG_TOC = r"""
toc() {
  pg_restore -l "$1" >"$2.all"
  local id='^[0-9]+; [0-9]+ [0-9]+ ' fn='FUNCTION orkestr quota_refuse'
  local drop="$id(EVENT TRIGGER - orkestr_quota|$fn(_ddl)?\\(\\)|SCHEMA - orkestr) orkestr_admin\$"
  if grep -q -E "$id$fn\\(\\) orkestr_admin\$" "$2.all"; then
    drop="$drop|$id""TRIGGER .* orkestr_quota [^ ]+\$"
  fi
  grep -v -E "$drop" "$2.all" >"$2" || true
  rm -f "$2.all"
}
"""

# Row counts of every user table, as `schema.table|rows`, for a psql session in which
# `\gexec` runs one count per table. A name with a line break in it (the tenant's to
# choose), or one that starts `hex:`, goes as `hex:` and its UTF-8 in hex
# (backup_checks.parse_counts): one line a table.
_PG_COUNTS_SQL = r"""
SELECT format('SELECT %L || ''|'' || count(*) FROM %I.%I',
              CASE WHEN t.name ~ '[\n\r]' OR t.name LIKE 'hex:%'
                   THEN 'hex:' || encode(convert_to(t.name, 'UTF8'), 'hex')
                   ELSE t.name END,
              n.nspname, c.relname)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace,
     LATERAL (SELECT n.nspname || '.' || c.relname AS name) t
WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\_toast%' AND n.nspname NOT LIKE 'pg\_temp%'
ORDER BY 1
\gexec
"""

_PG_CONNECT = r"""
PGPASSWORD="$(cat "/run/orkestr/$PASSWORD_FILE")"
export PGPASSWORD PGHOST="$ADDON_HOST" PGUSER="$BACKUP_USER" PGCONNECT_TIMEOUT=10
"""

# The dump and the counts come from one snapshot: a REPEATABLE READ transaction exports
# it, pg_dump --snapshot dumps exactly that, and the counts are taken in the transaction,
# while pg_dump runs (a scan of each table beside pg_dump's compression, which holds the
# dump's time: counted after it, the counts added a scan of the whole database).
PG_BACKUP = (
    _PRELUDE
    + _PG_CONNECT
    + r"""
export PGDATABASE="$ADDON_DB"
coproc PSQL { psql -X -q -At -v ON_ERROR_STOP=1 2>&1; }
exec 3>&"${PSQL[1]}" 4<&"${PSQL[0]}"
echo "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY; SELECT pg_export_snapshot();" >&3
read -r -t 60 snapshot <&4 || { echo "no snapshot from the server" >&2; exit 3; }
[[ "$snapshot" =~ ^[0-9A-Fa-f-]+$ ]] || { echo "snapshot: $snapshot" >&2; exit 3; }
cat >&3 <<'SQL'
"""
    + _PG_COUNTS_SQL
    + r"""
SELECT ':data_bytes|' || pg_database_size(current_database());
SELECT 'END-OF-COUNTS';
SQL
pg_dump -Fc --snapshot="$snapshot" -f "/backup/$OUT"
: >"/backup/$COUNTS"
done=0
while read -r -t 600 line <&4; do
  if [[ "$line" == END-OF-COUNTS ]]; then done=1; break; fi
  echo "$line" >>"/backup/$COUNTS"
done
printf 'COMMIT;\n\\q\n' >&3
exec 3>&- 4<&-
if [[ -n ${PSQL_PID:-} ]]; then wait "$PSQL_PID" || true; fi
[[ $done == 1 ]] || { echo "counting rows failed: $(tail -n 3 "/backup/$COUNTS")" >&2; exit 4; }
"""
)

# A throwaway server in the container (no network), the dump restored into it, counted.
PG_VERIFY = (
    _PRELUDE
    + _PG_TOC
    + r"""
scratch=$(mktemp -d)
chown postgres "$scratch"
as_pg() { setpriv --reuid=postgres --regid=postgres --init-groups "$@"; }
as_pg initdb -D "$scratch/data" -A trust -U postgres --no-sync >/dev/null
as_pg pg_ctl -D "$scratch/data" -l "$scratch/log" -w \
  -o "-c listen_addresses='' -k $scratch -c fsync=off -c full_page_writes=off" start >/dev/null
export PGHOST="$scratch" PGUSER=postgres
# Restored as a role like the tenant's, never as the superuser: the dump is the tenant's
# code (an index expression, a default, a check runs its functions as the objects' owner),
# and as a superuser that code could run programs here. The live restore does the same
# (--role, PG_RESTORE), so a backup that verifies is one that restores.
createuser --no-superuser --no-createdb --no-createrole tenant
createdb -O tenant scratch
toc "/backup/$IN" "$scratch/toc"
pg_restore --exit-on-error --no-owner --no-acl --role=tenant -L "$scratch/toc" -d scratch \
  "/backup/$IN"
psql -X -q -At -v ON_ERROR_STOP=1 -d scratch >"/backup/$COUNTS" <<'SQL'
"""
    + _PG_COUNTS_SQL
    + r"""
SQL
as_pg pg_ctl -D "$scratch/data" -m immediate stop >/dev/null
"""
)

# Restored beside the live database, then swapped in by two renames in one transaction;
# until the swap the live database is untouched, and a failure leaves it as it was. As the
# restore role (agent/platform_roles.py), no superuser: the swap ends the sessions it may
# end (the tenant's; the agent's own superuser sessions are brief, and the rename waits
# for them), and the autovacuum workers are ended by the rename itself.
# A step started beside the agent's check of the backup's sha256 (the container's start
# off the restore's time): it does nothing until the agent says `go` on $CTL, a FIFO in
# /backup (agent/control_pipe.py); anything else, the checksum failed.
_GATE = r"""
exec 3<>"${BACKUP:-/backup}/$CTL"
read -r go <&3
[[ $go == go ]] || { echo "not restored: $go" >&2; exit 9; }
"""

PG_RESTORE = (
    _PRELUDE
    + _GATE
    + _PG_CONNECT
    + _PG_TOC
    + r"""
export PGDATABASE=postgres
new="${ADDON_DB}_orkestr_restore"
old="${ADDON_DB}_orkestr_previous"
sql() { psql -X -q -v ON_ERROR_STOP=1 "$@"; }
# A run cut off between closing the live database and the swap (the agent killed, its
# container removed) left it closed: open it again before anything else can fail.
sql -c "ALTER DATABASE \"$ADDON_DB\" WITH ALLOW_CONNECTIONS true"
# FORCE: a killed run's backend may still be on its copy (it notices its client is gone
# only when it next talks to it); refused, this restore and every later one failed.
sql -c "DROP DATABASE IF EXISTS \"$new\" WITH (FORCE)" \
    -c "DROP DATABASE IF EXISTS \"$old\" WITH (FORCE)"
# Both copies are on the add-on's filesystem until the swap: with a quota, they must
# both fit it (schemas/storage.py, beside_refusal). The live size goes to the agent,
# which words the refusal.
if [[ -n ${QUOTA_BYTES:-} ]]; then
  live=$(psql -X -At -v ON_ERROR_STOP=1 -c "SELECT pg_database_size('$ADDON_DB')")
  echo "$live" >"/backup/$ROOM"
  if (( live + NEED_BYTES > QUOTA_BYTES )); then exit 7; fi
fi
sql -c "CREATE DATABASE \"$new\" OWNER \"$ADDON_USER\""
list=$(mktemp)
toc "/backup/$IN" "$list"
if ! pg_restore --exit-on-error --no-owner --no-acl --role="$ADDON_USER" -L "$list" \
     -d "$new" "/backup/$IN"; then
  sql -c "DROP DATABASE IF EXISTS \"$new\" WITH (FORCE)" || true
  echo "pg_restore failed; the live database is unchanged" >&2
  exit 5
fi
reopen() { sql -c "ALTER DATABASE \"$ADDON_DB\" WITH ALLOW_CONNECTIONS true" || true; }
trap reopen EXIT
sql -c "ALTER DATABASE \"$ADDON_DB\" WITH ALLOW_CONNECTIONS false"
swapped=0
for attempt in 1 2 3 4 5; do
  if sql <<SQL
SELECT count(pg_terminate_backend(a.pid)) FROM pg_stat_activity a
WHERE a.datname = '$ADDON_DB' AND a.pid <> pg_backend_pid()
  AND NOT COALESCE((SELECT r.rolsuper FROM pg_roles r WHERE r.oid = a.usesysid), true);
SELECT pg_sleep(0.05);
BEGIN;
ALTER DATABASE "$ADDON_DB" RENAME TO "$old";
ALTER DATABASE "$new" RENAME TO "$ADDON_DB";
COMMIT;
SQL
  then swapped=1; break; fi
done
[[ $swapped == 1 ]] || { echo "could not swap the databases" >&2; exit 6; }
"""
)

# A restore the agent stopped (its copy outgrew the room beside the live database),
# wherever its script was: the live database is opened again (a kill between closing it
# and the swap left it closed), and if the swap had committed (the previous database,
# which the restore dropped first, exists again) that is said in $ROOM; otherwise the
# copy goes at once (its connection may still linger).
PG_RESTORE_ABANDON = (
    _PRELUDE
    + _PG_CONNECT
    + r"""
export PGDATABASE=postgres
sql() { psql -X -q -At -v ON_ERROR_STOP=1 "$@"; }
sql -c "ALTER DATABASE \"$ADDON_DB\" WITH ALLOW_CONNECTIONS true"
previous=$(sql -c "SELECT count(*) FROM pg_database WHERE datname = '${ADDON_DB}_orkestr_previous'")
if [[ $previous == 1 ]]; then
  echo swapped >"/backup/$ROOM"
  exit 0
fi
sql -c "DROP DATABASE IF EXISTS \"${ADDON_DB}_orkestr_restore\" WITH (FORCE)"
"""
)

# After the swap, housekeeping: the previous database goes (DROP DATABASE checkpoints, so
# it runs once the restored database is already live). A failure only leaves it behind,
# and the next restore drops it first.
PG_RESTORE_CLEANUP = (
    _PRELUDE
    + _PG_CONNECT
    + r"""
export PGDATABASE=postgres
psql -X -q -v ON_ERROR_STOP=1 -c "DROP DATABASE IF EXISTS \"${ADDON_DB}_orkestr_previous\""
"""
)

# The Redis dump runs in the add-on's holder's network namespace (agent/backups.py,
# IN_HOLDER): the server is on loopback there, where nothing else can answer for it.
_REDIS_CONNECT = r"""
REDISCLI_AUTH="$(cat "/run/orkestr/$PASSWORD_FILE")"
export REDISCLI_AUTH
rcli() { redis-cli --no-auth-warning -h 127.0.0.1 --user "$BACKUP_USER" "$@"; }
"""

_KEYS = r"""
keys() { "$@" INFO keyspace | awk -F'[=:,]' '/^db[0-9]+:/ {n += $3} END {print n + 0}'; }
"""

# The one-file AOF a Redis restore stages (the RDB as its base, an empty incr file): the
# add-on runs with appendonly, and Redis loads an RDB-format base without a rewrite.
# `aof <dir>` writes the incr file and the manifest into <dir>; the base is the caller's.
_AOF = r"""
aof() {
  : >"$1/appendonly.aof.1.incr.aof"
  { echo "file appendonly.aof.1.base.rdb seq 1 type b"
    echo "file appendonly.aof.1.incr.aof seq 1 type i"; } >"$1/appendonly.aof.manifest"
}
"""

# Loads a backup into a private redis-server (no network: a unix socket) the way the
# restored add-on loads it: as the base of a one-file AOF, not as a dump.rdb. A file that
# only an RDB load accepts (bytes after the RDB's end, which the AOF loader reads as
# commands) is not restorable, and must not verify.
_REDIS_LOAD = (
    _KEYS
    + _AOF
    + r"""
load() {  # load <dir> <rdb file>
  mkdir "$1/appendonlydir"
  ln -s "$2" "$1/appendonlydir/appendonly.aof.1.base.rdb"
  aof "$1/appendonlydir"
  redis-server --port 0 --unixsocket "$1/s" --dir "$1" --appendonly yes --save '' \
    --daemonize yes --pidfile "$1/pid" --logfile "$1/redis.log"
  for _ in $(seq 6000); do
    if redis-cli -s "$1/s" INFO persistence 2>/dev/null | grep -q '^loading:0'; then return 0; fi
    # A file it cannot load ends the server: no need to wait out the timeout.
    if [[ -s "$1/pid" ]] && ! kill -0 "$(cat "$1/pid")" 2>/dev/null; then break; fi
    sleep 0.05
  done
  echo "redis did not load $2: $(tail -n 3 "$1/redis.log")" >&2
  return 1
}
lkeys() { keys redis-cli -s "$1/s"; }
"""
)

REDIS_BACKUP = (
    _PRELUDE
    + _KEYS
    + _REDIS_CONNECT
    + r"""
# The backup user may PING, INFO and SYNC, nothing else (agent/platform_roles.py); the
# agent set `repl-diskless-sync-delay 0` on a server whose redis.conf lacks it.
before=$(keys rcli)
rcli --rdb "/backup/$OUT" >/dev/null &
dump=$!
# The counts' upper bound is read once the first byte is in: every byte comes from the
# server's fork, so the snapshot is taken by then, and the call runs beside the transfer
# instead of after it, where it was inside the backup's time. Both sections in one call.
until [[ -s /backup/$OUT ]] || ! kill -0 "$dump" 2>/dev/null; do sleep 0.01; done
after_info=$(rcli INFO keyspace memory)
wait "$dump"
saved() { printf '%s\n' "$after_info"; }
after=$(keys saved)
used=$(saved | awk -F: '/^used_memory:/ {print $2 + 0}')
printf 'keys_before|%s\nkeys_after|%s\n:data_bytes|%s\n' "$before" "$after" "$used" \
  >"/backup/$COUNTS"
"""
)

REDIS_VERIFY = (
    _PRELUDE
    + _REDIS_LOAD
    + r"""
if ! redis-check-rdb "/backup/$IN" >/dev/null; then
  redis-check-rdb "/backup/$IN" | tail -n 5 >&2
  exit 5
fi
scratch=$(mktemp -d)
load "$scratch" "/backup/$IN"
printf 'keys|%s\n' "$(lkeys "$scratch")" >"/backup/$COUNTS"
redis-cli -s "$scratch/s" SHUTDOWN NOSAVE >/dev/null 2>&1 || true
"""
)

# The swap, with the add-on's Redis stopped: the staged files replace the live ones by
# renames in one filesystem; the previous files move to /data/.orkestr-previous first.
# Resumable: `.orkestr-swapping` marks a swap under way, so an agent killed anywhere in it
# (or between it and the restart) runs this again and it finishes the same swap; a
# rollback cut short (`.orkestr-rollback`) is finished instead. The outcome, `restored` or
# `previous`, goes to /backup/$STATE. DATA and BACKUP default to the mounts; a test moves them.
# No sync here: the staged files were flushed before `staged` (see REDIS_RESTORE). The
# renames reach the disk in order (ext4's journal), so a host crash leaves a prefix of
# them, which this script finishes like any other cut; the agent's marker is on disk
# already, and the cleanup flushes the restored files before it removes the previous ones.
REDIS_RESTORE_SWAP = r"""
set -euo pipefail
cd "${DATA:-/data}"
outcome() { echo "$1" >"${BACKUP:-/backup}/$STATE"; }
if [[ -f .orkestr-rollback ]]; then
  for f in appendonlydir dump.rdb; do
    if [[ -e .orkestr-previous/$f ]]; then rm -rf "$f"; mv ".orkestr-previous/$f" .; fi
  done
  rm -rf .orkestr-previous .orkestr-swapping
  rm -f .orkestr-rollback
  outcome previous
  exit 0
fi
if [[ ! -f .orkestr-swapping ]]; then
  if [[ ! -f .orkestr-restore/.complete ]]; then
    # Swapped already by the agent that was killed before the restart: nothing to move.
    if [[ -d .orkestr-previous && -d appendonlydir ]]; then outcome restored; exit 0; fi
    echo "no complete staged restore" >&2
    exit 5
  fi
  rm -rf .orkestr-previous
  mkdir .orkestr-previous
  touch .orkestr-swapping
fi
if [[ -d .orkestr-restore/appendonlydir ]]; then
  for f in appendonlydir dump.rdb; do
    [[ -e $f ]] || continue
    # Already moved once: this one is not the previous data (nothing may start Redis here).
    if [[ -e .orkestr-previous/$f ]]; then rm -rf "$f"; else mv "$f" .orkestr-previous/; fi
  done
  mv .orkestr-restore/appendonlydir .
fi
rm -rf .orkestr-restore
rm -f .orkestr-swapping
outcome restored
"""

# Undo of the swap (the restored data did not come up, or the swap failed): the previous
# files come back. Resumable like the swap: `.orkestr-rollback` marks it under way.
REDIS_RESTORE_ROLLBACK = r"""
set -euo pipefail
cd "${DATA:-/data}"
[[ -d .orkestr-previous ]] || { rm -f .orkestr-rollback .orkestr-swapping; exit 0; }
touch .orkestr-rollback
sync .
for f in appendonlydir dump.rdb; do
  if [[ -e .orkestr-previous/$f ]]; then rm -rf "$f"; mv ".orkestr-previous/$f" .; fi
done
rm -rf .orkestr-previous .orkestr-swapping
rm -f .orkestr-rollback
"""

# After the restored data went live: its files are flushed to disk (the staging did that
# already; this also covers what Redis wrote since), and only then are the previous ones
# removed, so a host crash before the flush still finds them for a rollback.
REDIS_RESTORE_CLEANUP = r"""
set -euo pipefail
cd "${DATA:-/data}"
if [[ -d appendonlydir ]]; then sync appendonlydir/* appendonlydir; fi
rm -rf .orkestr-previous .orkestr-restore
"""

# A Redis restore in one container, started as soon as the restore is (beside the agent's
# check of the backup's sha256), with the add-on's volume at /data while Redis still
# runs, and no network. It talks with the agent through two FIFOs in /backup that the
# agent made: $UP (to the agent: `staged`) and $CTL (from it: `swap`; anything else aborts).
#   1. The RDB is staged in /data/.orkestr-restore as the base file of a one-file AOF (the
#      add-on runs with appendonly, and Redis loads an RDB-format base, so nothing has to
#      be rewritten). Nothing the live server uses is touched. The copy is flushed to
#      disk here, while Redis still serves and the agent's checksum runs: left dirty, its
#      writeback ran inside the downtime, 0.3-0.45 s in Docker's kill of Redis (plain
#      volume) or in this container's exit (loop volume, unmounted then); see
#      docs/benchmarks.md, "Redis restore: where the time goes". -> `staged`
#   2. `swap` (the checksum matched and the agent has stopped Redis): the swap script
#      below, in this running container, so the add-on's downtime holds no container start
#      (nor its exit: the agent starts Redis on `swapped`, the outcome in $STATE).
# An agent killed anywhere leaves this container to be removed; a resumed restore runs
# the swap script on its own. DATA and BACKUP default to the mounts, as in the swap.
REDIS_RESTORE = (
    _PRELUDE
    + _AOF
    + r"""
exec 3<>"${BACKUP:-/backup}/$CTL" 4<>"${BACKUP:-/backup}/$UP"
stage="${DATA:-/data}/.orkestr-restore"
rm -rf "$stage"
mkdir -p "$stage/appendonlydir"
cp "${BACKUP:-/backup}/$IN" "$stage/appendonlydir/appendonly.aof.1.base.rdb"
aof "$stage/appendonlydir"
sync "$stage/appendonlydir"/* "$stage/appendonlydir"
touch "$stage/.complete"
echo staged >&4
read -r cmd <&3
if [[ $cmd != swap ]]; then rm -rf "$stage"; echo "restore aborted ($cmd)" >&2; exit 0; fi
(
"""
    + REDIS_RESTORE_SWAP
    + r"""
)
echo swapped >&4
"""
)
