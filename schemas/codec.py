"""Strict decoding of wire messages.

`decode` never lets a foreign exception escape: any problem becomes `MessageRejected`
with a one-word reason (for a status condition) and a message a human can act on.
"""

from __future__ import annotations

from typing import TypeVar

import msgspec

from schemas.messages import MAX_MESSAGE_BYTES, SCHEMA_VERSION, Message, encoder

M = TypeVar("M", bound=Message)


class MessageRejected(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


class _Envelope(msgspec.Struct):
    version: int


_envelope = msgspec.json.Decoder(_Envelope)


def encode(message: Message) -> bytes:
    return encoder.encode(message)


def decode(
    data: bytes | bytearray | memoryview, kind: type[M], max_bytes: int = MAX_MESSAGE_BYTES
) -> M:
    raw = bytes(data)
    if len(raw) > max_bytes:
        raise MessageRejected(
            "TooLarge", f"{kind.__name__} of {len(raw)} bytes exceeds {max_bytes}"
        )
    try:
        envelope = _envelope.decode(raw)
    # msgspec raises RecursionError (not DecodeError) for deeply nested input.
    except (msgspec.DecodeError, RecursionError) as exc:
        raise MessageRejected("Malformed", f"{kind.__name__}: {exc}") from None
    if envelope.version != SCHEMA_VERSION:
        raise MessageRejected(
            "UnsupportedVersion",
            f"{kind.__name__} has schema version {envelope.version}, "
            f"this side speaks {SCHEMA_VERSION}",
        )
    try:
        return msgspec.json.decode(raw, type=kind)
    # msgspec raises RecursionError (not DecodeError) for deeply nested input.
    except (msgspec.DecodeError, RecursionError) as exc:
        raise MessageRejected("Malformed", f"{kind.__name__}: {exc}") from None
