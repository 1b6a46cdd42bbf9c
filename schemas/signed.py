"""Signed desired states: the controller signs, agents verify (Ed25519, `cryptography`).

The broker only relays: whoever can publish on a desired topic (a broken broker, a stolen
credential) still cannot make an agent delete a volume or jump its generation to 2^63,
because an agent applies nothing that the controller's key did not sign.

The signature covers a fixed domain tag plus the exact payload bytes, so it cannot be
replayed as another kind of message; the payload names its host and generation, so a
signed state cannot be replayed to another host, nor an old one applied again (the agent
refuses older generations). `key_id` (the first 16 hex digits of SHA-256 of the raw public
key) selects among the keys an agent trusts, which is what lets a key be rotated.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from schemas.codec import MessageRejected, decode, encode
from schemas.messages import SCHEMA_VERSION, SignedDesiredState

DOMAIN = b"orkestr/v1 desired-state\n"
_PEM_BLOCK = re.compile(rb"-----BEGIN PUBLIC KEY-----.+?-----END PUBLIC KEY-----", re.DOTALL)


class SigningKeyError(ValueError):
    """A key file that is missing, unreadable or not an Ed25519 key."""


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


class Signer:
    """The controller's side: holds the private key."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.key_id = key_id(private.public_key())

    @classmethod
    def from_pem(cls, pem: bytes) -> Signer:
        try:
            private = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError) as exc:
            raise SigningKeyError(f"not an unencrypted PEM private key: {exc}") from None
        if not isinstance(private, Ed25519PrivateKey):
            raise SigningKeyError(f"an Ed25519 key is required, got {type(private).__name__}")
        return cls(private)

    def seal(self, payload: bytes) -> bytes:
        """The signed envelope for an encoded DesiredState."""
        signature = self._private.sign(DOMAIN + payload)
        return encode(
            SignedDesiredState(
                version=SCHEMA_VERSION, key_id=self.key_id, payload=payload, signature=signature
            )
        )


class Verifier:
    """An agent's side: the public keys it trusts, by key id."""

    def __init__(self, keys: Iterable[Ed25519PublicKey]) -> None:
        self.keys: Mapping[str, Ed25519PublicKey] = {key_id(k): k for k in keys}
        if not self.keys:
            raise SigningKeyError("no public key given")

    @classmethod
    def from_pem(cls, pem: bytes) -> Verifier:
        """One or more PEM public keys (several while a key is being rotated)."""
        keys: list[Ed25519PublicKey] = []
        for block in _PEM_BLOCK.findall(pem):
            try:
                public = serialization.load_pem_public_key(block)
            except (ValueError, TypeError) as exc:
                raise SigningKeyError(f"not a PEM public key: {exc}") from None
            if not isinstance(public, Ed25519PublicKey):
                raise SigningKeyError(f"an Ed25519 key is required, got {type(public).__name__}")
            keys.append(public)
        return cls(keys)

    def open(self, raw: bytes) -> bytes:
        """The verified payload of a signed envelope, or MessageRejected saying why not."""
        try:
            envelope = decode(raw, SignedDesiredState)
        except MessageRejected as exc:
            if exc.reason == "Malformed" and _is_bare_state(raw):
                raise MessageRejected(
                    "Unsigned", "desired state without the controller's signature"
                ) from None
            raise
        public = self.keys.get(envelope.key_id)
        if public is None:
            raise MessageRejected(
                "UnknownKey",
                f"signed with key {envelope.key_id}, trusted: {', '.join(sorted(self.keys))}",
            )
        try:
            public.verify(envelope.signature, DOMAIN + envelope.payload)
        except InvalidSignature:
            raise MessageRejected(
                "BadSignature", f"signature does not match the payload (key {envelope.key_id})"
            ) from None
        return envelope.payload


def _is_bare_state(raw: bytes) -> bool:
    """A desired state sent as is: an object with a generation and no signature."""
    try:
        value = msgspec.json.decode(raw)
    # msgspec raises RecursionError (not DecodeError) for deeply nested input.
    except (msgspec.DecodeError, RecursionError):
        return False
    return isinstance(value, dict) and "generation" in value and "signature" not in value
