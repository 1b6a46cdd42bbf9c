"""The upkeep's check that a login role still holds the platform's password: Postgres's
verifier formats, against RFC 7677's SCRAM-SHA-256 example and malformed input. The check
against a real server's verifier is in test_tenant_fence.py."""

from __future__ import annotations

import base64
import hashlib
import hmac

from hypothesis import given
from hypothesis import strategies as st

from agent.pg_passwords import scram_verifier, verifier_matches

# RFC 7677, section 3: user "user", password "pencil".
SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
AUTH_MESSAGE = (
    b"n=user,r=rOprNGfwEbeRWgbNEkqO,"
    b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096,"
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
)
CLIENT_PROOF = base64.b64decode("dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
SERVER_SIGNATURE = base64.b64decode("6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")


def test_the_scram_keys_are_those_of_rfc_7677() -> None:
    verifier = scram_verifier("pencil", SALT, 4096)
    head, _, keys = verifier.partition("$")[2].partition("$")
    assert head == "4096:W22ZaJ0SNY7soEsUEjb6gQ=="
    stored_key, server_key = (base64.b64decode(k) for k in keys.split(":"))
    # The server's signature of the RFC's exchange comes out of our ServerKey, and the
    # client's proof opens with our StoredKey into a ClientKey that hashes to it.
    assert hmac.new(server_key, AUTH_MESSAGE, "sha256").digest() == SERVER_SIGNATURE
    signature = hmac.new(stored_key, AUTH_MESSAGE, "sha256").digest()
    client_key = bytes(a ^ b for a, b in zip(CLIENT_PROOF, signature, strict=True))
    assert hashlib.sha256(client_key).digest() == stored_key
    assert verifier_matches(verifier, "pencil", "user")
    assert not verifier_matches(verifier, "pencil2", "user")


def test_an_md5_verifier_is_salted_with_the_role_name() -> None:
    verifier = "md5" + hashlib.md5(b"pencil" + b"app").hexdigest()
    assert verifier_matches(verifier, "pencil", "app")
    assert not verifier_matches(verifier, "pencil", "app_rot")


def test_no_or_a_malformed_verifier_never_matches() -> None:
    for bad in (
        None,
        "",
        "pencil",
        "SCRAM-SHA-256$",
        "SCRAM-SHA-256$x:W22ZaJ0SNY7soEsUEjb6gQ==$a:b",
        "SCRAM-SHA-256$4096:not base64!$a:b",
        "SCRAM-SHA-256$0:W22ZaJ0SNY7soEsUEjb6gQ==$a:b",
        "SCRAM-SHA-256$99999999:W22ZaJ0SNY7soEsUEjb6gQ==$a:b",  # not worth the CPU
        "md5" + "0" * 32,
    ):
        assert not verifier_matches(bad, "pencil", "user"), bad


def test_a_verifier_costlier_than_the_platforms_is_not_hashed() -> None:
    # The tenant can store any iteration count; one above Postgres's own is reset
    # without being hashed, so it cannot make each upkeep round stall the agent.
    assert verifier_matches(scram_verifier("pencil", SALT, 4096), "pencil", "user")
    assert not verifier_matches(scram_verifier("pencil", SALT, 4097), "pencil", "user")


@given(st.text("abcdefghijklmnopqrstuvwxyzABC0123456789-_", min_size=1, max_size=43),
       st.binary(min_size=16, max_size=16), st.text(min_size=1, max_size=8))  # fmt: skip
def test_only_the_password_it_was_made_for_matches(password: str, salt: bytes, extra: str) -> None:
    verifier = scram_verifier(password, salt, 16)
    assert verifier_matches(verifier, password, "app")
    assert not verifier_matches(verifier, password + extra, "app")
