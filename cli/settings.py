"""Where the CLI keeps the API address and token: one JSON file, readable by its owner only.

`$ORKESTR_CONFIG` names the file; else `$XDG_CONFIG_HOME/orkestr/config.json`, else
`~/.config/orkestr/config.json`. `ORKESTR_API`, `ORKESTR_TOKEN` and `ORKESTR_PROJECT`
override what the file says, so CI needs no file at all.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    api: str = ""
    token: str = ""
    project: str = ""


def config_path() -> Path:
    explicit = os.environ.get("ORKESTR_CONFIG")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "orkestr" / "config.json"


def load() -> Settings:
    """The file's settings (empty when there is none), then the environment's overrides."""
    stored: dict[str, str] = {}
    path = config_path()
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raw = {}
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path}: {exc}; run `orkestr login` again") from None
    if isinstance(raw, dict):
        stored = {k: v for k, v in raw.items() if k in ("api", "token", "project")}
    return Settings(
        api=os.environ.get("ORKESTR_API") or str(stored.get("api", "")),
        token=os.environ.get("ORKESTR_TOKEN") or str(stored.get("token", "")),
        project=os.environ.get("ORKESTR_PROJECT") or str(stored.get("project", "")),
    )


def save(settings: Settings) -> Path:
    """Write the file with mode 0600 from its creation on (the token never sits readable)."""
    path = config_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(asdict(settings), out, indent=2)
        out.write("\n")
    os.chmod(tmp, 0o600)  # an existing .tmp kept its old mode
    os.replace(tmp, path)
    return path
