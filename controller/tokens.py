"""Bearer tokens: how they are made, kept and compared (pure, apart from reading files).

A token is a prefix naming its kind plus 32 random bytes (urlsafe base64). The database
keeps only its sha256 digest, so a dump of it grants nothing; lookups go by digest and
the final comparison is constant-time. The operator and metrics tokens may live in files
(`FileToken`), and the per-host bootstrap list in another (`AgentTokensFile`): each is
re-read when its file's mtime changes, so rotating a token needs no restart.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
from pathlib import Path

from controller.errors import ConfigError
from controller.logs import log

logger = logging.getLogger(__name__)

MIN_TOKEN_CHARS = 16
PROJECT_PREFIX = "okp_"
AGENT_PREFIX = "oka_"
HOST = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


def new_token(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def check_token_text(value: str, what: str) -> str:
    value = value.strip()
    if len(value) < MIN_TOKEN_CHARS or any(c.isspace() for c in value):
        raise ConfigError(
            f"{what} must be at least {MIN_TOKEN_CHARS} characters without whitespace"
        )
    return value


class FileToken:
    """A token given inline or in a file; a changed file is re-read on the next check.

    A file that becomes unreadable or invalid keeps the last good token (and logs), so a
    half-written rotation does not lock everyone out.
    """

    def __init__(self, what: str, value: str | None = None, path: Path | None = None) -> None:
        self.what = what
        self._path = path
        self._mtime: int | None = None
        self._digest = b""
        if value is not None:
            self._digest = digest(check_token_text(value, what))
        elif path is not None:
            self._load(strict=True)

    def _load(self, strict: bool) -> None:
        assert self._path is not None
        try:
            mtime = os.stat(self._path).st_mtime_ns
            if mtime == self._mtime:
                return
            text = self._path.read_text(encoding="utf-8")
            self._digest = digest(check_token_text(text, self.what))
            self._mtime = mtime
            if not strict:
                log(logger, "token_reloaded", what=self.what, file=self._path)
        except (OSError, UnicodeDecodeError, ConfigError) as exc:
            if strict:
                raise ConfigError(f"{self.what}_file: cannot use {self._path}: {exc}") from None
            log(logger, "token_reload_failed", logging.WARNING, what=self.what, reason=exc)

    def matches(self, token_digest: bytes) -> bool:
        if self._path is not None:
            self._load(strict=False)
        return hmac.compare_digest(self._digest, token_digest)


class AgentTokensFile:
    """The bootstrap list of agent tokens: lines `<host> <sha256 hex of the token>`.

    `deploy/up.sh` writes one line per local agent; tokens made through the API live in
    the database instead. Blank lines and `#` comments are ignored.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._mtime: int | None = None
        self._hosts: dict[bytes, str] = {}
        self._load(strict=True)

    def _load(self, strict: bool) -> None:
        try:
            mtime = os.stat(self._path).st_mtime_ns
            if mtime == self._mtime:
                return
            self._hosts = parse_agent_tokens(self._path.read_text(encoding="utf-8"))
            self._mtime = mtime
            if not strict:
                log(logger, "agent_tokens_reloaded", file=self._path, tokens=len(self._hosts))
        except (OSError, UnicodeDecodeError, ConfigError) as exc:
            if strict:
                raise ConfigError(f"http.agent_tokens_file: {self._path}: {exc}") from None
            log(logger, "agent_tokens_reload_failed", logging.WARNING, reason=exc)

    def hosts(self) -> set[str]:
        self._load(strict=False)
        return set(self._hosts.values())

    def host_of(self, token_digest: bytes) -> str | None:
        self._load(strict=False)
        for known, host in self._hosts.items():
            if hmac.compare_digest(known, token_digest):
                return host
        return None


def parse_agent_tokens(text: str) -> dict[bytes, str]:
    hosts: dict[bytes, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not HOST.match(parts[0]) or not SHA256_HEX.match(parts[1]):
            raise ConfigError(f"line {number}: expected '<host> <sha256 hex of the token>'")
        hosts[bytes.fromhex(parts[1])] = parts[0]
    return hosts
