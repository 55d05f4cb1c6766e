"""SASL mechanisms as pure challenge/response steps, and credential checks."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import re
import string
from collections.abc import Awaitable, Callable, Generator
from typing import Any

import pytest
import scramp
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, succeed

from txcolombe.codec.errors import InvalidChallenge, InvalidCredentials, Step, UsageError
from txcolombe.codec.sasl import (
    MAX_SCRAM_ITERATIONS,
    MIN_SCRAM_ITERATIONS,
    Authentication,
    Mechanism,
    SASLClient,
    choose_mechanism,
    decode_base64,
    decode_challenge,
    encode_initial,
    encode_response,
    refuse_without_tls,
    resolve_token,
    saslprep,
)

SCRAM = Mechanism.SCRAM_SHA_256

# RFC 7677 §3. (The server-final value is the RFC's; "...mMhK1ZrL2o7hx5mF2QYPD+U=",
# sometimes quoted for it, is not a valid signature and is tested as a wrong one.)
RFC7677_NONCE = "rOprNGfwEbeRWgbNEkqO"
RFC7677_CLIENT_FIRST = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
RFC7677_SERVER_FIRST = (
    b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
)
RFC7677_CLIENT_FINAL = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
RFC7677_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def scram_client(username: str = "user", password: str = "pencil", **options: Any) -> SASLClient:
    options.setdefault("client_nonce", RFC7677_NONCE)
    return SASLClient(Authentication(username, password, SCRAM), **options)


def server_first(
    nonce: str = "rOprNGfwEbeRWgbNEkqO%srv", salt: str = "W22ZaJ0SNY7soEsUEjb6gQ==", i: str = "4096"
) -> bytes:
    return f"r={nonce},s={salt},i={i}".encode()


# -- credentials ------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["\r", "\n", "\x00", "a\r\nb", "x\x00"])
def test_credentials_refuse_controls(bad: str) -> None:
    with pytest.raises(InvalidCredentials, match="username"):
        Authentication(f"us{bad}er", "pass")
    with pytest.raises(InvalidCredentials, match="password"):
        Authentication("user", f"pa{bad}ss")
    with pytest.raises(InvalidCredentials, match="username"):
        Authentication(f"us{bad}er", token="tok")
    with pytest.raises(InvalidCredentials, match="token"):
        Authentication("user", token=f"to{bad}k")


def test_lone_surrogates_refused() -> None:
    with pytest.raises(InvalidCredentials, match="username"):
        Authentication("us\ud800er", "pass")
    with pytest.raises(InvalidCredentials, match="password"):
        Authentication("user", "pa\udfffss")


def test_empty_username_refused() -> None:
    with pytest.raises(InvalidCredentials, match="empty"):
        Authentication("", "pass")


def test_credential_errors_are_usage_errors() -> None:
    with pytest.raises(UsageError):
        Authentication("", "pass")


def test_empty_password_allowed() -> None:
    assert Authentication("user", "").password == ""


def test_default_mechanism_is_the_strongest_offered() -> None:
    assert Authentication("user", "pass").mechanism is None


def test_positional_mechanism_still_works() -> None:
    assert Authentication("user", "pass", Mechanism.LOGIN).mechanism is Mechanism.LOGIN
    assert Authentication("user", "pass", mechanism=Mechanism.PLAIN).mechanism is Mechanism.PLAIN


def test_password_not_in_repr() -> None:
    auth = Authentication("user", "hunter2", Mechanism.LOGIN)
    assert "hunter2" not in repr(auth)
    assert "user" in repr(auth)


def test_token_not_in_repr() -> None:
    auth = Authentication("user", token="ya29.secret", mechanism=Mechanism.XOAUTH2)
    assert "ya29" not in repr(auth)


def test_a_password_or_a_token() -> None:
    with pytest.raises(InvalidCredentials, match="a password or a token"):
        Authentication("user")
    with pytest.raises(InvalidCredentials, match="not both"):
        Authentication("user", "pass", token="tok")


@pytest.mark.parametrize("mechanism", [Mechanism.XOAUTH2, Mechanism.OAUTHBEARER])
def test_oauth_mechanisms_need_a_token(mechanism: Mechanism) -> None:
    with pytest.raises(InvalidCredentials, match="needs a token"):
        Authentication("user", "pass", mechanism)


@pytest.mark.parametrize("mechanism", [SCRAM, Mechanism.PLAIN, Mechanism.LOGIN, Mechanism.CRAM_MD5])
def test_password_mechanisms_need_a_password(mechanism: Mechanism) -> None:
    with pytest.raises(InvalidCredentials, match="needs a password"):
        Authentication("user", token="tok", mechanism=mechanism)


@pytest.mark.parametrize("token", ["", "a b", "tok\x01en", "jeton-é", "tab\tbed", "\x7f"])
def test_malformed_tokens_refused(token: str) -> None:
    with pytest.raises(InvalidCredentials, match="token"):
        Authentication("user", token=token)


def test_token_with_padding_and_punctuation_accepted() -> None:
    token = "vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg=="
    assert Authentication("user", token=token).token == token
    jwt = "eyJ0eXAiOiJKV1QifQ.eyJzdWIiOiIxIn0.c2ln-_~+/"
    assert Authentication("user", token=jwt).token == jwt


def test_token_username_cannot_hold_the_separator() -> None:
    with pytest.raises(InvalidCredentials, match="0x01"):
        Authentication("us\x01er", token="tok")


def test_token_must_be_str_or_callable() -> None:
    with pytest.raises(InvalidCredentials, match="neither"):
        Authentication("user", token=42)  # type: ignore[arg-type]


def test_token_provider_property() -> None:
    def provider() -> str:
        return "tok"

    assert Authentication("user", token=provider).token_provider is provider
    assert Authentication("user", token="tok").token_provider is None
    assert Authentication("user", "pass").token_provider is None


def test_named_scram_checks_saslprep_at_once() -> None:
    with pytest.raises(InvalidCredentials, match="password is not valid for SCRAM"):
        Authentication("user", "pa\x07ss", SCRAM)
    with pytest.raises(InvalidCredentials, match="username is not valid for SCRAM"):
        Authentication("us\u200eer", "pass", SCRAM)
    with pytest.raises(InvalidCredentials, match="empty after SASLprep"):
        Authentication("\u00ad", "pass", SCRAM)
    # The same credentials are fine for PLAIN: its server does any SASLprep.
    Authentication("user", "pa\x07ss", Mechanism.PLAIN)


# -- token providers ----------------------------------------------------------------------------


def run(coroutine: Awaitable[Authentication]) -> Authentication:
    """The result of a coroutine that never suspends."""
    generator: Generator[Any, None, Authentication] = coroutine.__await__()
    with pytest.raises(StopIteration) as stop:
        generator.send(None)
    result: Authentication = stop.value.value
    return result


def test_resolve_token_leaves_a_str_alone() -> None:
    auth = Authentication("user", token="tok")
    assert run(resolve_token(auth)) is auth
    plain = Authentication("user", "pass")
    assert run(resolve_token(plain)) is plain


def test_resolve_token_calls_a_plain_provider_once() -> None:
    calls: list[int] = []

    def provider() -> str:
        calls.append(1)
        return "fresh"

    auth = Authentication("user", token=provider, mechanism=Mechanism.XOAUTH2)
    resolved = run(resolve_token(auth))
    assert resolved.token == "fresh"
    assert resolved.mechanism is Mechanism.XOAUTH2
    assert resolved.username == "user"
    assert calls == [1]
    assert auth.token is provider


def test_resolve_token_awaits_a_coroutine() -> None:
    async def provider() -> str:
        return "from-a-coroutine"

    assert run(resolve_token(Authentication("user", token=provider))).token == "from-a-coroutine"


def test_resolve_token_awaits_a_deferred_under_twisted() -> None:
    pending: Deferred[str] = Deferred()
    auth = Authentication("user", token=lambda: pending)
    results: list[Authentication] = []
    Deferred.fromCoroutine(resolve_token(auth)).addCallback(results.append)
    assert results == []
    pending.callback("late-token")
    assert [r.token for r in results] == ["late-token"]


def test_resolve_token_with_a_fired_deferred() -> None:
    auth = Authentication("user", token=lambda: succeed("ready"))
    results: list[Authentication] = []
    Deferred.fromCoroutine(resolve_token(auth)).addCallback(results.append)
    assert [r.token for r in results] == ["ready"]


@pytest.mark.parametrize("value", [b"bytes", None, "", "with space", "a\r\nMAIL FROM:<x>"])
def test_resolve_token_checks_what_the_provider_gives(value: object) -> None:
    auth = Authentication("user", token=lambda: value)  # type: ignore[arg-type, return-value]
    with pytest.raises(InvalidCredentials):
        run(resolve_token(auth))


def test_resolve_token_lets_the_provider_error_through() -> None:
    def provider() -> str:
        raise RuntimeError("the identity provider is down")

    with pytest.raises(RuntimeError, match="down"):
        run(resolve_token(Authentication("user", token=provider)))


def test_sasl_client_refuses_an_unresolved_provider() -> None:
    auth = Authentication("user", token=lambda: "tok", mechanism=Mechanism.XOAUTH2)
    with pytest.raises(UsageError, match="resolve_token"):
        SASLClient(auth)


# -- choosing a mechanism -----------------------------------------------------------------------

ALL = frozenset(m.value for m in Mechanism)


@pytest.mark.parametrize(
    ("offered", "chosen"),
    [
        (ALL, SCRAM),
        ({"PLAIN", "LOGIN", "SCRAM-SHA-256"}, SCRAM),
        ({"PLAIN", "LOGIN"}, Mechanism.PLAIN),
        ({"LOGIN", "CRAM-MD5"}, Mechanism.LOGIN),
        ({"login"}, Mechanism.LOGIN),
        ({"scram-sha-256", "plain"}, SCRAM),
        ({"CRAM-MD5"}, None),
        ({"XOAUTH2", "OAUTHBEARER"}, None),
        ({"SCRAM-SHA-1", "DIGEST-MD5", "GSSAPI", "NTLM"}, None),
        (set(), None),
    ],
)
def test_choose_for_a_password(offered: set[str], chosen: Mechanism | None) -> None:
    assert choose_mechanism(Authentication("user", "pass"), frozenset(offered)) is chosen


@pytest.mark.parametrize(
    ("offered", "chosen"),
    [
        (ALL, Mechanism.OAUTHBEARER),
        ({"XOAUTH2", "PLAIN"}, Mechanism.XOAUTH2),
        ({"oauthbearer"}, Mechanism.OAUTHBEARER),
        ({"PLAIN", "LOGIN", "SCRAM-SHA-256", "CRAM-MD5"}, None),
    ],
)
def test_choose_for_a_token(offered: set[str], chosen: Mechanism | None) -> None:
    assert choose_mechanism(Authentication("user", token="tok"), frozenset(offered)) is chosen


@pytest.mark.parametrize("mechanism", [Mechanism.CRAM_MD5, Mechanism.LOGIN, Mechanism.PLAIN])
def test_a_named_mechanism_is_used_only_if_offered(mechanism: Mechanism) -> None:
    auth = Authentication("user", "pass", mechanism)
    assert choose_mechanism(auth, ALL) is mechanism
    assert choose_mechanism(auth, ALL - {mechanism.value}) is None


def test_named_oauth_mechanism() -> None:
    auth = Authentication("user", token="tok", mechanism=Mechanism.XOAUTH2)
    assert choose_mechanism(auth, ALL) is Mechanism.XOAUTH2
    assert choose_mechanism(auth, frozenset({"OAUTHBEARER"})) is None


def test_scram_skipped_when_saslprep_refuses_the_password() -> None:
    auth = Authentication("user", "pa\x07ss")
    assert choose_mechanism(auth, ALL) is Mechanism.PLAIN
    unassigned = Authentication("user", "\U0001f600")  # unassigned in Unicode 3.2
    assert choose_mechanism(unassigned, ALL) is Mechanism.PLAIN
    assert choose_mechanism(Authentication("user", "pâss"), ALL) is SCRAM


@given(
    offered=st.sets(st.sampled_from([*sorted(ALL), "GSSAPI", "SCRAM-SHA-1", "NTLM"])),
    token=st.booleans(),
)
def test_choice_is_always_offered_and_of_the_right_kind(offered: set[str], token: bool) -> None:
    auth = Authentication("user", token="tok") if token else Authentication("user", "pass")
    chosen = choose_mechanism(auth, frozenset(offered))
    if chosen is None:
        return
    assert chosen.value in offered
    assert chosen.uses_token is token
    assert chosen is not Mechanism.CRAM_MD5


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


@pytest.mark.parametrize("text", ["abc", "VXNl cm5h", "é===", b"VXNl\ncm5h", "Zm9v\n"])
def test_decode_base64_is_strict(text: str | bytes) -> None:
    with pytest.raises(ValueError, match="not valid base64"):
        decode_base64(text)


def test_decode_base64() -> None:
    assert decode_base64("Zm9vYmFy") == decode_base64(b"Zm9vYmFy") == b"foobar"
    assert decode_base64("") == b""


def test_credentials_are_refused_where_tls_is_ruled_out() -> None:
    auth = Authentication("user", "secret")
    with pytest.raises(UsageError, match=r"never sent without TLS \(tls_policy='none'\)"):
        refuse_without_tls(auth, "tls_policy='none'")
    refuse_without_tls(auth, None)
    refuse_without_tls(None, "tls_policy='none'")


def test_encode_initial_response() -> None:
    # RFC 4954 §4: "=" is an empty *initial* response.
    assert encode_initial(b"") == "="
    assert encode_initial(b"user") == "dXNlcg=="


def test_encode_continuation_response() -> None:
    # An empty response to a 334 is an empty line, not "=".
    assert encode_response(b"") == ""
    assert encode_response(b"user") == "dXNlcg=="
    assert encode_response(b"\x00user\x00pass") == base64.b64encode(b"\0user\0pass").decode()
    assert encode_response(b"\xff" * 100).isascii()


def test_no_mechanism_no_client() -> None:
    with pytest.raises(UsageError, match="choose_mechanism"):
        SASLClient(Authentication("user", "pass"))


def test_the_mechanism_argument_overrides() -> None:
    client = SASLClient(Authentication("user", "pass"), Mechanism.LOGIN)
    assert client.mechanism is Mechanism.LOGIN
    with pytest.raises(UsageError, match="needs a token"):
        SASLClient(Authentication("user", "pass"), Mechanism.XOAUTH2)
    with pytest.raises(UsageError, match="needs a password"):
        SASLClient(Authentication("user", token="tok"), Mechanism.PLAIN)


# -- the AUTH line ------------------------------------------------------------------------------


def test_auth_command_carries_the_initial_response() -> None:
    client = SASLClient(Authentication("user", "pass", Mechanism.PLAIN))
    assert client.auth_command() == "AUTH PLAIN AHVzZXIAcGFzcw=="
    assert client.done


@pytest.mark.parametrize("mechanism", [Mechanism.LOGIN, Mechanism.CRAM_MD5])
def test_auth_command_of_server_first_mechanisms(mechanism: Mechanism) -> None:
    client = SASLClient(Authentication("user", "pass", mechanism))
    assert client.auth_command() == f"AUTH {mechanism.value}"
    assert not client.done


def test_a_long_initial_response_waits_for_an_empty_challenge() -> None:
    # RFC 4954 §4: an AUTH line over the command limit goes without it.
    token = "x" * 600
    client = SASLClient(Authentication("user@example.com", token=token), Mechanism.XOAUTH2)
    assert client.auth_command() == "AUTH XOAUTH2"
    expected = f"user=user@example.com\x01auth=Bearer {token}\x01\x01".encode()
    assert client.respond(b"") == expected
    assert not client.done
    # The line limit counts the CRLF.
    short = SASLClient(Authentication("u", "p" * 300, Mechanism.PLAIN))
    line = short.auth_command()
    assert line.startswith("AUTH PLAIN ")
    assert len(line) + 2 <= 512
    assert SASLClient(Authentication("u", "p"), Mechanism.PLAIN).auth_command(limit=21) == (
        "AUTH PLAIN AHUAcA=="
    )
    assert SASLClient(Authentication("u", "p"), Mechanism.PLAIN).auth_command(limit=20) == (
        "AUTH PLAIN"
    )


def test_a_deferred_initial_response_needs_an_empty_challenge() -> None:
    client = SASLClient(Authentication("u", "p" * 600, Mechanism.PLAIN))
    assert client.auth_command() == "AUTH PLAIN"
    with pytest.raises(InvalidChallenge, match="instead of an empty one"):
        client.respond(b"hello")


def test_deferred_scram_initial_response() -> None:
    client = scram_client()
    assert client.auth_command(limit=10) == "AUTH SCRAM-SHA-256"
    assert client.respond(b"") == RFC7677_CLIENT_FIRST
    assert client.respond(RFC7677_SERVER_FIRST) == RFC7677_CLIENT_FINAL
    assert client.respond(RFC7677_SERVER_FINAL) == b""
    client.check_success()


# -- PLAIN ----------------------------------------------------------------------------------------


def plain(user: str = "user", password: str = "pass") -> SASLClient:
    return SASLClient(Authentication(user, password, Mechanism.PLAIN))


def test_plain_initial_response() -> None:
    client = plain()
    assert client.initial() == b"\x00user\x00pass"
    assert client.done
    client.check_success()


def test_plain_utf8() -> None:
    assert plain("jörg", "密码").initial() == "\0jörg\0密码".encode()


def test_plain_answers_one_empty_challenge() -> None:
    client = plain()
    assert client.respond(b"") == b"\x00user\x00pass"
    with pytest.raises(InvalidChallenge):
        client.respond(b"")


def test_plain_answers_one_empty_challenge_after_the_initial_response() -> None:
    # For servers that ignore the initial response.
    client = plain()
    client.initial()
    assert client.respond(b"") == b"\x00user\x00pass"
    with pytest.raises(InvalidChallenge):
        client.respond(b"")


def test_plain_after_the_initial_response_takes_no_other_challenge() -> None:
    client = plain()
    client.initial()
    with pytest.raises(InvalidChallenge):
        client.respond(b"more?")


def test_plain_refuses_a_non_empty_challenge() -> None:
    with pytest.raises(InvalidChallenge):
        plain().respond(b"hello")


# -- LOGIN ----------------------------------------------------------------------------------------


def login(user: str = "user", password: str = "pass") -> SASLClient:
    return SASLClient(Authentication(user, password, Mechanism.LOGIN))


def test_login_has_no_initial_response() -> None:
    assert login().initial() is None


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
    client = login()
    assert client.respond(first) == b"user"
    assert not client.done
    assert client.respond(second) == b"pass"
    assert client.done
    with pytest.raises(InvalidChallenge):
        client.respond(b"Password:")


def test_login_password_prompt_first_is_refused() -> None:
    with pytest.raises(InvalidChallenge):
        login().respond(b"Password:")


def test_login_username_prompt_twice_is_refused() -> None:
    client = login()
    client.respond(b"Username:")
    with pytest.raises(InvalidChallenge):
        client.respond(b"Username:")


def test_login_utf8() -> None:
    client = login("jörg", "密码")
    assert client.respond(b"Username:") == "jörg".encode()
    assert client.respond(b"Password:") == "密码".encode()


# -- CRAM-MD5 -------------------------------------------------------------------------------------


def test_cram_md5_rfc2195_example() -> None:
    client = SASLClient(Authentication("tim", "tanstaaftanstaaf", Mechanism.CRAM_MD5))
    assert client.initial() is None
    answer = client.respond(b"<1896.697170952@postoffice.reston.mci.net>")
    assert answer == b"tim b913a602c7eda7a495b4e6e7334d3890"
    assert encode_response(answer) == "dGltIGI5MTNhNjAyYzdlZGE3YTQ5NWI0ZTZlNzMzNGQzODkw"
    assert client.done
    with pytest.raises(InvalidChallenge):
        client.respond(b"<again@example>")


def test_cram_md5_rfc4954_example() -> None:
    # RFC 4954 §4.1 shows the challenge as it goes on the wire.
    challenge = decode_challenge("PDQxOTI5NDIzNDEuMTI4Mjg0NzJAc291cmNlZm91ci5hbmRyZXcuY211LmVkdT4=")
    assert challenge == b"<4192942341.12828472@sourcefour.andrew.cmu.edu>"
    client = SASLClient(Authentication("rjs3", "secret", Mechanism.CRAM_MD5))
    digest = hmac.new(b"secret", challenge, hashlib.md5).hexdigest()
    assert client.respond(challenge) == b"rjs3 " + digest.encode()


def test_cram_md5_refuses_an_empty_challenge() -> None:
    client = SASLClient(Authentication("tim", "x", Mechanism.CRAM_MD5))
    with pytest.raises(InvalidChallenge, match="empty"):
        client.respond(b"")


# -- XOAUTH2 and OAUTHBEARER ----------------------------------------------------------------------

GOOGLE_TOKEN = "ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg"
RFC7628_TOKEN = "vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg=="


def test_xoauth2_initial_response() -> None:
    # The example of Google's XOAUTH2 documentation.
    client = SASLClient(
        Authentication("someuser@example.com", token=GOOGLE_TOKEN), Mechanism.XOAUTH2
    )
    assert client.auth_command() == (
        "AUTH XOAUTH2 dXNlcj1zb21ldXNlckBleGFtcGxlLmNvbQFhdXRoPUJlYXJlciB5YTI5LnZGOWRmdDRxbVRjMk52"
        "YjNSbGNrQmhkSFJoZG1semRHRXVZMjl0Q2cBAQ=="
    )
    assert client.initial() == (
        b"user=someuser@example.com\x01auth=Bearer " + GOOGLE_TOKEN.encode() + b"\x01\x01"
    )
    assert not client.done
    client.check_success()


def test_oauthbearer_initial_response_rfc7628() -> None:
    # RFC 7628 §4.1.
    client = SASLClient(
        Authentication("user@example.com", token=RFC7628_TOKEN, mechanism=Mechanism.OAUTHBEARER),
        host="server.example.com",
        port=143,
    )
    assert client.initial() == (
        b"n,a=user@example.com,\x01host=server.example.com\x01port=143\x01"
        b"auth=Bearer vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==\x01\x01"
    )
    assert encode_initial(client.initial() or b"") == (
        "bixhPXVzZXJAZXhhbXBsZS5jb20sAWhvc3Q9c2VydmVyLmV4YW1wbGUuY29tAXBvcnQ9MTQzAWF1dGg9QmVhcmVy"
        "IHZGOWRmdDRxbVRjMk52YjNSbGNrQmhiSFJoZG1semRHRXVZMjl0Q2c9PQEB"
    )


def test_oauthbearer_without_host_and_port() -> None:
    client = SASLClient(Authentication("user@example.com", token="t0k"), Mechanism.OAUTHBEARER)
    assert client.initial() == b"n,a=user@example.com,\x01auth=Bearer t0k\x01\x01"
    only_port = SASLClient(Authentication("u", token="t"), Mechanism.OAUTHBEARER, port=587)
    assert only_port.initial() == b"n,a=u,\x01port=587\x01auth=Bearer t\x01\x01"


def test_oauthbearer_escapes_the_authzid() -> None:
    client = SASLClient(Authentication("a,b=c", token="t"), Mechanism.OAUTHBEARER)
    assert client.initial() == b"n,a=a=2Cb=3Dc,\x01auth=Bearer t\x01\x01"


def test_oauthbearer_refuses_a_host_that_breaks_the_framing() -> None:
    with pytest.raises(UsageError, match="host"):
        SASLClient(Authentication("u", token="t"), Mechanism.OAUTHBEARER, host="a\x01b")


# RFC 7628 §4.3 (failed exchange, in SMTP).
RFC7628_ERROR = (
    "eyJzdGF0dXMiOiJpbnZhbGlkX3Rva2VuIiwic2NoZW1lcyI6ImJlYXJlciBtYWMiLCJzY29wZSI6Imh0dHBzOi8v"
    "bWFpbC5leGFtcGxlLmNvbS8ifQ=="
)
# Google's XOAUTH2 documentation.
GOOGLE_ERROR = (
    "eyJzdGF0dXMiOiI0MDEiLCJzY2hlbWVzIjoiYmVhcmVyIG1hYyIsInNjb3BlIjoiaHR0cHM6Ly9tYWls"
    "Lmdvb2dsZS5jb20vIn0K"
)


@pytest.mark.parametrize(
    ("mechanism", "challenge", "answer", "line", "status"),
    [
        (Mechanism.OAUTHBEARER, RFC7628_ERROR, b"\x01", "AQ==", "invalid_token"),
        (Mechanism.XOAUTH2, GOOGLE_ERROR, b"", "", "401"),
    ],
)
def test_oauth_error_is_acknowledged_and_kept(
    mechanism: Mechanism, challenge: str, answer: bytes, line: str, status: str
) -> None:
    client = SASLClient(Authentication("user@example.com", token="tok"), mechanism)
    client.auth_command()
    response = client.respond(decode_challenge(challenge))
    assert response == answer
    assert encode_response(response) == line
    assert client.done
    assert client.server_error is not None
    assert json.loads(client.server_error)["status"] == status
    # The server then refuses (535); should it claim success instead, it is not believed.
    with pytest.raises(InvalidChallenge, match="after reporting an error"):
        client.check_success()
    with pytest.raises(InvalidChallenge):
        client.respond(b"{}")


@pytest.mark.parametrize("mechanism", [Mechanism.XOAUTH2, Mechanism.OAUTHBEARER])
def test_oauth_repeats_an_ignored_initial_response_once(mechanism: Mechanism) -> None:
    client = SASLClient(Authentication("u", token="t"), mechanism)
    first = client.initial()
    assert client.respond(b"") == first
    assert client.respond(b'{"status":"401"}') in (b"", b"\x01")
    assert client.server_error == '{"status":"401"}'


def test_oauth_error_that_is_not_json_is_kept_as_text() -> None:
    client = SASLClient(Authentication("u", token="t"), Mechanism.XOAUTH2)
    client.initial()
    assert client.respond(b"go away \xff") == b""
    assert client.server_error == "go away \ufffd"


# -- SASLprep (RFC 4013) --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "prepared"),
    [
        ("I\u00adX", "IX"),  # RFC 4013 §3 #1: SOFT HYPHEN mapped to nothing
        ("user", "user"),  # #2
        ("USER", "USER"),  # #3: case preserved
        ("\u00aa", "a"),  # #4: NFKC
        ("\u2168", "IX"),  # #5: NFKC
        ("a\u00a0b", "a b"),  # non-ASCII space mapped to SPACE
        ("a\u2003b\u3000c", "a b c"),
        ("x\u200by\ufeffz", "xyz"),  # more "commonly mapped to nothing"
        ("\ufb01", "fi"),
        ("", ""),
        ("\u0627\u0031\u0628", "\u0627\u0031\u0628"),  # RTL with a digit: fine
    ],
)
def test_saslprep(text: str, prepared: str) -> None:
    assert saslprep(text) == prepared


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("\u0007", "control"),  # RFC 4013 §3 #6
        ("\u0627\u0031", "bidi"),  # #7: bidi check
        ("\u0627a\u0628", "bidi"),  # right-to-left mixed with left-to-right
        ("a\u0627", "bidi"),
        ("a\x7fb", "control"),
        ("\ue000", "private use"),
        ("\ufdd0", "non-char"),
        ("\ufffd", "non-plaintext"),
        ("\u2ff0", "canonical"),
        ("\u200e", "display"),
        ("\U000e0001", "tagged"),
        ("\U0001f600", "unassigned"),
    ],
)
def test_saslprep_prohibits(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        saslprep(text)


# -- SCRAM-SHA-256 -----------------------------------------------------------------------------


def test_scram_rfc7677_vector() -> None:
    client = scram_client()
    assert client.auth_command() == "AUTH SCRAM-SHA-256 " + encode_initial(RFC7677_CLIENT_FIRST)
    assert client.initial() == RFC7677_CLIENT_FIRST
    assert not client.done
    assert client.respond(RFC7677_SERVER_FIRST) == RFC7677_CLIENT_FINAL
    assert not client.done
    with pytest.raises(InvalidChallenge, match="without proving"):
        client.check_success()  # a 235 before the server's signature
    assert client.respond(RFC7677_SERVER_FINAL) == b""
    assert client.done
    assert client.server_error is None
    client.check_success()
    with pytest.raises(InvalidChallenge, match="after the last response"):
        client.respond(RFC7677_SERVER_FINAL)


@pytest.mark.parametrize(
    "server_final",
    [
        b"v=6rriTRBi23WpRR/wtup+mMhK1ZrL2o7hx5mF2QYPD+U=",
        b"v=" + base64.b64encode(b"\x00" * 32),
        b"v=",
        b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4",  # truncated
    ],
)
def test_scram_wrong_server_signature(server_final: bytes) -> None:
    client = scram_client()
    client.initial()
    client.respond(RFC7677_SERVER_FIRST)
    with pytest.raises(InvalidChallenge) as info:
        client.respond(server_final)
    assert info.value.step is Step.AUTH
    assert not client.done
    with pytest.raises(InvalidChallenge):
        client.check_success()


@pytest.mark.parametrize(
    ("server_final", "match"),
    [
        (b"", "Malformed"),
        (b"x=1", "Expected the attribute str to be one of \\['v\\*', 'e\\*'\\]"),
        (b"r=abc", "Expected the attribute str"),
        (b"v=*not*base64*", "base 64"),
        (b"\xff\xfe", "UTF-8"),
        (b"junk", "Malformed"),
    ],
)
def test_scram_malformed_server_final(server_final: bytes, match: str) -> None:
    client = scram_client()
    client.initial()
    client.respond(RFC7677_SERVER_FIRST)
    with pytest.raises(InvalidChallenge, match=match):
        client.respond(server_final)


def test_scram_server_final_with_extensions() -> None:
    client = scram_client()
    client.initial()
    client.respond(RFC7677_SERVER_FIRST)
    assert client.respond(RFC7677_SERVER_FINAL + b",x=later") == b""
    client.check_success()


@pytest.mark.parametrize("error", ["invalid-proof", "unknown-user", "other-error"])
def test_scram_server_error_in_server_final(error: str) -> None:
    client = scram_client()
    client.initial()
    client.respond(RFC7677_SERVER_FIRST)
    assert client.respond(f"e={error}".encode()) == b""
    assert client.server_error == error
    assert client.done
    with pytest.raises(InvalidChallenge):
        client.check_success()


def test_scram_server_error_in_server_first() -> None:
    client = scram_client()
    client.initial()
    assert client.respond(b"e=unknown-user") == b""
    assert client.server_error == "unknown-user"
    with pytest.raises(InvalidChallenge):
        client.check_success()


@pytest.mark.parametrize(
    "nonce",
    [
        "somebodyElsesNonce%srv",  # does not extend ours
        RFC7677_NONCE,  # the server added nothing
        "xrOprNGfwEbeRWgbNEkqO",
        "rOprNGfwEbeRWgbNEkq",  # shorter
    ],
)
def test_scram_nonce_must_extend_the_clients(nonce: str) -> None:
    client = scram_client()
    client.initial()
    with pytest.raises(InvalidChallenge, match=r"(?i)nonce"):
        client.respond(server_first(nonce=nonce))


def test_scram_nonce_characters() -> None:
    client = scram_client()
    client.initial()
    with pytest.raises(InvalidChallenge, match="Nonce contains invalid characters"):
        client.respond(server_first(nonce=RFC7677_NONCE + "a b"))


@pytest.mark.parametrize(
    ("count", "refusal"),
    [
        ("4096", None),
        ("4095", "must not be < 4096"),
        ("1", "must not be < 4096"),
        ("0", "must not begin with a zero"),
        ("04096", "must not begin with a zero"),
        ("-4096", "only contain ASCII digits"),
        ("4096.0", "only contain ASCII digits"),
        ("", "must at least one character"),
        ("\u0664\u0660\u0669\u0666", "only contain ASCII digits"),  # Arabic-Indic digits
        ("1000000", None),
        ("1000001", "iteration count 1000001 is above 1000000"),
        ("10000000000000000000000", "must not be > "),
    ],
)
def test_scram_iteration_bounds(count: str, refusal: str | None) -> None:
    assert MIN_SCRAM_ITERATIONS == 4096
    assert MAX_SCRAM_ITERATIONS == 1_000_000
    client = scram_client()
    client.initial()
    challenge = server_first(i=count)
    if refusal is None:
        assert client.respond(challenge).startswith(b"c=biws,r=")
    else:
        with pytest.raises(InvalidChallenge, match=refusal):
            client.respond(challenge)


def test_scram_iteration_bounds_can_be_set() -> None:
    client = scram_client(min_iterations=5000, max_iterations=6000)
    client.initial()
    assert client.respond(server_first(i="5500")).startswith(b"c=biws,")
    for count, match in (("4096", "below 5000"), ("6001", "above 6000")):
        strict = scram_client(min_iterations=5000, max_iterations=6000)
        strict.initial()
        with pytest.raises(InvalidChallenge, match=match):
            strict.respond(server_first(i=count))


@pytest.mark.parametrize(("low", "high"), [(1, 10), (4095, 10_000), (5000, 4999)])
def test_scram_iteration_bounds_below_the_floor_are_refused(low: int, high: int) -> None:
    # scramp never accepts fewer than 4096 iterations, so neither can the bounds.
    with pytest.raises(UsageError, match="iteration bounds"):
        scram_client(min_iterations=low, max_iterations=high)


def test_scram_short_salt_is_refused() -> None:
    # scramp's rule: a salt under 12 octets gives too little protection.
    client = scram_client()
    client.initial()
    with pytest.raises(InvalidChallenge, match="at least 12 bytes"):
        client.respond(server_first(salt=base64.b64encode(b"salt").decode()))


@pytest.mark.parametrize(
    ("message", "match"),
    [
        (b"m=ext,r=rOprNGfwEbeRWgbNEkqOs,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096", "'m' attribute"),
        (b"s=W22ZaJ0SNY7soEsUEjb6gQ==,r=rOprNGfwEbeRWgbNEkqOs,i=4096", "found 'sri'"),
        (b"r=rOprNGfwEbeRWgbNEkqOs,s=W22ZaJ0SNY7soEsUEjb6gQ==", "found 'rs'"),
        (b"r=rOprNGfwEbeRWgbNEkqOs,s=*,i=4096", "base 64"),
        (b"r=rOprNGfwEbeRWgbNEkqOs,s=,i=4096", "must at least one character"),
        (b"r=rOprNGfwEbeRWgbNEkqOs,,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096", "Malformed"),
        (b"rOprNGfwEbeRWgbNEkqOs", "Malformed"),
        (b"", "Malformed"),
        (b"\xc3", "UTF-8"),
    ],
)
def test_scram_malformed_server_first(message: bytes, match: str) -> None:
    client = scram_client()
    client.initial()
    with pytest.raises(InvalidChallenge, match=match):
        client.respond(message)


def test_scram_server_first_extensions_are_ignored() -> None:
    client = scram_client()
    client.initial()
    assert client.respond(server_first() + b",x=whatever").startswith(b"c=biws,")


def test_scram_username_is_escaped_and_prepared() -> None:
    assert scram_client("a,b=c").initial() == b"n,,n=a=2Cb=3Dc,r=rOprNGfwEbeRWgbNEkqO"
    assert scram_client("I\u00adX").initial() == b"n,,n=IX,r=rOprNGfwEbeRWgbNEkqO"
    assert scram_client("\u2168").initial() == b"n,,n=IX,r=rOprNGfwEbeRWgbNEkqO"
    assert scram_client("jörg").initial() == "n,,n=jörg,r=rOprNGfwEbeRWgbNEkqO".encode()


def test_scram_password_is_prepared() -> None:
    # "\u2168" (ROMAN NUMERAL NINE) and "I\u00adX" both prepare to "IX".
    proofs = set()
    for password in ("IX", "\u2168", "I\u00adX"):
        client = scram_client(password=password)
        client.initial()
        proofs.add(client.respond(RFC7677_SERVER_FIRST))
    assert len(proofs) == 1


def test_scram_nonce_is_random_by_default() -> None:
    nonces = set()
    for _ in range(20):
        client = SASLClient(Authentication("user", "pencil", SCRAM))
        first = (client.initial() or b"").decode()
        match = re.fullmatch(r"n,,n=user,r=([A-Za-z0-9_-]+)", first)
        assert match is not None
        assert len(match[1]) >= 24
        nonces.add(match[1])
    assert len(nonces) == 20


@pytest.mark.parametrize("nonce", ["", "a,b", "a b", "é"])
def test_scram_injected_nonce_is_checked(nonce: str) -> None:
    with pytest.raises(UsageError, match="nonce"):
        scram_client(client_nonce=nonce)


# -- SCRAM end to end, against servers that share no code with the client ----------------------


class RFCScramServer:
    """The server side of SCRAM-SHA-256, written from RFC 5802 §3 and §5 (tests only).

    Credentials are ASCII, for which SASLprep changes nothing.
    """

    def __init__(
        self,
        users: dict[str, str],
        *,
        salt: bytes = b"pepper and salt",
        iterations: int = 4096,
        server_nonce: str = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0",
    ) -> None:
        self.users = users
        self.salt = salt
        self.iterations = iterations
        self.server_nonce = server_nonce
        self.authenticated: str | None = None

    @staticmethod
    def _hmac(key: bytes, data: bytes) -> bytes:
        return hmac.new(key, data, "sha256").digest()

    def first(self, message: bytes) -> bytes:
        match = re.fullmatch(r"n,,(n=([^,]*),r=([\x21-\x2b\x2d-\x7e]+))", message.decode())
        assert match is not None, message
        self.client_first_bare = match[1]
        self.user = re.sub("=2C|=3D", lambda m: {"=2C": ",", "=3D": "="}[m[0]], match[2])
        self.nonce = match[3] + self.server_nonce
        salt = base64.b64encode(self.salt).decode()
        self.server_first = f"r={self.nonce},s={salt},i={self.iterations}"
        return self.server_first.encode()

    def final(self, message: bytes) -> bytes:
        match = re.fullmatch(r"(c=([^,]*),r=([^,]*)),p=([^,]*)", message.decode())
        assert match is not None, message
        assert base64.b64decode(match[2]) == b"n,,"
        assert match[3] == self.nonce
        password = self.users.get(self.user)
        if password is None:
            return b"e=unknown-user"
        salted = hashlib.pbkdf2_hmac("sha256", password.encode(), self.salt, self.iterations)
        stored_key = hashlib.sha256(self._hmac(salted, b"Client Key")).digest()
        auth_message = f"{self.client_first_bare},{self.server_first},{match[1]}".encode()
        client_signature = self._hmac(stored_key, auth_message)
        proof = base64.b64decode(match[4])
        client_key = bytes(a ^ b for a, b in zip(proof, client_signature, strict=True))
        if hashlib.sha256(client_key).digest() != stored_key:
            return b"e=invalid-proof"
        self.authenticated = self.user
        server_key = self._hmac(salted, b"Server Key")
        return b"v=" + base64.b64encode(self._hmac(server_key, auth_message))


def smtp_exchange(
    client: SASLClient, steps: list[Callable[[bytes], bytes]]
) -> tuple[str, str | None]:
    """Run *client* against server *steps* with RFC 4954 framing, as the machine will.

    Each step takes the client's last response and gives the next challenge.
    Returns ``("235", None)``, or the outcome and the server error.
    """
    line = client.auth_command()
    words = line.split(" ")
    if len(words) == 3:
        response = b"" if words[2] == "=" else base64.b64decode(words[2])
    else:
        response = client.respond(decode_challenge(""))
    for step in steps:
        challenge = step(response)
        if challenge.startswith(b"e="):
            answer = client.respond(decode_challenge(encode_response(challenge)))
            assert encode_response(answer) == ""
            return "535", client.server_error
        answer = client.respond(decode_challenge(encode_response(challenge)))
        response = base64.b64decode(encode_response(answer))
    client.check_success()
    return "235", None


def test_scram_against_the_rfc_server() -> None:
    server = RFCScramServer({"user": "pencil"})
    assert smtp_exchange(scram_client(), [server.first, server.final]) == ("235", None)
    assert server.authenticated == "user"


def test_scram_wrong_password_against_the_rfc_server() -> None:
    server = RFCScramServer({"user": "pencil"})
    outcome = smtp_exchange(scram_client(password="pen"), [server.first, server.final])
    assert outcome == ("535", "invalid-proof")
    assert server.authenticated is None


def test_scram_against_a_server_that_does_not_know_the_password() -> None:
    # An impostor that accepts any proof cannot produce the right signature.
    server = RFCScramServer({"user": "not the password"})

    def impostor(message: bytes) -> bytes:
        server.final(message)
        return b"v=" + base64.b64encode(b"\x42" * 32)

    with pytest.raises(InvalidChallenge, match="server signature doesn't match"):
        smtp_exchange(scram_client(), [server.first, impostor])


ASCII_CREDENTIAL = st.text(
    alphabet=st.sampled_from(string.ascii_letters + string.digits + string.punctuation + " "),
    min_size=1,
    max_size=30,
)


@settings(max_examples=40, deadline=None)
@given(
    user=ASCII_CREDENTIAL,
    password=ASCII_CREDENTIAL,
    nonce=st.text(st.sampled_from(string.ascii_letters + "+/=-_!~"), min_size=1, max_size=40),
    server_nonce=st.text(st.sampled_from(string.ascii_letters + ",+"), min_size=1, max_size=20),
    salt=st.binary(min_size=12, max_size=32),  # scramp's shortest
    iterations=st.integers(4096, 5000),
)
def test_scram_end_to_end_property(
    user: str, password: str, nonce: str, server_nonce: str, salt: bytes, iterations: int
) -> None:
    server_nonce = server_nonce.replace(",", "")  # commas never appear in a nonce
    server = RFCScramServer(
        {user: password}, salt=salt, iterations=iterations, server_nonce=server_nonce or "s"
    )
    client = scram_client(user, password, client_nonce=nonce)
    assert smtp_exchange(client, [server.first, server.final]) == ("235", None)
    assert server.authenticated == user


# scramp's server as a peer (the client is scramp's too, but its server code is another path).


def scramp_server(users: dict[str, str], iterations: int = 4096) -> Any:
    mechanism = scramp.ScramMechanism("SCRAM-SHA-256")
    infos = {
        user: mechanism.make_auth_info(pw, iteration_count=iterations) for user, pw in users.items()
    }
    return mechanism.make_server(lambda user: infos[user])


def scramp_steps(server: Any) -> list[Callable[[bytes], bytes]]:
    def first(message: bytes) -> bytes:
        server.set_client_first(message.decode())
        return str(server.get_server_first()).encode()

    def final(message: bytes) -> bytes:
        with contextlib.suppress(scramp.ScramException):
            server.set_client_final(message.decode())
        return str(server.get_server_final()).encode()

    return [first, final]


@pytest.mark.parametrize(
    ("user", "password"),
    [
        ("user", "pencil"),
        ("jörg@example.com", "pâss wörd"),
        ("\u2168", "\u2168\u00ad"),  # SASLprep on both sides
        ("a,b=c", "p=,"),
        ("u", "密码\u00a0ok"),
    ],
)
def test_scram_against_scramp(user: str, password: str) -> None:
    prepared_user = saslprep(user)
    server = scramp_server({prepared_user: password})  # scramp unescapes n=
    client = SASLClient(Authentication(user, password, SCRAM))
    assert smtp_exchange(client, scramp_steps(server)) == ("235", None)


def test_scram_wrong_password_against_scramp() -> None:
    server = scramp_server({"user": "pencil"})
    client = SASLClient(Authentication("user", "pen", SCRAM))
    assert smtp_exchange(client, scramp_steps(server)) == ("535", "invalid-proof")


def test_scram_against_scramp_with_many_iterations() -> None:
    server = scramp_server({"user": "pencil"}, iterations=100_000)
    client = SASLClient(Authentication("user", "pencil", SCRAM))
    assert smtp_exchange(client, scramp_steps(server)) == ("235", None)
