"""Job image references: Docker's reference grammar and the operator's allowlist.

A tenant names a job's image; both the controller (at the API) and the agent (before it
creates the container) check it here. Docker resolves a bare hex string as an image *id
prefix* (`"image": "0"` once ran a dangling layer), so ids and digests-only references
are refused outright, and a name must match one of the operator's patterns.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable

# distribution/reference's grammar, anchored: [domain/]path[:tag][@digest].
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_LABEL = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
_DOMAIN = rf"(?:{_LABEL}(?:\.{_LABEL})*(?::[0-9]+)?)"
_REFERENCE = re.compile(
    rf"^(?:{_DOMAIN}/)?{_COMPONENT}(?:/{_COMPONENT})*(?::[\w][\w.-]{{0,127}})?"
    r"(?:@sha256:[a-f0-9]{64})?$",
    re.ASCII,  # Docker's \w is ASCII; Python's would admit any letter
)
_ID = re.compile(r"^(?:sha256:)?[a-f0-9]{1,64}$")
MAX_REFERENCE = 255


# What a fresh install allows: the toolbox that deploy/ builds and the official images,
# whose psql and redis-cli reach the project's add-ons. Operators add their apps' images.
DEFAULT_JOB_IMAGES = ("orkestr-local/toolbox:*", "postgres:*", "redis:*")


def tagged(ref: str) -> str:
    """The name Docker lists in RepoTags for `ref`: `:latest` when it has no tag or digest."""
    if "@" in ref or ":" in ref.rsplit("/", 1)[-1]:
        return ref
    return f"{ref}:latest"


class ImageRefused(ValueError):
    """The reference is not an image name the operator allows; the message says why."""


def _matches(ref: str, pattern: str) -> bool:
    """fnmatch, except that a tag pattern's `*` does not reach across a `/`: `postgres:*`
    would take `postgres:15/x`, which Docker reads as the image `x` of a registry at
    host `postgres`, port 15."""
    if ":" in pattern.rsplit("/", 1)[-1] and ref.count("/") != pattern.count("/"):
        return False
    return fnmatch.fnmatchcase(ref, pattern)


def check_reference(ref: str, allowed: Iterable[str]) -> None:
    """Raise ImageRefused unless `ref` is a well-formed name matching an allowlist pattern.

    Patterns are shell-style (`fnmatch`, case-sensitive): `orkestr-local/toolbox:*`,
    `registry.example/tools/*`. An empty allowlist refuses every image.
    """
    if not ref or len(ref) > MAX_REFERENCE:
        raise ImageRefused(f"image: must be 1-{MAX_REFERENCE} characters")
    if _ID.match(ref):
        raise ImageRefused(
            f"image: {ref!r} looks like an image id; name an image from the allowlist instead"
        )
    if not _REFERENCE.match(ref):
        raise ImageRefused(
            f"image: {ref!r} is not a valid image reference "
            "(lower-case [registry/]name[:tag][@sha256:digest])"
        )
    patterns = tuple(allowed)
    if not any(_matches(ref, p) for p in patterns):
        offered = ", ".join(patterns) or "none (the operator allows no job images)"
        raise ImageRefused(f"image: {ref!r} is not allowed on this platform; allowed: {offered}")
