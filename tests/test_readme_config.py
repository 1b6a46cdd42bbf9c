"""Every configuration key the services read is in the README's tables, and every key
the tables name is read: an operator learns the keys there (pure: files and structs)."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import msgspec

from agent.config import AgentConfig
from controller.config import _File as ControllerFile

ROOT = Path(__file__).resolve().parent.parent
# Read only to say what replaced them (the README names them in the row that did).
RETIRED = frozenset(
    {"http.agent_token", "http.agent_token_file", "http.api_token", "http.api_token_file"}
)


def code_keys(struct: type[msgspec.Struct], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    hints = typing.get_type_hints(struct)
    for f in msgspec.structs.fields(struct):
        t = hints[f.name]
        if isinstance(t, type) and issubclass(t, msgspec.Struct):
            keys |= code_keys(t, f"{prefix}{f.encode_name}.")
        else:
            keys.add(prefix + f.encode_name)
    return keys


def table_keys(text: str) -> set[str]:
    """Keys named in a table's first column: `a.b`, then `c` for `a.c`, `a.d[_file]`."""
    keys: set[str] = set()
    for line in text.splitlines():
        if not line.startswith("| `"):
            continue
        section = ""
        for name in re.findall(r"`([a-z_.\[\]]+)`", line.split("|")[1]):
            if "." in name:
                section = name.rsplit(".", 1)[0]
            else:
                name = f"{section}.{name}"
            if name.endswith("[_file]"):
                keys |= {name.removesuffix("[_file]"), name.replace("[_file]", "_file")}
            else:
                keys.add(name)
    return keys


def readme_tables() -> tuple[str, str]:
    readme = (ROOT / "README.md").read_text()
    controller = readme.split("`controller.toml`:")[1].split("`agent.toml`:")[0]
    agent = readme.split("`agent.toml`:")[1].split("Plans (`controller/plans.toml`)")[0]
    return controller, agent


def test_the_readme_tables_name_every_key_the_services_read() -> None:
    controller, agent = readme_tables()
    for code, doc in (
        (code_keys(ControllerFile) - RETIRED, table_keys(controller)),
        (code_keys(AgentConfig), table_keys(agent)),
    ):
        assert code - doc == set(), "read but not in the README"
        assert doc - code == set(), "in the README but not read"
