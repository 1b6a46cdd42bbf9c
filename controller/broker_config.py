"""A start-up check of the broker's configuration (mosquitto.conf).

Refuses, with a message naming the line, a broker that would let anyone in: anonymous
access on a listener that is not loopback, no ACL file or an empty one (an authenticated
host could then read and write every topic), no password file, or client ids not tied
to usernames (a host could take over another's session). `deploy/up.sh` runs it before
starting mosquitto (`python -m controller.broker_config mosquitto.conf`), and the
controller runs it at start when `mqtt.broker_config` names the file.

The parser follows mosquitto 2.0: `per_listener_settings` makes `allow_anonymous`,
`password_file` and `acl_file` apply to the listener above them; `include_dir` reads
`*.conf` in sorted order; a config without `listener` has the default listener on all
interfaces.
"""

from __future__ import annotations

import ipaddress
import sys
from dataclasses import dataclass, field
from pathlib import Path


class BrokerConfigError(Exception):
    pass


@dataclass
class _Security:
    allow_anonymous: bool = False  # mosquitto 2.0's default
    password_file: str = ""
    acl_file: str = ""


@dataclass
class _Listener:
    where: str  # "file:line" for messages
    port: int
    bind: str  # "" = every interface
    security: _Security = field(default_factory=_Security)
    username_as_clientid: bool = False


# Options of one listener; given before any `listener` line they open the default
# listener (port 1883, every interface), as mosquitto 2.0 does.
_LISTENER_OPTIONS = {
    "use_username_as_clientid",
    "cafile",
    "capath",
    "certfile",
    "keyfile",
    "require_certificate",
    "protocol",
    "socket_domain",
}


def _lines(path: Path, seen: set[Path]) -> list[tuple[str, list[str]]]:
    """(file:line, words) for every directive, following include_dir."""
    if path in seen:
        return []
    seen.add(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise BrokerConfigError(f"cannot read broker config {path}: {exc.strerror}") from None
    out: list[tuple[str, list[str]]] = []
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        where = f"{path}:{number}"
        if words[0] == "include_dir" and len(words) > 1:
            for included in sorted(Path(words[1]).glob("*.conf")):
                out += _lines(included, seen)
            continue
        out.append((where, words))
    return out


def _is_loopback(bind: str) -> bool:
    if bind == "localhost":
        return True
    if bind.startswith("/"):  # a unix socket (listener 0 /path)
        return True
    try:
        return ipaddress.ip_address(bind).is_loopback
    except ValueError:
        return False  # an interface or host name: assume it is reachable


def _port(where: str, text: str) -> int:
    if not text.isdigit():
        raise BrokerConfigError(f"{where}: {text!r} is not a port number")
    return int(text)


def _acl_rules(path: Path) -> int:
    try:
        text = path.read_text()
    except OSError as exc:
        raise BrokerConfigError(f"cannot read the ACL file {path}: {exc.strerror}") from None
    words = (line.split() for line in text.splitlines())
    return sum(1 for w in words if w and w[0] in ("topic", "pattern"))


def check(path: Path) -> list[str]:
    """Every problem found in the broker config at `path` (empty: fine)."""
    directives = _lines(path, set())
    per_listener = any(
        w[0] == "per_listener_settings" and w[1:2] == ["true"] for _, w in directives
    )
    global_security = _Security()
    listeners: list[_Listener] = []
    default_port: tuple[str, int] | None = None
    for where, words in directives:
        key, args = words[0], words[1:]
        if key in _LISTENER_OPTIONS and not listeners:
            port = default_port[1] if default_port else 1883
            listeners.append(_Listener(f"{where} (implicit default listener)", port, ""))
        if key == "listener" and args:
            bind = args[1] if len(args) > 1 else ""
            listeners.append(_Listener(where, _port(where, args[0]), bind))
        elif key == "port" and args:
            default_port = (where, _port(where, args[0]))
        elif key in ("allow_anonymous", "password_file", "acl_file") and args:
            target = listeners[-1].security if per_listener and listeners else global_security
            if key == "allow_anonymous":
                target.allow_anonymous = args[0] == "true"
            else:
                setattr(target, key, " ".join(args))
        elif key == "use_username_as_clientid":
            listeners[-1].username_as_clientid = args[:1] == ["true"]
    if not listeners:
        where, port = default_port or (str(path), 1883)
        listeners.append(_Listener(where, port, ""))
    problems: list[str] = []
    for listener in listeners:
        security = listener.security if per_listener else global_security
        name = f"listener {listener.port} {listener.bind or '(every interface)'} ({listener.where})"
        if security.allow_anonymous and not _is_loopback(listener.bind):
            problems.append(f"{name} allows anonymous clients on a non-loopback address")
        if not security.password_file:
            problems.append(f"{name} has no password_file: per-host credentials are required")
        if not security.acl_file:
            problems.append(f"{name} has no acl_file: every client could use every topic")
        elif _acl_rules(path.parent / security.acl_file) == 0:
            problems.append(
                f"{name}: the ACL file {security.acl_file} is empty "
                "(generate it with `python -m schemas.broker_acl`)"
            )
        if not listener.username_as_clientid:
            problems.append(
                f"{name} needs use_username_as_clientid true (after its listener line): "
                "otherwise a client can take over another host's client id"
            )
    return problems


def require_safe(path: Path) -> None:
    problems = check(path)
    if problems:
        raise BrokerConfigError(f"refusing the broker config {path}:\n  " + "\n  ".join(problems))


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m controller.broker_config MOSQUITTO_CONF", file=sys.stderr)
        return 2
    try:
        require_safe(Path(argv[0]))
    except BrokerConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"broker config {argv[0]}: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
