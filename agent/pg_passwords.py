"""Whether a Postgres password verifier (`pg_authid.rolpassword`) is that of a password.

Pure. The upkeep round reads the verifier of the add-on's login role and checks that it
still holds the platform's password: the tenant may change its own role's password
(`ALTER ROLE CURRENT_USER PASSWORD ...` needs no privilege), which would make the
credentials the API shows false, or, on a role a rotation retired, give a session kept
open past the rotation a login of its own choosing again.

Formats (Postgres 15, `src/backend/libpq/auth-scram.c`, `crypt.c`):
- `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>` (base64), RFC 5802/7677:
  SaltedPassword = PBKDF2-HMAC-SHA-256(password, salt, iterations), ClientKey =
  HMAC(SaltedPassword, "Client Key"), StoredKey = SHA-256(ClientKey), ServerKey =
  HMAC(SaltedPassword, "Server Key").
- `md5` + hex MD5(password + role name), when `password_encryption = md5` was in force.

The platform's passwords are `secrets.token_urlsafe` (ASCII), for which SASLprep, which
Postgres applies first, changes nothing.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

SCRAM_PREFIX = "SCRAM-SHA-256$"
# The count Postgres uses for a password set in plain text (fixed in 15, the default of
# `scram_iterations` from 16), as the agent sets them. A tenant can store a verifier of its
# own with any count; hashing a million iterations each round would stall the agent's
# event loop, so any other count is simply not the platform's password.
MAX_ITERATIONS = 4096


def scram_verifier(password: str, salt: bytes, iterations: int) -> str:
    """The verifier Postgres stores for `password` with this salt and iteration count."""
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    b64 = base64.b64encode
    return (
        f"{SCRAM_PREFIX}{iterations}:{b64(salt).decode()}"
        f"${b64(stored_key).decode()}:{b64(server_key).decode()}"
    )


def verifier_matches(verifier: str | None, password: str, role: str) -> bool:
    """Whether `verifier` accepts `password` for `role`; False for none or a malformed one."""
    if not verifier:
        return False
    if verifier.startswith("md5") and len(verifier) == 35:
        expected = "md5" + hashlib.md5((password + role).encode()).hexdigest()
        return hmac.compare_digest(verifier, expected)
    if not verifier.startswith(SCRAM_PREFIX):
        return False
    try:
        params, _, _keys = verifier[len(SCRAM_PREFIX) :].partition("$")
        iterations_text, _, salt_b64 = params.partition(":")
        iterations = int(iterations_text)
        salt = base64.b64decode(salt_b64, validate=True)
    except (ValueError, binascii.Error):
        return False
    if not 1 <= iterations <= MAX_ITERATIONS:
        return False
    return hmac.compare_digest(verifier, scram_verifier(password, salt, iterations))
