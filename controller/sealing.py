"""Add-on passwords at rest: sealed with AES-256-GCM under the controller's key file.

The key file holds 32 random bytes, base64-encoded (`head -c 32 /dev/urandom | base64`).
A sealed value is `b"\\x01" + 12-byte nonce + ciphertext`; the add-on's id is the
associated data, so a sealed password copied onto another row does not open. Losing the
key file loses every add-on password the database holds (the running add-ons keep
theirs on their hosts): back it up with the database, not beside it.
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from controller.errors import ConfigError

VERSION = b"\x01"
NONCE_BYTES = 12


class SealError(Exception):
    """A sealed value that does not open with this key (wrong key or tampered row)."""


class Sealer:
    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ConfigError(f"secrets.key_file must hold 32 bytes (base64); got {len(key)}")
        self._aead = AESGCM(key)

    @classmethod
    def from_file(cls, path: Path) -> Sealer:
        try:
            text = path.read_text(encoding="ascii").strip()
            key = base64.b64decode(text, validate=True)
        except (UnicodeDecodeError, binascii.Error, ValueError):
            # The raw 32 bytes written without `| base64` said "'ascii' codec can't decode".
            raise ConfigError(
                f"secrets.key_file: {path} is not base64 text; it holds 32 random bytes, "
                "base64-encoded (head -c 32 /dev/urandom | base64)"
            ) from None
        except OSError as exc:
            raise ConfigError(f"secrets.key_file: cannot use {path}: {exc}") from None
        return cls(key)

    def seal(self, plaintext: str, context: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return VERSION + nonce + self._aead.encrypt(nonce, plaintext.encode(), context)

    def open(self, sealed: bytes, context: bytes) -> str:
        if sealed[:1] != VERSION or len(sealed) < 1 + NONCE_BYTES + 16:
            raise SealError("not a sealed value of a known version")
        nonce, body = sealed[1 : 1 + NONCE_BYTES], sealed[1 + NONCE_BYTES :]
        try:
            return self._aead.decrypt(nonce, body, context).decode()
        except InvalidTag:
            raise SealError("does not open with this key") from None
