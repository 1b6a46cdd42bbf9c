#!/usr/bin/env bash
# Prometheus's web config: basic auth on its HTTP API and UI (--web.config.file), with
# the password in PASSWORD_FILE. Idempotent: an existing WEB_YML whose hash still matches
# the password is left as it is. The bcrypt hash comes from python3's crypt (the system's
# libcrypt), so no package is added for it.
# Usage: prometheus-web.sh PASSWORD_FILE WEB_YML [USER]
set -euo pipefail
password_file=$1 web=$2 user=${3:-orkestr}
python3 -W ignore - "$password_file" "$web" "$user" <<'PY'
import crypt, os, re, sys
password_file, web, user = sys.argv[1:]
password = open(password_file).read().strip()
if not password:
    sys.exit(f"{password_file} holds no password")
try:
    found = re.search(r"^\s+%s:\s*(\S+)\s*$" % re.escape(user), open(web).read(), re.M)
except FileNotFoundError:
    found = None
if found and crypt.crypt(password, found[1]) == found[1]:
    sys.exit(0)
digest = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH))
if not digest or not digest.startswith("$2"):
    sys.exit("this system's crypt cannot make a bcrypt hash")
old = os.umask(0o027)
try:
    with open(web + ".tmp", "w") as f:
        f.write("# Written by deploy/prometheus-web.sh: basic auth on Prometheus's HTTP API.\n"
                f"basic_auth_users:\n  {user}: {digest}\n")
finally:
    os.umask(old)
os.replace(web + ".tmp", web)
print(f"wrote {web}")
PY
# Prometheus runs as its own user: it reads the file through its group.
if getent group prometheus >/dev/null; then chgrp prometheus "$web"; fi
chmod 0640 "$web"
