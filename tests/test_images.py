"""The job image check: Docker's reference grammar, ids refused, the operator's allowlist."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.images import DEFAULT_JOB_IMAGES, ImageRefused, check_reference, tagged

ALLOW = ("orkestr-local/toolbox:*", "registry.example:5000/tools/*", "postgres:15")


@pytest.mark.parametrize(
    "ref",
    [
        "orkestr-local/toolbox:bookworm",
        "registry.example:5000/tools/migrate:v1.2",
        "registry.example:5000/tools/migrate@sha256:" + "a" * 64,
        "postgres:15",
    ],
)
def test_allowed_names_pass(ref: str) -> None:
    check_reference(ref, ALLOW)


@pytest.mark.parametrize(
    ("ref", "why"),
    [
        ("0", "image id"),
        ("deadbeef", "image id"),
        ("sha256:" + "b" * 64, "image id"),
        ("c" * 64, "image id"),
        ("Postgres:15", "not a valid"),
        ("postgres:15 ", "not a valid"),
        ("-x", "not a valid"),
        ("a//b", "not a valid"),
        ("postgres:16", "not allowed"),
        ("postgres", "not allowed"),
        ("orkestr-local/toolbox", "not allowed"),
        ("evil/orkestr-local/toolbox:x", "not allowed"),
        # A tag pattern's `*` stops at `/`: these name registries `postgres:15`, `redis:6379`.
        ("postgres:15/x", "not allowed"),
        ("orkestr-local/toolbox:1/x", "not a valid"),
        ("", "1-255"),
        ("a" * 300, "1-255"),
    ],
)
def test_refused_with_the_reason(ref: str, why: str) -> None:
    with pytest.raises(ImageRefused, match=why):
        check_reference(ref, ALLOW)


def test_a_tag_pattern_does_not_reach_another_registry() -> None:
    for ref in ("postgres:15/x", "postgres:15/library/x:1", "redis:6379/evil"):
        with pytest.raises(ImageRefused, match="not allowed"):
            check_reference(ref, DEFAULT_JOB_IMAGES)
    for ref in ("postgres:15", "redis:7-alpine", "postgres:15@sha256:" + "a" * 64):
        check_reference(ref, DEFAULT_JOB_IMAGES)


def test_empty_allowlist_refuses_everything() -> None:
    with pytest.raises(ImageRefused, match="allows no job images"):
        check_reference("postgres:15", ())


@given(st.text(alphabet="0123456789abcdef", min_size=1, max_size=64))
def test_no_hex_string_ever_passes(ref: str) -> None:
    with pytest.raises(ImageRefused):
        check_reference(ref, ("*",))


def test_tagged_names_what_docker_lists() -> None:
    assert tagged("postgres") == "postgres:latest"
    assert tagged("registry.example:5000/tools") == "registry.example:5000/tools:latest"
    assert tagged("postgres:15") == "postgres:15"
    assert tagged("x@sha256:" + "a" * 64) == "x@sha256:" + "a" * 64
    assert "orkestr-local/toolbox:*" in DEFAULT_JOB_IMAGES
