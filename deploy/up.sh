#!/usr/bin/env bash
# Installs and starts everything on this machine: Docker Engine, Mosquitto, PostgreSQL,
# the add-on images, the project's virtual environment, the controller and one agent;
# then creates an example project with a Postgres add-on and prints how to reach the API.
# Idempotent: a second run checks, reuses the same tokens and the same example project,
# and moves a configuration written by an older up.sh to the per-service credentials.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
log() { printf '[up] %s\n' "$*"; }

bash deploy/services.sh

etc=${ORKESTR_ETC:-/etc/orkestr}
run=${ORKESTR_RUN:-/var/lib/orkestr}
mkdir -p "$etc" "$run"
chmod 700 "$etc"
host=${ORKESTR_HOST:-$(hostname -s | tr 'A-Z_.' 'a-z--' | cut -c1-60)}
api_port=${ORKESTR_API_PORT:-8080}
mqtt_port=${ORKESTR_MQTT_PORT:-1883}
mqtt_tls_port=${ORKESTR_MQTT_TLS_PORT:-8883}
mqtt_tls_bind=${ORKESTR_MQTT_TLS_BIND:-127.0.0.1}
broker_etc=${ORKESTR_BROKER_ETC:-/etc/orkestr-broker}
broker_data=${ORKESTR_BROKER_DATA:-/var/lib/orkestr-broker}
database=${ORKESTR_DATABASE:-orkestr}

# Credentials, each in its own root-only file (docs/operations.md: which goes where):
# the operator's API token (an older up.sh called it api_token), the Prometheus scrape
# token, this host's agent token, the key that seals add-on passwords in the database,
# and the password of the controller's own database role; the agents' scrape token and
# the password of Prometheus's own HTTP API.
[ -s "$etc/operator_token" ] || [ ! -s "$etc/api_token" ] || mv "$etc/api_token" "$etc/operator_token"
new_secret() { .venv/bin/python -c 'import secrets; print(secrets.token_urlsafe(32))'; }
for t in operator_token metrics_token agent_token agent_metrics_token prometheus_password; do
  [ -s "$etc/$t" ] || (umask 077; new_secret >"$etc/$t")
done
[ -s "$etc/secrets.key" ] || (umask 077; head -c 32 /dev/urandom | base64 >"$etc/secrets.key")
[ -s "$etc/database_password" ] || (umask 077; .venv/bin/python -c 'import secrets; print(secrets.token_hex(24))' >"$etc/database_password")
# The controller's bootstrap list of agent tokens: "<host> <sha256 of the token>".
agent_digest=$(tr -d '\n' <"$etc/agent_token" | sha256sum | cut -d' ' -f1)
grep -qs "^$host $agent_digest\$" "$etc/agent_tokens" ||
  (umask 077; echo "$host $agent_digest" >>"$etc/agent_tokens")
chmod 600 "$etc"/operator_token "$etc"/metrics_token "$etc"/agent_token "$etc"/agent_tokens \
  "$etc"/secrets.key "$etc"/database_password "$etc"/agent_metrics_token "$etc"/prometheus_password
# Prometheus (deploy/services.sh installs it) runs as its own user and cannot enter the
# root-only $etc: it gets copies of the two scrape tokens its group can read
# (deploy/prometheus/prometheus.yml names them), and its HTTP API asks for a password
# (basic auth, deploy/prometheus-web.sh). Grafana, where installed, gets that password
# the same way (deploy/grafana/provisioning/datasources.yml).
if getent group prometheus >/dev/null && [ -d /etc/prometheus ]; then
  install -m 0640 -o root -g prometheus "$etc/metrics_token" /etc/prometheus/orkestr_metrics_token
  install -m 0640 -o root -g prometheus "$etc/agent_metrics_token" \
    /etc/prometheus/orkestr_agent_metrics_token
  bash deploy/prometheus-web.sh "$etc/prometheus_password" /etc/prometheus/web.yml
  if [ -f /etc/default/prometheus ] && ! grep -q -- '--web.config.file' /etc/default/prometheus; then
    sed -i 's|^ARGS="\(.*\)"|ARGS="\1 --web.config.file=/etc/prometheus/web.yml"|' /etc/default/prometheus
    if [ -d /run/systemd/system ] && systemctl is-active -q prometheus; then
      systemctl restart prometheus
    fi
  fi
