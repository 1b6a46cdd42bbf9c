"""controller/body_errors.py: a refused body's message names the mapping key at fault."""

from __future__ import annotations

import copy
from typing import Any

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from controller.body_errors import describe_body, duplicate_key
from controller.releases import ReleaseCreate
from controller.request_bodies import EnvUpdate

NAMES = st.from_regex(r"[A-Z][A-Z0-9_]{0,10}", fullmatch=True)
BAD_VALUES = st.sampled_from([5, None, "x" * 8193, "a\x00b", ["list"]])


def message(data: Any, kind: type) -> str:
    try:
        msgspec.convert(data, kind)
    except msgspec.ValidationError as exc:
        before = copy.deepcopy(data)
        text = describe_body(exc, data, kind)
        assert data == before and list(data) == list(before)  # the body is left as it was
        return text
    raise AssertionError("the body was accepted")


@given(st.dictionaries(NAMES, st.just("ok"), max_size=20), NAMES, BAD_VALUES, st.data())
def test_a_bad_value_names_its_key(
    good: dict[str, str], bad: str, value: Any, data: st.DataObject
) -> None:
    good.pop(bad, None)
    at = data.draw(st.integers(0, len(good)))
    items = list(good.items())
    changes = dict([*items[:at], (bad, value), *items[at:]])
    text = message({"set": changes}, EnvUpdate)
    assert text.startswith(f'set["{bad}"]: Expected'), text


@given(st.dictionaries(NAMES, st.just("ok"), max_size=20), st.sampled_from(["a-b", "1X", ""]))
def test_a_bad_key_is_named(good: dict[str, str], bad: str) -> None:
    text = message({"set": {**good, bad: "x"}}, EnvUpdate)
    assert text.startswith(f'set: key "{bad}" is invalid: Expected `str` matching'), text


def test_nested_mappings_and_what_is_not_about_a_key() -> None:
    apps = {"web": {"image": "debian:12"}, "worker": {"image": "debian:12", "command": [1]}}
    text = message({"apps": apps}, ReleaseCreate)
    assert text == 'apps["worker"].command[0]: Expected `str`, got `int`'
    assert message({"set": {f"V{i}": "x" for i in range(101)}}, EnvUpdate) == (
        "set: Expected `object` of length <= 100"
    )
    assert message({"unset": ["a-b"]}, EnvUpdate).startswith("unset[0]: Expected")
    long = "K" * 100 + "-"
    assert message({"set": {long: "x"}}, EnvUpdate).startswith(f'set: key "{"K" * 64}..." is')


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(st.dictionaries(st.text(), JSON, max_size=6))
def test_an_object_without_a_repeated_key_passes(body: dict[str, Any]) -> None:
    assert duplicate_key(msgspec.json.encode(body)) is None


@given(st.dictionaries(st.text(), JSON, min_size=1, max_size=6), st.data())
def test_a_repeated_key_is_found_at_any_depth(body: dict[str, Any], data: st.DataObject) -> None:
    key = data.draw(st.sampled_from(sorted(body)))
    text = msgspec.json.encode(body).decode()
    twice = msgspec.json.encode(key).decode() + ':"again",'
    nested = data.draw(st.booleans())
    encoded = (
        '{"outer":' + "{" + twice + text[1:] + "}" if nested else "{" + twice + text[1:]
    ).encode()
    assert duplicate_key(encoded) == key
