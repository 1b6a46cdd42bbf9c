"""Accepting or rejecting a desired-state message (pure).

A message must carry the controller's valid signature (schemas/signed.py) before its
content is even looked at: unsigned, forged or signed by an unknown key is refused, so a
forged generation near 2^63 never becomes the one newer states are compared with.
A rejected message changes nothing: the agent keeps applying the last good state and
reports why in the host's `DesiredStateAccepted` condition.
"""

from __future__ import annotations

from msgspec import Struct

from schemas.codec import MessageRejected, decode
from schemas.messages import DesiredState
from schemas.signed import Verifier

# Every `Rejection.reason`: the codec's and this module's (metrics start each at zero).
REJECTION_REASONS = (
    "TooLarge",
    "Malformed",
    "UnsupportedVersion",
    "WrongHost",
    "StaleGeneration",
    "ConflictingGeneration",
    "Invalid",
)


class Rejection(Struct, frozen=True):
    reason: str
    message: str


def _semantic_errors(state: DesiredState) -> str | None:
    project_ids: set[str] = set()
    addon_ids: set[str] = set()
    for project in state.projects:
        if project.id in project_ids:
            return f"project {project.id} appears twice"
        project_ids.add(project.id)
        names: set[str] = set()
        for addon in project.addons:
            if addon.id in addon_ids:
                return f"add-on {addon.id} appears twice"
            addon_ids.add(addon.id)
            if not addon.deleted:
                if addon.name in names:
                    return f"project {project.id} has two live add-ons named {addon.name!r}"
                names.add(addon.name)
            if addon.sleep.enabled and addon.sleep.deep_after_s < addon.sleep.light_after_s:
                return f"add-on {addon.id}: deep_after_s is shorter than light_after_s"
    return None


def accept(
    current: DesiredState | None, raw: bytes, host: str, verifier: Verifier
) -> tuple[DesiredState | None, Rejection | None]:
    """(new state, None) to apply; (None, None) for a harmless duplicate; (None, why) to refuse."""
    try:
        state = decode(verifier.open(raw), DesiredState)
    except MessageRejected as exc:
        return None, Rejection(exc.reason, exc.message)
    if state.host != host:
        return None, Rejection(
            "WrongHost", f"desired state is for host {state.host!r}, not {host!r}"
        )
    if current is not None:
        if state.generation < current.generation:
            return None, Rejection(
                "StaleGeneration",
                f"generation {state.generation} is older than the applied {current.generation}",
            )
        if state.generation == current.generation:
            if state == current:
                return None, None
            return None, Rejection(
                "ConflictingGeneration",
                f"generation {state.generation} was already applied with other content",
            )
    problem = _semantic_errors(state)
    if problem is not None:
        return None, Rejection("Invalid", problem)
    return state, None
