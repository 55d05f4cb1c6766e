"""SASL mechanisms as pure challenge/response steps, and credential checks."""

from __future__ import annotations

import base64

import pytest

from txcolombe.auth import (
    Authentication,
    Mechanism,
    SASLClient,
    decode_challenge,
    encode_response,
)
from txcolombe.errors import InvalidAddress, InvalidChallenge, Step, UsageError


@pytest.mark.parametrize("bad", ["\r", "\n", "\x00", "a\r\nb", "x\x00"])
def test_credentials_refuse_controls(bad: str) -> None:
    with pytest.raises(InvalidAddress, match="username"):
        Authentication(f"us{bad}er", "pass")
    with pytest.raises(InvalidAddress, match="password"):
        Authentication("user", f"pa{bad}ss")


def test_empty_username_refused() -> None:
    with pytest.raises(InvalidAddress, match="empty"):
        Authentication("", "pass")


def test_credential_errors_are_usage_errors() -> None:
    with pytest.raises(UsageError):
        Authentication("", "pass")


def test_empty_password_allowed() -> None:
    assert Authentication("user", "").password == ""


def test_default_mechanism_is_plain() -> None:
    assert Authentication("user", "pass").mechanism is Mechanism.PLAIN


def test_password_not_in_repr() -> None:
    auth = Authentication("user", "hunter2", Mechanism.LOGIN)
    assert "hunter2" not in repr(auth)
    assert "user" in repr(auth)


# -- challenge and response encoding --------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "data"),
    [
        ("VXNlcm5hbWU6", b"Username:"),
        ("UGFzc3dvcmQ6", b"Password:"),
        ("", b""),
        ("  VXNlcm5hbWU6  ", b"Username:"),
        ("AAEC/w==", b"\x00\x01\x02\xff"),
    ],
)
def test_decode_challenge(text: str, data: bytes) -> None:
    assert decode_challenge(text) == data


@pytest.mark.parametrize("text", ["not base64!", "abc", "VXNl cm5h", "Username:", "é===", "a"])
def test_decode_invalid_challenge(text: str) -> None:
    with pytest.raises(InvalidChallenge) as info:
        decode_challenge(text)
    assert info.value.step is Step.AUTH
    assert info.value.temporary


def test_encode_response() -> None:
    assert encode_response(b"") == "="
    assert encode_response(b"user") == "dXNlcg=="
    assert encode_response(b"\x00user\x00pass") == base64.b64encode(b"\0user\0pass").decode()
    assert encode_response(b"\xff" * 100).isascii()


# -- PLAIN ----------------------------------------------------------------------------------------


def test_plain_initial_response() -> None:
    client = SASLClient(Authentication("user", "pass"))
    assert client.initial() == b"\x00user\x00pass"


def test_plain_utf8() -> None:
    client = SASLClient(Authentication("jörg", "密码"))
    assert client.initial() == "\0jörg\0密码".encode()


def test_plain_answers_one_empty_challenge() -> None:
    client = SASLClient(Authentication("user", "pass"))
    assert client.respond(b"") == b"\x00user\x00pass"
    with pytest.raises(InvalidChallenge):
        client.respond(b"")


def test_plain_refuses_a_non_empty_challenge() -> None:
    client = SASLClient(Authentication("user", "pass"))
    with pytest.raises(InvalidChallenge):
        client.respond(b"hello")


# -- LOGIN ----------------------------------------------------------------------------------------


def test_login_has_no_initial_response() -> None:
    assert SASLClient(Authentication("user", "pass", Mechanism.LOGIN)).initial() is None


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (b"Username:", b"Password:"),
        (b"User Name", b"Password"),
        (b"", b""),
        (b"login:", b"secret:"),
    ],
)
def test_login_exchange(first: bytes, second: bytes) -> None:
    client = SASLClient(Authentication("user", "pass", Mechanism.LOGIN))
    assert client.respond(first) == b"user"
    assert client.respond(second) == b"pass"
    with pytest.raises(InvalidChallenge):
        client.respond(b"Password:")


def test_login_password_prompt_first_is_refused() -> None:
    client = SASLClient(Authentication("user", "pass", Mechanism.LOGIN))
    with pytest.raises(InvalidChallenge):
        client.respond(b"Password:")


def test_login_username_prompt_twice_is_refused() -> None:
    client = SASLClient(Authentication("user", "pass", Mechanism.LOGIN))
    client.respond(b"Username:")
    with pytest.raises(InvalidChallenge):
        client.respond(b"Username:")


def test_login_utf8() -> None:
    client = SASLClient(Authentication("jörg", "密码", Mechanism.LOGIN))
    assert client.respond(b"Username:") == "jörg".encode()
    assert client.respond(b"Password:") == "密码".encode()
