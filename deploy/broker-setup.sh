#!/usr/bin/env bash
# The broker's and the services' MQTT material on this machine (run by deploy/up.sh):
#   - $ORKESTR_ETC/signing.key (controller) and signing.pub (agents): Ed25519, made once;
#   - $ORKESTR_ETC/mqtt-controller.password and mqtt-agent.password, made once, and both
#     users (orkestr.controller, HOST) in the broker's password file (mosquitto_passwd);
#   - the broker's ACL (python -m schemas.broker_acl), CA and TLS certificate
#     (deploy/mqtt-certs.sh; the CA certificate is copied to $ORKESTR_ETC/mqtt-ca.crt);
#   - its mosquitto.conf from deploy/mosquitto.conf, checked by controller.broker_config;
#   - its persistence directory, owned by the mosquitto user it drops to.
# Usage: deploy/broker-setup.sh HOST. Idempotent: keys, passwords and the CA are kept.
set -euo pipefail
cd "$(dirname "$0")/.."
host=${1:?usage: broker-setup.sh HOST}
etc=${ORKESTR_ETC:-/etc/orkestr}
broker_etc=${ORKESTR_BROKER_ETC:-/etc/orkestr-broker}
broker_data=${ORKESTR_BROKER_DATA:-/var/lib/orkestr-broker}
port=${ORKESTR_MQTT_PORT:-1883}
tls_port=${ORKESTR_MQTT_TLS_PORT:-8883}
tls_bind=${ORKESTR_MQTT_TLS_BIND:-127.0.0.1}
python=${ORKESTR_PYTHON:-.venv/bin/python}
owner=mosquitto
id "$owner" >/dev/null 2>&1 || owner=root

mkdir -p "$etc"
chmod 700 "$etc"
if [ ! -s "$etc/signing.key" ]; then
  (umask 077; openssl genpkey -algorithm ed25519 -out "$etc/signing.key")
fi
openssl pkey -in "$etc/signing.key" -pubout -out "$etc/signing.pub.new"
mv "$etc/signing.pub.new" "$etc/signing.pub"
for who in controller agent; do
  [ -s "$etc/mqtt-$who.password" ] ||
    (umask 077; "$python" -c 'import secrets; print(secrets.token_urlsafe(32))' >"$etc/mqtt-$who.password")
done

install -d -m 0750 -o root -g "$owner" "$broker_etc"
install -d -m 0700 -o "$owner" -g "$owner" "$broker_data"
bash deploy/mqtt-certs.sh "$broker_etc/certs" "$tls_bind" $(hostname -f 2>/dev/null || hostname) ${ORKESTR_MQTT_TLS_NAMES:-}
chown root:"$owner" "$broker_etc/certs" "$broker_etc/certs/server.key"
chmod 0750 "$broker_etc/certs"
chmod 0640 "$broker_etc/certs/server.key"
install -m 0644 "$broker_etc/certs/ca.crt" "$etc/mqtt-ca.crt"

passwd=$broker_etc/passwd
[ -f "$passwd" ] || install -m 0640 -o root -g "$owner" /dev/null "$passwd"
# Adds or updates these two users; users added by hand (other hosts) stay. The password
# goes through stdin (twice: entered and confirmed), never through argv.
add_user() {  # user, password file
  local pw; pw=$(cat "$2")
  printf '%s\n%s\n' "$pw" "$pw" | mosquitto_passwd "$passwd" "$1" >/dev/null
}
add_user orkestr.controller "$etc/mqtt-controller.password"
add_user "$host" "$etc/mqtt-agent.password"
"$python" -m schemas.broker_acl >"$broker_etc/acl.new"
mv "$broker_etc/acl.new" "$broker_etc/acl"
chown root:"$owner" "$passwd" "$broker_etc/acl"
chmod 0640 "$passwd" "$broker_etc/acl"

sed -e "s#@BROKER_ETC@#$broker_etc#g; s#@BROKER_DATA@#$broker_data#g" \
    -e "s#@PORT@#$port#g; s#@TLS_PORT@#$tls_port#g; s#@TLS_BIND@#$tls_bind#g" \
    deploy/mosquitto.conf >"$broker_etc/mosquitto.conf.new"
mv "$broker_etc/mosquitto.conf.new" "$broker_etc/mosquitto.conf"
chmod 0644 "$broker_etc/mosquitto.conf"
"$python" -m controller.broker_config "$broker_etc/mosquitto.conf"