fi
if getent group grafana >/dev/null && [ -d /etc/grafana ]; then
  install -m 0640 -o root -g grafana "$etc/prometheus_password" /etc/grafana/orkestr_prometheus_password
fi

# The controller's own database role, with that random password; the test role that
# deploy/services.sh creates gets no access to the controller's database.
db_password=$(cat "$etc/database_password")
runuser -u postgres -- psql -q -v ON_ERROR_STOP=1 <<SQL
DO \$\$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'orkestr_controller') THEN
    CREATE ROLE orkestr_controller LOGIN;
  END IF;
END \$\$;
ALTER ROLE orkestr_controller PASSWORD '$db_password';
SQL
runuser -u postgres -- psql -tAc "SELECT 1 FROM pg_database WHERE datname='$database'" | grep -q 1 \
  || runuser -u postgres -- createdb -O orkestr_controller "$database"
runuser -u postgres -- psql -q -v ON_ERROR_STOP=1 <<SQL
ALTER DATABASE "$database" OWNER TO orkestr_controller;
REVOKE CONNECT, TEMPORARY ON DATABASE "$database" FROM PUBLIC;
SQL
# Tables an older up.sh's controller created as the shared role move to the new owner.
runuser -u postgres -- psql -q -v ON_ERROR_STOP=1 -d "$database" <<'SQL'
DO $$ DECLARE r record; BEGIN
  FOR r IN SELECT c.oid::regclass AS name, c.relkind FROM pg_class c
           JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE n.nspname = 'public' AND c.relkind IN ('r', 'S')
             AND pg_get_userbyid(c.relowner) <> 'orkestr_controller' LOOP
    EXECUTE format('ALTER %s %s OWNER TO orkestr_controller',
                   CASE r.relkind WHEN 'S' THEN 'SEQUENCE' ELSE 'TABLE' END, r.name);
  END LOOP;
END $$;
SQL
database_url="postgresql://orkestr_controller:$db_password@127.0.0.1:5432/$database"

# Signing key, MQTT passwords, CA and certificates, ACL and the checked broker config.
ORKESTR_ETC=$etc ORKESTR_BROKER_ETC=$broker_etc ORKESTR_MQTT_PORT=$mqtt_port \
  ORKESTR_MQTT_TLS_PORT=$mqtt_tls_port ORKESTR_MQTT_TLS_BIND=$mqtt_tls_bind \
  bash deploy/broker-setup.sh "$host"

# Configs written by an older up.sh (no signing key, anonymous MQTT) are replaced; the old
# file is kept beside the new one.
for f in controller agent; do
  if [ -f "$etc/$f.toml" ] && ! grep -q '^\[signing\]' "$etc/$f.toml"; then
    log "replacing $etc/$f.toml (kept as $f.toml.old): it predates MQTT credentials and signing"
    mv "$etc/$f.toml" "$etc/$f.toml.old"
  fi
done

if [ ! -f "$etc/controller.toml" ]; then
  (umask 077; cat >"$etc/controller.toml" <<TOML
[http]
listen = "127.0.0.1:$api_port"
operator_token_file = "$etc/operator_token"
metrics_token_file = "$etc/metrics_token"
agent_tokens_file = "$etc/agent_tokens"

[secrets]
key_file = "$etc/secrets.key"

[database]
url = "$database_url"

[mqtt]
host = "127.0.0.1"
port = $mqtt_port
username = "orkestr.controller"
password_file = "$etc/mqtt-controller.password"
# The broker runs here: refuse to start if its config lets anyone in.
broker_config = "$broker_etc/mosquitto.conf"

[signing]
key_file = "$etc/signing.key"
TOML
  )
else
  # An older up.sh's file: the shared agent token, the fixed database password, no key.
  sed -i -e "s#^api_token_file = .*#operator_token_file = \"$etc/operator_token\"#" \
    -e "s#^agent_token_file = .*#agent_tokens_file = \"$etc/agent_tokens\"\nmetrics_token_file = \"$etc/metrics_token\"#" \
    -e "s#^url = \"postgresql://orkestr:orkestr@127.0.0.1:5432/orkestr\"#url = \"$database_url\"#" \
    "$etc/controller.toml"
  grep -q '^\[secrets\]' "$etc/controller.toml" ||
    printf '\n[secrets]\nkey_file = "%s"\n' "$etc/secrets.key" >>"$etc/controller.toml"
