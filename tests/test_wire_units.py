"""Pure parts of the wire security: the signed envelope, the agent's acceptance of
desired states, and the generated broker ACL. No I/O."""

from __future__ import annotations

import msgspec
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from agent.desired import accept
from schemas import broker_acl, topics
from schemas.codec import MessageRejected, encode
from schemas.messages import MAX_MESSAGE_BYTES, SCHEMA_VERSION, DesiredState, SignedDesiredState
from schemas.signed import Signer, SigningKeyError, Verifier

KEY = Ed25519PrivateKey.generate()
SIGNER = Signer(KEY)
VERIFIER = Verifier([KEY.public_key()])


def state(generation: int, host: str = "h1") -> bytes:
    return encode(DesiredState(version=SCHEMA_VERSION, host=host, generation=generation))


def pem_public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def reason(raw: bytes, verifier: Verifier = VERIFIER) -> str:
    with pytest.raises(MessageRejected) as caught:
        verifier.open(raw)
    return caught.value.reason


def test_a_sealed_state_opens_to_the_same_bytes() -> None:
    payload = state(7)
    assert VERIFIER.open(SIGNER.seal(payload)) == payload


@given(st.data())
def test_any_change_to_payload_or_signature_is_refused(data: st.DataObject) -> None:
    envelope = msgspec.json.decode(SIGNER.seal(state(7)), type=SignedDesiredState)
    field = data.draw(st.sampled_from(["payload", "signature"]))
    value = bytearray(getattr(envelope, field))
    index = data.draw(st.integers(0, len(value) - 1))
    value[index] ^= data.draw(st.integers(1, 255))
    forged = msgspec.structs.replace(envelope, **{field: bytes(value)})
    assert reason(encode(forged)) == "BadSignature"


def test_unsigned_unknown_key_malformed_and_too_large_are_named() -> None:
    assert reason(state(2**63 - 1)) == "Unsigned"
    other = Signer(Ed25519PrivateKey.generate())
    assert reason(other.seal(state(1))) == "UnknownKey"
    assert reason(b"{not json") == "Malformed"
    assert reason(b" " * (MAX_MESSAGE_BYTES + 1)) == "TooLarge"
    wrong_version = msgspec.structs.replace(
        msgspec.json.decode(SIGNER.seal(state(1)), type=SignedDesiredState), version=99
    )
    assert reason(encode(wrong_version)) == "UnsupportedVersion"


def test_a_signature_is_bound_to_desired_states() -> None:
    # The same key signing the raw payload (without the domain tag) is not accepted.
    payload = state(3)
    envelope = SignedDesiredState(
        version=SCHEMA_VERSION, key_id=SIGNER.key_id, payload=payload, signature=KEY.sign(payload)
    )
    assert reason(encode(envelope)) == "BadSignature"


def test_rotation_trusts_every_key_in_the_file() -> None:
    new = Ed25519PrivateKey.generate()
    both = Verifier.from_pem(pem_public(KEY) + b"\n" + pem_public(new))
    assert both.open(Signer(new).seal(state(1))) == state(1)
    assert both.open(SIGNER.seal(state(1))) == state(1)


def test_key_files_must_hold_ed25519_keys() -> None:
    ec = generate_private_key(SECP256R1())
    ec_pem = ec.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(SigningKeyError, match="Ed25519"):
        Signer.from_pem(ec_pem)
    with pytest.raises(SigningKeyError, match="Ed25519"):
        Verifier.from_pem(
            ec.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
    with pytest.raises(SigningKeyError, match="no public key"):
        Verifier.from_pem(b"")


def test_a_forged_huge_generation_never_blocks_the_next_good_state() -> None:
    current, _ = accept(None, SIGNER.seal(state(5)), "h1", VERIFIER)
    assert current is not None and current.generation == 5
    for forged in (state(2**63 - 1), Signer(Ed25519PrivateKey.generate()).seal(state(2**63 - 1))):
        refused, why = accept(current, forged, "h1", VERIFIER)
        assert refused is None and why is not None
    nxt, why = accept(current, SIGNER.seal(state(6)), "h1", VERIFIER)
    assert why is None and nxt is not None and nxt.generation == 6
    # Signed, but for another host: refused as before.
    _, why = accept(current, SIGNER.seal(state(9, host="h2")), "h1", VERIFIER)
    assert why is not None and why.reason == "WrongHost"


def test_the_acl_names_the_real_topics() -> None:
    text = broker_acl.acl_text(["orkestr.controller"])
    assert f"pattern read {topics.desired('%u')}" in text
    assert f"pattern write {topics.status('%u')}" in text
    assert f"pattern write {topics.presence('%u')}" in text
    assert f"pattern write {topics.job_result('%u', '+')}" in text
    assert "user orkestr.controller" in text
    assert f"topic write {topics.desired('+')}" in text
    assert f"topic read {topics.JOB_RESULT_ALL}" in text
    assert f"pattern write {topics.job_output('%u', '+')}" in text
    assert f"topic read {topics.JOB_OUTPUT_ALL}" in text
    assert f"pattern write {topics.backup_result('%u', '+')}" in text
    assert f"topic read {topics.BACKUP_RESULT_ALL}" in text
    assert f"topic write {topics.JOB_RESULT_ALL}" in text  # only to clear retained ones
    # Hosts never get a plain `topic` line (that would apply to anonymous clients).
    assert text.index("\ntopic ") > text.index("\nuser orkestr.controller")
    for bad in ("#", "a+b", "two words", ""):
        with pytest.raises(ValueError):
            broker_acl.acl_text([bad])
