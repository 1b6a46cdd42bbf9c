#!/usr/bin/env bash
# The broker's TLS material: a private CA and a server certificate signed by it.
#   deploy/mqtt-certs.sh DIR [NAME ...]
# DIR gets ca.key, ca.crt (give ca.crt to every agent and the controller: mqtt.ca_file),
# server.key and server.crt (the broker's certfile/keyfile). The server certificate is
# valid for localhost, 127.0.0.1 and each NAME (a DNS name or an IP address: the names
# agents use in mqtt.host). Idempotent: existing files are kept; the server certificate is
# made again only when missing, expiring within 30 days, or lacking a NAME. Rotation:
# delete server.* (or everything, then hand out the new ca.crt) and run it again.
set -euo pipefail
dir=${1:?usage: mqtt-certs.sh DIR [NAME ...]}
shift
mkdir -p "$dir"
umask 077
cd "$dir"

if [ ! -s ca.key ] || [ ! -s ca.crt ]; then
  openssl ecparam -name prime256v1 -genkey -noout -out ca.key
  openssl req -x509 -new -key ca.key -sha256 -days 3650 -subj "/CN=orkestr MQTT CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out ca.crt 2>/dev/null
  rm -f server.crt  # a new CA: the old server certificate is no longer trusted
fi

san="DNS:localhost,IP:127.0.0.1"
for name in "$@"; do
  if [[ $name =~ ^[0-9.]+$ || $name == *:* ]]; then san+=",IP:$name"; else san+=",DNS:$name"; fi
done

renew=0
if [ ! -s server.key ] || [ ! -s server.crt ]; then
  renew=1
elif ! openssl x509 -in server.crt -noout -checkend $((30 * 86400)) >/dev/null; then
  renew=1
else
  have=$(openssl x509 -in server.crt -noout -ext subjectAltName 2>/dev/null | tr -d ' ' | tail -n +2)
  for want in ${san//,/ }; do
    [[ ",$have," == *",${want/IP:/IPAddress:},"* ]] || renew=1
  done
fi
if ((renew)); then
  [ -s server.key ] || openssl ecparam -name prime256v1 -genkey -noout -out server.key
  openssl req -new -key server.key -subj "/CN=orkestr MQTT broker" -out server.csr
  printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature\n' "$san" >server.ext
  openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -sha256 -days 825 \
    -extfile server.ext -out server.crt 2>/dev/null
  rm -f server.csr server.ext
fi
chmod 600 ca.key server.key
chmod 644 ca.crt server.crt
