"""The machine with the SASL mechanisms beyond PLAIN and LOGIN: SCRAM, OAuth, choice."""

from __future__ import annotations

import base64
import json

from tests.test_auth import RFCScramServer
from tests.test_machine import QUIT, Conversation, b64, ehlo_reply, only, session_failure
from txcolombe.client.machine import Ready, TLSMode
from txcolombe.codec import errors
from txcolombe.codec.sasl import Authentication


def start(auth: Authentication, keywords: str, **kwargs: object) -> tuple[Conversation, bytes]:
    conv = Conversation(tls=TLSMode.IMPLICIT, authentication=auth, **kwargs)
    conv.reply(220, "mx.example")
    sent, events = conv.feed(ehlo_reply(keywords))
    assert events == []
    return conv, sent


def test_scram_is_preferred_and_runs_to_ready() -> None:
    server = RFCScramServer({"user": "pencil"})
    conv, sent = start(Authentication("user", "pencil"), "AUTH PLAIN LOGIN SCRAM-SHA-256 CRAM-MD5")
    command, mechanism, initial = sent.decode().split()
    assert (command, mechanism) == ("AUTH", "SCRAM-SHA-256")
    first = server.first(base64.b64decode(initial))
    sent, events = conv.reply(334, b64(first))
    assert events == []
    final = server.final(base64.b64decode(sent.strip()))
    sent, events = conv.reply(334, b64(final))
    assert sent == b"\r\n"  # an empty continuation response is an empty line
    sent, events = conv.reply(235, "2.7.0 ok")
    assert isinstance(only(events, Ready), Ready)
    assert server.authenticated == "user"
    assert (">", "AUTH SCRAM-SHA-256 ****") in conv.trace
    assert all("pencil" not in line for _, line in conv.trace)


def test_scram_wrong_server_signature_cancels() -> None:
    server = RFCScramServer({"user": "pencil"})
    conv, sent = start(Authentication("user", "pencil"), "AUTH SCRAM-SHA-256")
    first = server.first(base64.b64decode(sent.split()[2]))
    sent, _ = conv.reply(334, b64(first))
    sent, events = conv.reply(334, b64(b"v=" + base64.b64encode(b"\0" * 32)))
    assert sent == b"*\r\n" + QUIT
    error = session_failure(events, errors.InvalidChallenge)
    assert "signature" in str(error)


def test_scram_success_without_server_signature_is_refused() -> None:
    server = RFCScramServer({"user": "pencil"})
    conv, sent = start(Authentication("user", "pencil"), "AUTH SCRAM-SHA-256")
    sent, _ = conv.reply(334, b64(server.first(base64.b64decode(sent.split()[2]))))
    sent, events = conv.reply(235, "2.7.0 trust me")
    assert sent == QUIT
    session_failure(events, errors.InvalidChallenge)


def test_xoauth2_error_goes_into_the_failure() -> None:
    conv, sent = start(Authentication("u@example.com", token="tok"), "AUTH XOAUTH2 PLAIN")
    assert sent.startswith(b"AUTH XOAUTH2 ")
    err = json.dumps({"status": "401", "schemes": "bearer"}).encode()
    sent, events = conv.reply(334, b64(err))
    assert sent == b"\r\n"
    sent, events = conv.reply(535, "5.7.8 Username and Password not accepted")
    assert sent == QUIT
    error = session_failure(events, errors.AuthenticationFailed)
    assert '"status": "401"' in str(error)


def test_oauthbearer_long_token_and_host_port() -> None:
    token = "t" * 700
    conv, sent = start(
        Authentication("u@example.com", token=token),
        "AUTH OAUTHBEARER XOAUTH2",
        server_host="smtp.example.com",
        server_port=587,
    )
    assert sent == b"AUTH OAUTHBEARER\r\n"
    sent, events = conv.reply(334, "")
    assert base64.b64decode(sent.strip()) == (
        b"n,a=u@example.com,\x01host=smtp.example.com\x01port=587\x01auth=Bearer "
        + token.encode()
        + b"\x01\x01"
    )
    sent, events = conv.reply(334, b64(b'{"status":"invalid_token"}'))
    assert sent == b"AQ==\r\n"
    _, events = conv.reply(535, "5.7.8 no")
    assert "invalid_token" in str(session_failure(events, errors.AuthenticationFailed))


def test_nothing_usable_offered() -> None:
    conv = Conversation(tls=TLSMode.IMPLICIT, authentication=Authentication("user", "pass"))
    conv.reply(220, "mx.example")
    sent, events = conv.feed(ehlo_reply("AUTH CRAM-MD5 XOAUTH2"))
    assert sent == QUIT
    error = session_failure(events, errors.AuthenticationUnavailable)
    assert "CRAM-MD5, XOAUTH2" in str(error)


def test_unresolved_token_provider_fails_cleanly() -> None:
    conv = Conversation(tls=TLSMode.IMPLICIT, authentication=Authentication("u", token=lambda: "t"))
    conv.reply(220, "mx.example")
    sent, events = conv.feed(ehlo_reply("AUTH XOAUTH2"))
    assert sent == QUIT
    session_failure(events, errors.UsageError)