fi
chmod 600 "$etc/controller.toml"
if [ ! -f "$etc/agent.toml" ]; then
  cat >"$etc/agent.toml" <<TOML
[agent]
host = "$host"
state_dir = "/var/lib/orkestr-agent"
keeper_socket = "/run/orkestr-keeper/keeper.sock"

[controller]
url = "http://127.0.0.1:$api_port"
agent_token_file = "$etc/agent_token"

# Over TLS, as an agent on another host would connect (the name must be in the
# broker's certificate: ORKESTR_MQTT_TLS_NAMES for deploy/mqtt-certs.sh).
[mqtt]
host = "$mqtt_tls_bind"
port = $mqtt_tls_port
username = "$host"
password_file = "$etc/mqtt-agent.password"
ca_file = "$etc/mqtt-ca.crt"

[signing]
public_key_file = "$etc/signing.pub"

# This machine has no registry: the locally built images stand in for the official ones.
[images]
postgres = "orkestr-local/postgres:15"
redis = "orkestr-local/redis:7"

[metrics]
listen = "127.0.0.1:9464"
token_file = "$etc/agent_metrics_token"
TOML
fi
# An older up.sh's agent.toml: /metrics without a token.
if ! grep -q '^token_file = ' "$etc/agent.toml"; then
  if grep -q '^\[metrics\]' "$etc/agent.toml"; then
    sed -i "/^\[metrics\]/a token_file = \"$etc/agent_metrics_token\"" "$etc/agent.toml"
  else
    printf '\n[metrics]\ntoken_file = "%s"\n' "$etc/agent_metrics_token" >>"$etc/agent.toml"
  fi
fi

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# A process we started ourselves, unless systemd runs the machine.
start_bg() {  # name, command...
  local name=$1; shift
  local pidf="$run/$name.pid"
  if [ -f "$pidf" ] && kill -0 "$(cat "$pidf")" 2>/dev/null; then return; fi
  log "starting $name (log: $run/$name.log)"
  (umask 077; touch "$run/$name.log"); chmod 600 "$run/$name.log"
  nohup "$@" >>"$run/$name.log" 2>&1 &
  echo $! >"$pidf"
}

# The broker: restarted when its config changed (listeners), else reloaded (users, ACL).
conf=$broker_etc/mosquitto.conf
# Debian's package starts its own broker (mosquitto.service, /etc/mosquitto: anonymous on
# loopback) where systemd runs. On our port it would take the controller's connection and
# keep ours from starting, and the agent, on our TLS listener, would never come online.
if [ "$mqtt_port" = 1883 ] && [ -d /run/systemd/system ] && systemctl is-active -q mosquitto.service; then
  log "stopping and disabling Debian's broker (mosquitto.service): ours ($conf) takes port 1883"
  systemctl disable --now mosquitto.service
fi
sum=$(sha256sum "$conf" | cut -c1-16)
if [ -d /run/systemd/system ]; then
  # Its own unit (systemd/orkestr-broker.service), so it comes back after a reboot.
  sed "s#/etc/orkestr-broker#$broker_etc#g; s#/var/lib/orkestr-broker#$broker_data#g; s#/opt/orkestr#$repo#g" \
    systemd/orkestr-broker.service >/etc/systemd/system/orkestr-broker.service
  systemctl daemon-reload
  # A broker that up.sh started in the background before there was a unit.
  if [ -f "$run/mosquitto.pid" ] && kill -0 "$(cat "$run/mosquitto.pid")" 2>/dev/null; then
    log "moving the broker under systemd (orkestr-broker.service)"
    kill "$(cat "$run/mosquitto.pid")"
    for _ in $(seq 40); do kill -0 "$(cat "$run/mosquitto.pid")" 2>/dev/null || break; sleep 0.25; done
    rm -f "$run/mosquitto.pid"
  fi
  if ! systemctl is-active -q orkestr-broker.service; then
    systemctl enable --now orkestr-broker.service
  elif [ "$(cat "$run/mosquitto.conf.sum" 2>/dev/null)" != "$sum" ]; then
    log "restarting the broker: its config changed"
    systemctl restart orkestr-broker.service
  else
    systemctl reload orkestr-broker.service
  fi
  echo "$sum" >"$run/mosquitto.conf.sum"
