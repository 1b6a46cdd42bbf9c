#!/usr/bin/env bash
# Installs and starts what orkestr add-ons needs on this machine: Docker Engine, Mosquitto,
# PostgreSQL (the controller's state), debootstrap (local add-on images) and the Python
# virtual environment. Idempotent: a second run only checks that everything is up.
set -euo pipefail
# One set-up at a time on this machine (a CI run beside a developer's, two checkouts):
# packages, daemons and images belong to the machine, and two runs would build the same
# images twice or restart dockerd under each other. `-o`: the daemons started below must
# not inherit the lock.
if [ -z "${ORKESTR_SERVICES_LOCKED:-}" ]; then
  exec env ORKESTR_SERVICES_LOCKED=1 flock -o "${TMPDIR:-/tmp}/.orkestr-services.lock" bash "$0" "$@"
fi
cd "$(dirname "$0")/.."

log() { printf '[services] %s\n' "$*"; }

packages=(docker.io mosquitto mosquitto-clients postgresql postgresql-client redis-tools
          debootstrap iptables iproute2 util-linux e2fsprogs python3-venv openssl)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  log "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# Prometheus for the operators, and its promtool for the tests of our config and alerts.
if ! command -v promtool >/dev/null; then
  log "installing prometheus (promtool)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

# Debian's Prometheus unit listens on every address by default: loopback only, unless the
# operator already chose an address in /etc/default/prometheus.
if [ -f /etc/default/prometheus ] && ! grep -q -- '--web.listen-address' /etc/default/prometheus; then
  sed -i 's|^ARGS="\(.*\)"|ARGS="\1 --web.listen-address=127.0.0.1:9090"|' /etc/default/prometheus
  if [ -d /run/systemd/system ] && systemctl is-active -q prometheus; then
    systemctl restart prometheus
  fi
fi

# Debian's mosquitto package starts a broker on :1883 where systemd runs; we start our own
# brokers with explicit configs, so the packaged one is only stopped if it is in the way
# (deploy/up.sh, for the port it uses).

# Docker Engine: use systemd where it runs, otherwise start dockerd ourselves.
if ! docker info >/dev/null 2>&1; then
  if [ -d /run/systemd/system ]; then
    systemctl start docker
  else
    log "starting dockerd"
    mkdir -p /var/log/orkestr
    nohup dockerd >/var/log/orkestr/dockerd.log 2>&1 &
  fi
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
  docker info >/dev/null 2>&1 || { log "dockerd did not start; see /var/log/orkestr/dockerd.log"; exit 1; }
fi

# Address pools: Docker's defaults give about 31 bridge networks, and each project has one.
# 10.200.0.0/14 in /24s is 1024 networks, clear of the 192.168.x and 10.0.x LANs and of
# Docker's own 172.17-31. live-restore keeps the add-ons running while dockerd restarts.
# Written only when it differs (other keys are kept); dockerd restarts only then.
daemon_json=/etc/docker/daemon.json
mkdir -p /etc/docker
if python3 - "$daemon_json" <<'PY'
import json, sys
path = sys.argv[1]
try:
    with open(path) as f:
        config = json.load(f)
except FileNotFoundError:
    config = {}
want = {
    "default-address-pools": [{"base": "10.200.0.0/14", "size": 24}],
    "live-restore": True,
}
if all(config.get(k) == v for k, v in want.items()):
    sys.exit(1)  # unchanged
config.update(want)
with open(path + ".tmp", "w") as f:
    json.dump(config, f, indent=2)
    f.write("\n")
PY
then
  mv "$daemon_json.tmp" "$daemon_json"
  log "daemon.json changed: restarting dockerd (add-ons keep running: live-restore)"
  if [ -d /run/systemd/system ]; then
    systemctl reload docker 2>/dev/null || true  # live-restore first, so the restart spares containers
    systemctl restart docker
  else
    pid=$(pidof dockerd || true)
    if [ -n "$pid" ]; then
      kill -HUP "$pid"; sleep 1
      kill -TERM "$pid"
      for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    fi
    mkdir -p /var/log/orkestr
    nohup dockerd >>/var/log/orkestr/dockerd.log 2>&1 &
  fi
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
  docker info >/dev/null 2>&1 || { log "dockerd did not restart; see its log"; exit 1; }
fi
log "docker $(docker version --format '{{.Server.Version}}')"

# PostgreSQL for the controller's state.
pgver=$(pg_lsclusters -h | awk 'NR==1{print $1}')
pgname=$(pg_lsclusters -h | awk 'NR==1{print $2}')
if [ -z "$pgver" ]; then
  pgver=$(ls /usr/lib/postgresql | sort -n | tail -1); pgname=main
  pg_createcluster "$pgver" "$pgname" >/dev/null
fi
pg_lsclusters -h | awk -v v="$pgver" -v n="$pgname" '$1==v && $2==n {print $4}' | grep -q online \
  || pg_ctlcluster "$pgver" "$pgname" start
for _ in $(seq 60); do pg_isready -q -h 127.0.0.1 && break; sleep 0.5; done
# One role for the controller and the tests; CREATEDB so each test run gets its own database.
runuser -u postgres -- psql -q -v ON_ERROR_STOP=1 <<'SQL'
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'orkestr') THEN
    CREATE ROLE orkestr LOGIN CREATEDB PASSWORD 'orkestr';
  END IF;
END $$;
SQL
runuser -u postgres -- psql -tAc "SELECT 1 FROM pg_database WHERE datname='orkestr'" | grep -q 1 \
  || runuser -u postgres -- createdb -O orkestr orkestr
log "postgresql $pgver/$pgname on 127.0.0.1:5432"

# The Python environment with the project and its test tools.
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
stamp=.venv/.orkestr-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  log "installing the project into .venv"
  .venv/bin/pip install -q -U pip >/dev/null
  .venv/bin/pip install -q -e '.[test]' >.venv/install.log 2>&1 || { cat .venv/install.log; exit 1; }
  touch "$stamp"
fi

# Add-on images built from Debian packages (skipped when up to date).
bash deploy/images/build.sh
log "ready"