else
  pidf=$run/mosquitto.pid
  if [ -f "$pidf" ] && kill -0 "$(cat "$pidf")" 2>/dev/null; then
    if [ "$(cat "$run/mosquitto.conf.sum" 2>/dev/null)" != "$sum" ]; then
      log "restarting the broker: its config changed"
      kill "$(cat "$pidf")"
      for _ in $(seq 40); do kill -0 "$(cat "$pidf")" 2>/dev/null || break; sleep 0.25; done
    else
      kill -HUP "$(cat "$pidf")"
    fi
  fi
  if ! port_open "$mqtt_port"; then
    start_bg mosquitto /usr/sbin/mosquitto -c "$conf"
    echo "$sum" >"$run/mosquitto.conf.sum"
  elif ! [ -f "$pidf" ] || ! kill -0 "$(cat "$pidf")" 2>/dev/null; then
    log "warning: another process listens on port $mqtt_port; it is not our broker ($conf)"
  fi
fi

if [ -d /run/systemd/system ]; then
  for unit in orkestr-controller orkestr-wake-keeper orkestr-agent; do
    sed "s#/opt/orkestr#$repo#g; s#/etc/orkestr#$etc#g" "systemd/$unit.service" >"/etc/systemd/system/$unit.service"
  done
  systemctl daemon-reload
  systemctl enable --now orkestr-controller orkestr-wake-keeper orkestr-agent
else
  mkdir -p -m 0700 /run/orkestr-keeper
  start_bg keeper .venv/bin/python -m agent.keeper --socket /run/orkestr-keeper/keeper.sock
  start_bg controller .venv/bin/python -m controller --config "$etc/controller.toml"
  start_bg agent .venv/bin/python -m agent --config "$etc/agent.toml"
fi

api="http://127.0.0.1:$api_port"
token=$(cat "$etc/operator_token")
call() { curl -fsS -H "Authorization: Bearer $token" -H 'Content-Type: application/json' "$@"; }

for _ in $(seq 120); do call "$api/v1/hosts" >/dev/null 2>&1 && break; sleep 0.5; done
call "$api/v1/hosts" >/dev/null || { log "controller not answering; see $run/controller.log"; exit 1; }
for _ in $(seq 120); do
  call "$api/v1/hosts" | grep -q '"online":true' && break; sleep 0.5
done

project=$(call "$api/v1/projects" | .venv/bin/python -c '
import json, sys
body = json.load(sys.stdin)
items = body["projects"] if isinstance(body, dict) else body
print(next((p["id"] for p in items if p["name"] == "example"), ""))')
if [ -z "$project" ]; then
  project=$(call -X POST "$api/v1/projects" -d '{"name": "example", "plan": "pro"}' |
            .venv/bin/python -c 'import json, sys; print(json.load(sys.stdin)["id"])')
  call -X POST "$api/v1/projects/$project/addons" -d '{"name": "example-db", "kind": "postgres"}' >/dev/null
fi
# Ready, or asleep (a sleeping add-on is healthy: it wakes when a client connects), at once.
log "checking the example add-on"
ORKESTR_API=$api ORKESTR_TOKEN=$token .venv/bin/orkestr addons wait example-db \
  --project example --timeout 120 | sed 's/^/[up] /' ||
  log "the example add-on is not healthy yet; see $run/agent.log and \`orkestr addons info example-db\`"

cat <<TXT

orkestr add-ons is running.
  API:        $api   (operator token: $etc/operator_token)
  Project:    example ($project), plan pro, add-on example-db (postgres)

  export ORKESTR_API=$api ORKESTR_TOKEN=\$(cat $etc/operator_token)
  export PATH=$repo/.venv/bin:\$PATH    # the \`orkestr\` CLI, installed with the project
  orkestr addons list --project example
  orkestr run --project example -- sh -c 'psql "\$DATABASE_URL" -c "select now()"'
  curl -H "Authorization: Bearer \$ORKESTR_TOKEN" $api/v1/projects/$project/addons
  curl -H "Authorization: Bearer \$ORKESTR_TOKEN" $api/v1/projects/$project/env
  curl -H "Authorization: Bearer \$ORKESTR_TOKEN" -X POST $api/v1/projects/$project/jobs \\
       -d '{"image": "orkestr-local/toolbox:bookworm", "command": ["sh", "-c", "psql \\"\$DATABASE_URL\\" -c \\"select now()\\""]}'
  # then GET .../jobs/<id> for its exit code and output
TXT
