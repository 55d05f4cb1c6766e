# mypy: disable-error-code="comparison-overlap"
# (the machine changes state between assertions; mypy narrows as if it could not)
"""The sans-I/O client machine, driven by scripted server replies.

Each test feeds server bytes to a :class:`ClientMachine` and checks the exact
bytes it writes and the events it emits; no reactor, no sockets.
"""

from __future__ import annotations

import base64
from collections.abc import Callable

import pytest

from txcolombe.client.machine import (
    BodyWanted,
    ClientMachine,
    Closed,
    Envelope,
    Event,
    Ready,
    SessionFailed,
    StartTLS,
    State,
    TLSMode,
    TransactionDone,
    TransactionRefused,
)
from txcolombe.codec import errors
from txcolombe.codec.address import Mailbox, parse_recipient, parse_sender
from txcolombe.codec.errors import Step
from txcolombe.codec.reply import Reply
from txcolombe.codec.sasl import Authentication, Mechanism

NAME = "client.example"
EHLO = b"EHLO client.example\r\n"
QUIT = b"QUIT\r\n"
RSET = b"RSET\r\n"
DATA = b"DATA\r\n"


# -- helpers --------------------------------------------------------------------------------------


def wire(code: int, *lines: str) -> bytes:
    return Reply.of(code, *lines).to_bytes()


def ehlo_reply(*keywords: str) -> bytes:
    return wire(250, "mx.example greets client.example", *keywords)


class Conversation:
    """A machine and what it said: feed replies, collect (sent bytes, events)."""

    def __init__(self, **kwargs: object) -> None:
        self.trace: list[tuple[str, str]] = []
        self.machine = ClientMachine(
            NAME,
            trace=lambda direction, line: self.trace.append((direction, line)),
            **kwargs,  # type: ignore[arg-type]
        )
        self.sent = b""  # everything ever written, for "never sent" checks

    def flush(self) -> tuple[bytes, list[Event]]:
        data = self.machine.data_to_send()
        self.sent += data
        events = []
        while (event := self.machine.next_event()) is not None:
            events.append(event)
        return data, events

    def feed(self, data: bytes) -> tuple[bytes, list[Event]]:
        self.machine.receive_data(data)
        return self.flush()

    def reply(self, code: int, *lines: str) -> tuple[bytes, list[Event]]:
        return self.feed(wire(code, *lines))

    def do(self, action: Callable[[], object]) -> tuple[bytes, list[Event]]:
        action()
        return self.flush()

    @property
    def waiting_for(self) -> Step | None:
        return self.machine.waiting_for

    @property
    def state(self) -> State:
        return self.machine.state


def session(*keywords: str, tls: TLSMode = TLSMode.NONE, **kwargs: object) -> Conversation:
    """A conversation set up and ready, the EHLO reply advertising ``keywords``."""
    conv = Conversation(tls=tls, **kwargs)
    assert conv.reply(220, "mx.example ESMTP") == (EHLO, [])
    sent, events = conv.feed(ehlo_reply(*keywords))
    assert sent == b""
    assert len(events) == 1
    assert isinstance(events[0], Ready)
    assert conv.state is State.READY
    assert conv.waiting_for is None
    return conv


def envelope(
    *recipients: str, sender: str | None = "from@example.org", **kwargs: object
) -> Envelope:
    return Envelope(
        parse_sender(sender),
        tuple(parse_recipient(r) for r in recipients or ("to@example.org",)),
        **kwargs,  # type: ignore[arg-type]
    )


def only(events: list[Event], kind: type[Event]) -> Event:
    assert len(events) == 1, events
    assert isinstance(events[0], kind), events
    return events[0]


def session_failure(events: list[Event], error: type[errors.SMTPError]) -> errors.SMTPError:
    """The error of a SessionFailed that is the first event."""
    assert events, "no event"
    assert isinstance(events[0], SessionFailed), events
    assert isinstance(events[0].error, error), events[0].error
    return events[0].error


def closed(events: list[Event], clean: bool) -> None:
    assert isinstance(events[-1], Closed), events
    assert events[-1].clean is clean


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


PLAIN_USER_PASS = b64(b"\0user\0pass")


def refused_before_sending(conv: Conversation, env: Envelope) -> errors.SMTPError:
    """Queue ``env``: nothing is sent, and its TransactionRefused comes at once."""
    handle = conv.machine.start_transaction(env)
    sent, events = conv.flush()
    assert sent == b""
    failed = only(events, TransactionRefused)
    assert isinstance(failed, TransactionRefused)
    assert failed.handle == handle
    return failed.error


def send_message(conv: Conversation, body: bytes = b"Subject: hi\r\n\r\nhello\r\n") -> None:
    """From BodyWanted to the end-of-data marker."""
    conv.machine.send_body(body)
    conv.machine.end_body()


# -- greeting -------------------------------------------------------------------------------------


def test_starts_waiting_for_the_greeting() -> None:
    conv = Conversation()
    assert conv.waiting_for is Step.GREETING
    assert conv.flush() == (b"", [])


def test_greeting_220_sends_ehlo() -> None:
    conv = Conversation()
    assert conv.reply(220, "mx.example ESMTP") == (EHLO, [])
    assert conv.waiting_for is Step.EHLO
    assert conv.trace == [("<", "220 mx.example ESMTP"), (">", "EHLO client.example")]


def test_multi_line_greeting() -> None:
    conv = Conversation()
    assert conv.feed(b"220-mx.example\r\n220-welcome\r\n220 go\r\n") == (EHLO, [])


def test_greeting_split_across_feeds() -> None:
    conv = Conversation()
    assert conv.feed(b"22") == (b"", [])
    assert conv.feed(b"0 mx.example\r") == (b"", [])
    assert conv.feed(b"\n") == (EHLO, [])


def test_greeting_554_fails_then_quits() -> None:
    conv = Conversation()
    sent, events = conv.reply(554, "5.7.1 no SMTP service here")
    assert sent == QUIT
    error = session_failure(events, errors.TransactionFailed)
    assert len(events) == 1
    assert error.step is Step.GREETING
    assert error.code == 554
    assert conv.waiting_for is Step.QUIT
    assert conv.reply(221, "bye") == (b"", [Closed(clean=True)])
    assert conv.state is State.CLOSED


def test_greeting_421_closes_without_quit() -> None:
    conv = Conversation()
    sent, events = conv.reply(421, "4.3.2 too busy")
    assert sent == b""
    error = session_failure(events, errors.ServiceUnavailable)
    assert error.step is Step.GREETING
    assert error.temporary
    assert events[1:] == [Closed(clean=False)]
    assert conv.waiting_for is None


# -- EHLO and HELO --------------------------------------------------------------------------------


def test_ehlo_learns_extensions() -> None:
    conv = session("PIPELINING", "SIZE 1000", "8BITMIME", "AUTH PLAIN LOGIN")
    assert conv.machine.pipelining
    assert conv.machine.extensions.size == 1000
    assert conv.machine.extensions.server_name == "mx.example"
    assert conv.machine.extensions.auth_mechanisms == {"PLAIN", "LOGIN"}


def test_ready_event_carries_extensions() -> None:
    conv = Conversation(tls=TLSMode.NONE)
    conv.reply(220, "hi")
    _, events = conv.feed(ehlo_reply("8BITMIME"))
    ready = only(events, Ready)
    assert isinstance(ready, Ready)
    assert "8BITMIME" in ready.extensions
    assert ready.tls is False


@pytest.mark.parametrize("code", [500, 502])
def test_ehlo_refused_falls_back_to_helo(code: int) -> None:
    conv = Conversation()
    conv.reply(220, "old.example")
    assert conv.reply(code, "5.5.1 what?") == (b"HELO client.example\r\n", [])
    assert conv.waiting_for is Step.HELO
    _, events = conv.reply(250, "old.example")
    ready = only(events, Ready)
    assert isinstance(ready, Ready)
    assert ready.tls is False
    assert len(ready.extensions) == 0
    assert ready.extensions.server_name == "old.example"
    assert not conv.machine.pipelining


@pytest.mark.parametrize("text", ["", " ", "  padded.example  "])
def test_helo_reply_with_odd_text(text: str) -> None:
    conv = Conversation()
    conv.reply(220, "old.example")
    conv.reply(502, "no")
    _, events = conv.feed(b"250 " + text.encode() + b"\r\n")
    ready = only(events, Ready)
    assert isinstance(ready, Ready)
    assert ready.extensions.server_name == text.strip()


def test_helo_fallback_then_transaction_is_lock_step_and_7bit() -> None:
    conv = Conversation()
    conv.reply(220, "old.example")
    conv.reply(502, "no")
    conv.reply(250, "old.example")
    sent, _ = conv.do(lambda: conv.machine.start_transaction(envelope(size=10)))
    assert sent == b"MAIL FROM:<from@example.org>\r\n"


def test_helo_fallback_only_once() -> None:
    conv = Conversation()
    conv.reply(220, "old.example")
    conv.reply(502, "no EHLO")
    sent, events = conv.reply(502, "no HELO either")
    assert sent == QUIT
    error = session_failure(events, errors.CommandRejected)
    assert error.step is Step.HELO


def test_helo_refused() -> None:
    conv = Conversation()
    conv.reply(220, "old.example")
    conv.reply(500, "no EHLO")
    sent, events = conv.reply(550, "go away")
    assert sent == QUIT
    assert session_failure(events, errors.MailboxUnavailable).step is Step.HELO


def test_ehlo_other_error_does_not_fall_back() -> None:
    conv = Conversation()
    conv.reply(220, "mx.example")
    sent, events = conv.reply(554, "5.7.1 go away")
    assert sent == QUIT
    assert session_failure(events, errors.TransactionFailed).step is Step.EHLO


def test_no_helo_fallback_when_tls_is_required() -> None:
    conv = Conversation(tls=TLSMode.REQUIRED)
    conv.reply(220, "mx.example")
    sent, events = conv.reply(502, "no EHLO")
    assert sent == QUIT
    error = session_failure(events, errors.CommandRejected)
    assert error.step is Step.EHLO
    assert b"HELO" not in conv.sent


def test_no_helo_fallback_when_authentication_is_configured() -> None:
    conv = Conversation(authentication=Authentication("user", "secret"))
    conv.reply(220, "mx.example")
    sent, events = conv.reply(502, "no EHLO")
    assert sent == QUIT
    assert session_failure(events, errors.CommandRejected).step is Step.EHLO
    assert b"HELO" not in conv.sent


def test_ehlo_421() -> None:
    conv = Conversation()
    conv.reply(220, "mx.example")
    sent, events = conv.reply(421, "shutting down")
    assert sent == b""
    assert session_failure(events, errors.ServiceUnavailable).step is Step.EHLO
    closed(events, clean=False)


# -- STARTTLS -------------------------------------------------------------------------------------


def test_opportunistic_starttls_when_offered() -> None:
    conv = Conversation()  # OPPORTUNISTIC is the default
    conv.reply(220, "mx.example")
    assert conv.feed(ehlo_reply("STARTTLS", "PIPELINING")) == (b"STARTTLS\r\n", [])
    assert conv.waiting_for is Step.STARTTLS
    assert conv.reply(220, "2.0.0 go ahead") == (b"", [StartTLS()])
    assert conv.state is State.TLS_WAIT
    assert conv.waiting_for is None
    assert conv.do(conv.machine.tls_started) == (EHLO, [])
    assert conv.waiting_for is Step.EHLO
    assert conv.machine.tls_active
    _, events = conv.feed(ehlo_reply("PIPELINING", "STARTTLS"))
    ready = only(events, Ready)
    assert isinstance(ready, Ready)
    assert ready.tls is True
    assert conv.sent.count(b"STARTTLS") == 1


def test_no_starttls_when_not_offered() -> None:
    conv = Conversation()
    conv.reply(220, "mx.example")
    sent, events = conv.feed(ehlo_reply("PIPELINING"))
    assert sent == b""
    ready = only(events, Ready)
    assert isinstance(ready, Ready)
    assert ready.tls is False
    assert not conv.machine.tls_active


def test_no_starttls_with_tls_mode_none() -> None:
    conv = Conversation(tls=TLSMode.NONE)
    conv.reply(220, "mx.example")
    sent, events = conv.feed(ehlo_reply("STARTTLS"))
    assert sent == b""
    assert isinstance(only(events, Ready), Ready)


def test_implicit_tls_never_sends_starttls() -> None:
    conv = Conversation(tls=TLSMode.IMPLICIT)
    assert conv.machine.tls_active
    conv.reply(220, "mx.example")
    sent, events = conv.feed(ehlo_reply("STARTTLS"))
    assert sent == b""
    ready = only(events, Ready)
    assert isinstance(ready, Ready)
    assert ready.tls is True


def test_starttls_required_but_not_offered() -> None:
    conv = Conversation(tls=TLSMode.REQUIRED)
    conv.reply(220, "mx.example")
    sent, events = conv.feed(ehlo_reply("PIPELINING"))
    assert sent == QUIT
    error = session_failure(events, errors.STARTTLSUnavailable)
    assert error.step is Step.STARTTLS
    assert len(events) == 1
    assert conv.reply(221, "bye") == (b"", [Closed(clean=True)])


def test_starttls_required_and_offered() -> None:
    conv = Conversation(tls=TLSMode.REQUIRED)
    conv.reply(220, "mx.example")
    assert conv.feed(ehlo_reply("STARTTLS")) == (b"STARTTLS\r\n", [])


def test_authentication_without_starttls_quits_without_auth() -> None:
    conv = Conversation(authentication=Authentication("user", "secret"))
    conv.reply(220, "mx.example")
    sent, events = conv.feed(ehlo_reply("AUTH PLAIN LOGIN"))
    assert sent == QUIT
    error = session_failure(events, errors.STARTTLSUnavailable)
    assert "authentication" in str(error)
    conv.reply(221, "bye")
    assert b"AUTH" not in conv.sent
    assert b"secret" not in conv.sent


def test_tls_mode_none_with_authentication() -> None:
    conv = Conversation(tls=TLSMode.NONE, authentication=Authentication("user", "secret"))
    conv.reply(220, "mx.example")
    sent, events = conv.feed(ehlo_reply("STARTTLS", "AUTH PLAIN"))
    assert sent == QUIT
    assert session_failure(events, errors.STARTTLSUnavailable).step is Step.STARTTLS
    assert b"AUTH" not in conv.sent
    assert b"STARTTLS" not in conv.sent


@pytest.mark.parametrize("tls", [TLSMode.OPPORTUNISTIC, TLSMode.REQUIRED])
def test_starttls_refused(tls: TLSMode) -> None:
    conv = Conversation(tls=tls)
    conv.reply(220, "mx.example")
    conv.feed(ehlo_reply("STARTTLS"))
    sent, events = conv.reply(454, "4.7.0 TLS not available")
    assert sent == QUIT
    error = session_failure(events, errors.STARTTLSRefused)
    assert error.step is Step.STARTTLS
    assert error.code == 454
    assert error.temporary


def test_starttls_injection_is_discarded() -> None:
    conv = Conversation()
    conv.reply(220, "mx.example")
    conv.feed(ehlo_reply("STARTTLS", "PIPELINING", "AUTH PLAIN", "8BITMIME"))
    sent, events = conv.feed(b"220 ok\r\n250 injected\r\n")
    assert (sent, events) == (b"", [StartTLS()])
    # Bytes that come before the handshake are dropped too.
    assert conv.feed(b"250-more injected\r\n") == (b"", [])
    assert conv.do(conv.machine.tls_started) == (EHLO, [])
    assert conv.waiting_for is Step.EHLO
    assert len(conv.machine.extensions) == 0
    # The next reply answers the new EHLO, not "250 injected".
    _, events = conv.feed(ehlo_reply("SIZE 1000"))
    ready = only(events, Ready)
    assert isinstance(ready, Ready)
    assert ready.tls is True
    assert set(ready.extensions) == {"SIZE"}
    assert ready.extensions.server_name == "mx.example"
    assert not conv.machine.pipelining
    assert "injected" not in " ".join(line for _, line in conv.trace)


def test_starttls_injected_partial_reply_is_discarded() -> None:
    conv = Conversation()
    conv.reply(220, "mx.example")
    conv.feed(ehlo_reply("STARTTLS"))
    assert conv.feed(b"220 ok\r\n250-inj") == (b"", [StartTLS()])
    conv.do(conv.machine.tls_started)
    _, events = conv.feed(ehlo_reply("8BITMIME"))
    ready = only(events, Ready)
    assert isinstance(ready, Ready)
    assert set(ready.extensions) == {"8BITMIME"}


def test_tls_started_at_the_wrong_time() -> None:
    conv = Conversation()
    with pytest.raises(errors.UsageError):
        conv.machine.tls_started()
    conv = session()
    with pytest.raises(errors.UsageError):
        conv.machine.tls_started()


# -- AUTH -----------------------------------------------------------------------------------------


def auth_session(
    authentication: Authentication, *keywords: str
) -> tuple[Conversation, bytes, list[Event]]:
    """Implicit TLS, greeted, EHLO answered: returns what the EHLO reply caused."""
    conv = Conversation(tls=TLSMode.IMPLICIT, authentication=authentication)
    conv.reply(220, "mx.example")
    sent, events = conv.feed(ehlo_reply(*(keywords or ("AUTH PLAIN LOGIN",))))
    return conv, sent, events


def test_auth_plain() -> None:
    conv, sent, events = auth_session(Authentication("user", "pass"))
    assert sent == f"AUTH PLAIN {PLAIN_USER_PASS}\r\n".encode()
    assert events == []
    assert conv.waiting_for is Step.AUTH
    sent, events = conv.reply(235, "2.7.0 ok")
    assert sent == b""
    ready = only(events, Ready)
    assert isinstance(ready, Ready)
    assert ready.tls is True
    assert conv.state is State.READY


def test_auth_after_starttls() -> None:
    conv = Conversation(authentication=Authentication("user", "pass"))
    conv.reply(220, "mx.example")
    assert conv.feed(ehlo_reply("STARTTLS")) == (b"STARTTLS\r\n", [])
    assert conv.reply(220, "go") == (b"", [StartTLS()])
    assert conv.do(conv.machine.tls_started) == (EHLO, [])
    sent, events = conv.feed(ehlo_reply("AUTH PLAIN"))
    assert sent == f"AUTH PLAIN {PLAIN_USER_PASS}\r\n".encode()
    _, events = conv.reply(235, "ok")
    assert isinstance(only(events, Ready), Ready)


def test_auth_plain_legacy_auth_equals_keyword() -> None:
    _, sent, _ = auth_session(Authentication("user", "pass"), "AUTH=PLAIN")
    assert sent.startswith(b"AUTH PLAIN ")


def test_auth_login() -> None:
    auth = Authentication("user", "pass", Mechanism.LOGIN)
    conv, sent, events = auth_session(auth)
    assert (sent, events) == (b"AUTH LOGIN\r\n", [])
    assert conv.reply(334, b64(b"Username:")) == (f"{b64(b'user')}\r\n".encode(), [])
    assert conv.waiting_for is Step.AUTH
    assert conv.reply(334, b64(b"Password:")) == (f"{b64(b'pass')}\r\n".encode(), [])
    _, events = conv.reply(235, "2.7.0 Authentication successful")
    assert isinstance(only(events, Ready), Ready)


def test_auth_login_with_empty_prompts() -> None:
    auth = Authentication("user", "pass", Mechanism.LOGIN)
    conv, _, _ = auth_session(auth)
    assert conv.feed(b"334 \r\n") == (f"{b64(b'user')}\r\n".encode(), [])
    assert conv.feed(b"334\r\n") == (f"{b64(b'pass')}\r\n".encode(), [])


def test_auth_login_third_challenge_is_invalid() -> None:
    auth = Authentication("user", "pass", Mechanism.LOGIN)
    conv, _, _ = auth_session(auth)
    conv.reply(334, b64(b"Username:"))
    conv.reply(334, b64(b"Password:"))
    sent, events = conv.reply(334, b64(b"Again:"))
    assert sent == b"*\r\nQUIT\r\n"
    assert session_failure(events, errors.InvalidChallenge).step is Step.AUTH


def test_auth_login_asking_password_first_is_invalid() -> None:
    auth = Authentication("user", "pass", Mechanism.LOGIN)
    conv, _, _ = auth_session(auth)
    sent, events = conv.reply(334, b64(b"Password:"))
    assert sent == b"*\r\nQUIT\r\n"
    session_failure(events, errors.InvalidChallenge)
    assert b64(b"pass").encode() not in conv.sent


def test_auth_utf8_credentials_plain() -> None:
    _, sent, _ = auth_session(Authentication("jörg", "密码€"))
    expected = b64("\0jörg\0密码€".encode())
    assert sent == f"AUTH PLAIN {expected}\r\n".encode()
    assert sent.isascii()


def test_auth_utf8_credentials_login() -> None:
    auth = Authentication("jörg", "密码€", Mechanism.LOGIN)
    conv, _, _ = auth_session(auth)
    assert conv.reply(334, b64(b"Username:"))[0] == f"{b64('jörg'.encode())}\r\n".encode()
    assert conv.reply(334, b64(b"Password:"))[0] == f"{b64('密码€'.encode())}\r\n".encode()


def test_auth_plain_with_empty_challenge() -> None:
    conv, _, _ = auth_session(Authentication("user", "pass"))
    sent, events = conv.feed(b"334 \r\n")
    assert (sent, events) == (f"{PLAIN_USER_PASS}\r\n".encode(), [])
    _, events = conv.reply(235, "ok")
    assert isinstance(only(events, Ready), Ready)


def test_auth_plain_with_non_empty_challenge() -> None:
    conv, _, _ = auth_session(Authentication("user", "pass"))
    sent, events = conv.reply(334, b64(b"what?"))
    assert sent == b"*\r\nQUIT\r\n"
    session_failure(events, errors.InvalidChallenge)


@pytest.mark.parametrize("challenge", ["not base64!", "abc", "====", "VXNlcm5hbWU6!", "Username:"])
def test_auth_invalid_base64_challenge(challenge: str) -> None:
    auth = Authentication("user", "pass", Mechanism.LOGIN)
    conv, _, _ = auth_session(auth)
    sent, events = conv.reply(334, challenge)
    assert sent == b"*\r\nQUIT\r\n"
    error = session_failure(events, errors.InvalidChallenge)
    assert len(events) == 1
    assert error.step is Step.AUTH
    assert error.reply is not None
    assert error.reply.code == 334
    assert conv.waiting_for is Step.QUIT  # only the QUIT grace, though "*" is answered first
    assert conv.reply(501, "5.0.0 cancelled") == (b"", [])
    assert conv.waiting_for is Step.QUIT
    assert conv.reply(221, "bye") == (b"", [Closed(clean=True)])
    assert b64(b"user").encode() not in conv.sent


@pytest.mark.parametrize(
    ("code", "error"),
    [
        (501, errors.AuthenticationRejected),
        (504, errors.UnsupportedMechanism),
        (530, errors.AuthenticationRequired),
        (534, errors.WeakMechanism),
        (535, errors.AuthenticationFailed),
        (538, errors.EncryptionRequired),
        (454, errors.TemporaryFailure),
        (554, errors.TransactionFailed),
    ],
)
@pytest.mark.parametrize("mechanism", [Mechanism.PLAIN, Mechanism.LOGIN])
def test_auth_errors(code: int, error: type[errors.SMTPError], mechanism: Mechanism) -> None:
    conv, _, _ = auth_session(Authentication("user", "pass", mechanism))
    sent, events = conv.reply(code, "no")
    assert sent == QUIT
    failure = session_failure(events, error)
    assert failure.step is Step.AUTH
    assert failure.code == code
    assert conv.reply(221, "bye") == (b"", [Closed(clean=True)])


def test_auth_error_after_login_exchange() -> None:
    conv, _, _ = auth_session(Authentication("user", "pass", Mechanism.LOGIN))
    conv.reply(334, b64(b"Username:"))
    conv.reply(334, b64(b"Password:"))
    sent, events = conv.reply(535, "5.7.8 bad credentials")
    assert sent == QUIT
    assert session_failure(events, errors.AuthenticationFailed).enhanced_status == (5, 7, 8)


@pytest.mark.parametrize("keywords", [("AUTH LOGIN",), ("AUTH CRAM-MD5 XOAUTH2",), ()])
def test_auth_mechanism_not_offered(keywords: tuple[str, ...]) -> None:
    conv = Conversation(
        tls=TLSMode.IMPLICIT, authentication=Authentication("user", "pass", Mechanism.PLAIN)
    )
    conv.reply(220, "mx.example")
    sent, events = conv.feed(ehlo_reply(*keywords))
    assert sent == QUIT
    error = session_failure(events, errors.AuthenticationUnavailable)
    assert error.step is Step.AUTH
    assert b"AUTH" not in conv.sent


def test_auth_mechanism_offered_in_lower_case() -> None:
    _, sent, _ = auth_session(Authentication("user", "pass"), "auth plain")
    assert sent.startswith(b"AUTH PLAIN ")


@pytest.mark.parametrize("mechanism", [Mechanism.PLAIN, Mechanism.LOGIN])
def test_trace_never_shows_credentials(mechanism: Mechanism) -> None:
    password = "s3cr3t-Pa55"
    conv, _, _ = auth_session(Authentication("user", password, mechanism))
    if mechanism is Mechanism.LOGIN:
        conv.reply(334, b64(b"Username:"))
        conv.reply(334, b64(b"Password:"))
    conv.reply(235, "ok")
    assert conv.state is State.READY
    secrets = [
        password,
        b64(password.encode()),
        b64(b"\0user\0" + password.encode()),
        b64(b"user"),
    ]
    # The secrets did go on the wire...
    assert any(s.encode() in conv.sent for s in secrets[1:])
    # ...but never into the trace.
    shown = [line for _, line in conv.trace]
    assert any("****" in line for line in shown)
    for line in shown:
        for secret in secrets:
            assert secret not in line


def test_trace_hides_credentials_of_plain_after_empty_challenge() -> None:
    conv, _, _ = auth_session(Authentication("user", "pass"))
    conv.feed(b"334 \r\n")
    for _, line in conv.trace:
        assert PLAIN_USER_PASS not in line


# -- transactions: lock-step ----------------------------------------------------------------------


def test_lock_step_transaction() -> None:
    conv = session()
    env = envelope("a@example.net", "b@example.net")
    sent, events = conv.do(lambda: conv.machine.start_transaction(env))
    assert (sent, events) == (b"MAIL FROM:<from@example.org>\r\n", [])
    assert conv.waiting_for is Step.MAIL
    assert conv.reply(250, "2.1.0 ok") == (b"RCPT TO:<a@example.net>\r\n", [])
    assert conv.waiting_for is Step.RCPT
    assert conv.reply(250, "2.1.5 ok") == (b"RCPT TO:<b@example.net>\r\n", [])
    assert conv.waiting_for is Step.RCPT
    assert conv.reply(250, "2.1.5 ok") == (DATA, [])
    assert conv.waiting_for is Step.DATA
    assert conv.reply(354, "go ahead") == (b"", [BodyWanted(1)])
    assert conv.waiting_for is Step.BODY
    assert conv.state is State.BODY
    assert conv.do(lambda: conv.machine.send_body(b"Subject: x\r\n\r\n.hi\r\n")) == (
        b"Subject: x\r\n\r\n..hi\r\n",
        [],
    )
    assert conv.waiting_for is Step.BODY
    assert conv.do(conv.machine.end_body) == (b".\r\n", [])
    assert conv.waiting_for is Step.DATA_END
    sent, events = conv.reply(250, "2.0.0 Ok: queued as 4XyZ12")
    assert sent == b""
    done = only(events, TransactionDone)
    assert isinstance(done, TransactionDone)
    assert set(done.accepted) == {"a@example.net", "b@example.net"}
    assert done.refused == {}
    assert done.reply.queue_id == "4XyZ12"
    assert conv.state is State.READY
    assert conv.waiting_for is None


def test_body_without_final_newline() -> None:
    conv = session()
    conv.machine.start_transaction(envelope())
    conv.reply(250, "ok")
    conv.reply(250, "ok")
    conv.reply(354, "go")
    sent, _ = conv.do(lambda: send_message(conv, b"one\ntwo"))
    assert sent == b"one\r\ntwo\r\n.\r\n"


def test_empty_body() -> None:
    conv = session()
    conv.machine.start_transaction(envelope())
    conv.reply(250, "ok")
    conv.reply(250, "ok")
    conv.reply(354, "go")
    assert conv.do(lambda: send_message(conv, b"")) == (b".\r\n", [])


def test_null_sender() -> None:
    conv = session()
    sent, _ = conv.do(lambda: conv.machine.start_transaction(envelope(sender=None)))
    assert sent == b"MAIL FROM:<>\r\n"


def test_postmaster_recipient() -> None:
    conv = session()
    conv.machine.start_transaction(envelope("Postmaster"))
    conv.flush()
    assert conv.reply(250, "ok") == (b"RCPT TO:<Postmaster>\r\n", [])


def test_trace_of_a_transaction() -> None:
    conv = session()
    conv.trace.clear()
    conv.machine.start_transaction(envelope())
    conv.reply(250, "ok")
    conv.reply(250, "ok")
    conv.reply(354, "go")
    conv.do(lambda: send_message(conv, b"abc\r\n"))
    assert conv.trace == [
        (">", "MAIL FROM:<from@example.org>"),
        ("<", "250 ok"),
        (">", "RCPT TO:<to@example.org>"),
        ("<", "250 ok"),
        (">", "DATA"),
        ("<", "354 go"),
        (">", "<8 octets of data>"),
    ]


def test_whole_transaction_fed_one_byte_at_a_time() -> None:
    conv = session()
    conv.machine.start_transaction(envelope("a@example.net"))
    conv.flush()
    script = [
        (b"250 ok\r\n", b"RCPT TO:<a@example.net>\r\n"),
        (b"250 ok\r\n", DATA),
    ]
    for reply, expected in script:
        sent = b""
        for i in range(len(reply)):
            sent += conv.feed(reply[i : i + 1])[0]
        assert sent == expected
    events: list[Event] = []
    for byte in b"354 go\r\n":
        events += conv.feed(bytes([byte]))[1]
    assert events == [BodyWanted(1)]


# -- transactions: pipelined ----------------------------------------------------------------------


def test_pipelined_transaction() -> None:
    conv = session("PIPELINING")
    env = envelope("a@example.net", "b@example.net", "c@example.net")
    sent, events = conv.do(lambda: conv.machine.start_transaction(env))
    assert events == []
    assert sent == (
        b"MAIL FROM:<from@example.org>\r\n"
        b"RCPT TO:<a@example.net>\r\n"
        b"RCPT TO:<b@example.net>\r\n"
        b"RCPT TO:<c@example.net>\r\n"
        b"DATA\r\n"
    )
    assert conv.waiting_for is Step.MAIL
    assert conv.feed(b"250 ok\r\n250 ok\r\n") == (b"", [])
    assert conv.waiting_for is Step.RCPT
    assert conv.feed(b"250 ok\r\n250 ok\r\n") == (b"", [])
    assert conv.waiting_for is Step.DATA
    assert conv.feed(b"354 go\r\n") == (b"", [BodyWanted(1)])
    conv.do(lambda: send_message(conv))
    _, events = conv.reply(250, "queued")
    done = only(events, TransactionDone)
    assert isinstance(done, TransactionDone)
    assert list(done.accepted) == ["a@example.net", "b@example.net", "c@example.net"]


def test_pipelined_replies_in_one_read() -> None:
    conv = session("PIPELINING")
    conv.machine.start_transaction(envelope("a@example.net", "b@example.net"))
    conv.flush()
    assert conv.feed(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n") == (b"", [BodyWanted(1)])


def test_pipelined_some_refused() -> None:
    conv = session("PIPELINING")
    conv.machine.start_transaction(envelope("a@example.net", "b@example.net"))
    conv.flush()
    sent, events = conv.feed(b"250 ok\r\n550 5.1.1 no such user\r\n250 ok\r\n354 go\r\n")
    assert (sent, events) == (b"", [BodyWanted(1)])
    conv.do(lambda: send_message(conv))
    _, events = conv.reply(250, "ok")
    done = only(events, TransactionDone)
    assert isinstance(done, TransactionDone)
    assert list(done.accepted) == ["b@example.net"]
    assert list(done.refused) == ["a@example.net"]
    assert done.refused["a@example.net"].enhanced_status == (5, 1, 1)


# -- MAIL parameters ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keywords", "env", "mail"),
    [
        ((), envelope(size=100), b"MAIL FROM:<from@example.org>"),
        (("8BITMIME",), envelope(), b"MAIL FROM:<from@example.org> BODY=8BITMIME"),
        (("SIZE 1000",), envelope(size=100), b"MAIL FROM:<from@example.org> SIZE=100"),
        (("SIZE 1000",), envelope(size=1000), b"MAIL FROM:<from@example.org> SIZE=1000"),
        (("SIZE",), envelope(size=10**9), b"MAIL FROM:<from@example.org> SIZE=1000000000"),
        (("SIZE 0",), envelope(size=10**9), b"MAIL FROM:<from@example.org> SIZE=1000000000"),
        (("SIZE 1000",), envelope(), b"MAIL FROM:<from@example.org>"),
        (
            ("SMTPUTF8", "8BITMIME", "SIZE 1000"),
            envelope("jörg@example.net", size=5),
            b"MAIL FROM:<from@example.org> SMTPUTF8 BODY=8BITMIME SIZE=5",
        ),
        (
            ("SMTPUTF8",),
            envelope(sender="jörg@example.org"),
            "MAIL FROM:<jörg@example.org> SMTPUTF8".encode(),
        ),
        (("SMTPUTF8",), envelope("to@bücher.example"), b"MAIL FROM:<from@example.org>"),
    ],
)
def test_mail_parameters(keywords: tuple[str, ...], env: Envelope, mail: bytes) -> None:
    conv = session(*keywords)
    sent, _ = conv.do(lambda: conv.machine.start_transaction(env))
    assert sent == mail + b"\r\n"


def test_utf8_recipient_on_the_wire() -> None:
    # SMTPUTF8 (RFC 6531): the domain goes as it was given, not as A-labels.
    conv = session("SMTPUTF8")
    conv.machine.start_transaction(envelope("jörg@bücher.example"))
    conv.flush()
    assert conv.reply(250, "ok")[0] == "RCPT TO:<jörg@bücher.example>\r\n".encode()


def test_a_unicode_domain_goes_as_a_labels_without_smtputf8() -> None:
    # An ASCII local part needs no SMTPUTF8: the domain is downgraded to A-labels.
    conv = session("SMTPUTF8")
    conv.machine.start_transaction(envelope("joerg@Bücher.example"))
    conv.flush()
    assert conv.reply(250, "ok")[0] == b"RCPT TO:<joerg@xn--bcher-kva.example>\r\n"


def test_message_too_large() -> None:
    conv = session("SIZE 1000", "PIPELINING")
    error = refused_before_sending(conv, envelope(size=1001))
    assert isinstance(error, errors.MessageTooLarge)
    assert error.step is Step.MAIL
    assert isinstance(error, errors.UsageError)
    assert conv.state is State.READY
    # The session is still usable.
    sent, _ = conv.do(lambda: conv.machine.start_transaction(envelope(size=999)))
    assert sent.startswith(b"MAIL FROM:<from@example.org> SIZE=999\r\n")


@pytest.mark.parametrize(
    "env",
    [
        envelope("jörg@example.net"),
        envelope(sender="jörg@example.org"),
        envelope("a@example.net", "用户@example.net"),
    ],
)
def test_utf8_unsupported(env: Envelope) -> None:
    conv = session("8BITMIME", "PIPELINING")
    assert isinstance(refused_before_sending(conv, env), errors.UTF8Unsupported)
    assert conv.state is State.READY


@pytest.mark.parametrize(
    ("keywords", "env", "mail"),
    [
        # BODY as the message came (a relay): 7BIT (or none) adds nothing.
        (("8BITMIME",), envelope(body_type="7BIT"), b"MAIL FROM:<from@example.org>"),
        (("8BITMIME",), envelope(body_type="8BITMIME"),
         b"MAIL FROM:<from@example.org> BODY=8BITMIME"),
        ((), envelope(body_type="8BITMIME"), b"MAIL FROM:<from@example.org>"),
        # SMTPUTF8 as the message came: said when offered, dropped when not
        # (nothing in the message needs it).
        (("SMTPUTF8",), envelope(smtputf8=True), b"MAIL FROM:<from@example.org> SMTPUTF8"),
        ((), envelope(smtputf8=True), b"MAIL FROM:<from@example.org>"),
        (("SMTPUTF8", "8BITMIME"), envelope(utf8_headers=True, body_type="7BIT"),
         b"MAIL FROM:<from@example.org> SMTPUTF8"),
    ],
)  # fmt: skip
def test_mail_parameters_passed_through(
    keywords: tuple[str, ...], env: Envelope, mail: bytes
) -> None:
    conv = session(*keywords)
    sent, _ = conv.do(lambda: conv.machine.start_transaction(env))
    assert sent == mail + b"\r\n"


def test_utf8_headers_need_smtputf8() -> None:
    """An SMTPUTF8 message whose header has UTF-8 cannot go to a server
    without SMTPUTF8 (RFC 6531 §3.2): nothing is sent for it."""
    conv = session("8BITMIME", "PIPELINING")
    error = refused_before_sending(conv, envelope(smtputf8=True, utf8_headers=True))
    assert isinstance(error, errors.UTF8Unsupported) and "UTF-8 header" in str(error)
    assert conv.state is State.READY


def test_a_send_queued_before_the_session_is_ready_waits_for_it() -> None:
    conv = Conversation()
    first = conv.machine.start_transaction(envelope())
    assert conv.flush() == (b"", [])
    assert conv.reply(220, "mx.example ESMTP") == (EHLO, [])
    sent, events = conv.feed(ehlo_reply())
    assert sent == b"MAIL FROM:<from@example.org>\r\n"
    assert isinstance(only(events, Ready), Ready)
    # Without PIPELINING the next one waits for the end of the first.
    second = conv.machine.start_transaction(envelope("b@example.org"))
    assert second != first
    assert conv.flush() == (b"", [])
    conv.reply(250, "ok")
    conv.reply(250, "ok")
    assert conv.reply(354, "go") == (b"", [BodyWanted(first)])
    send_message(conv)
    conv.flush()
    sent, events = conv.reply(250, "queued")
    assert sent == b"MAIL FROM:<from@example.org>\r\n"
    done = only(events, TransactionDone)
    assert isinstance(done, TransactionDone)
    assert done.handle == first


def test_no_send_once_quitting() -> None:
    conv = session()
    conv.machine.quit()
    with pytest.raises(errors.UsageError):
        conv.machine.start_transaction(envelope())
    assert conv.flush() == (QUIT, [])


def test_start_transaction_without_recipients() -> None:
    conv = session()
    with pytest.raises(errors.UsageError):
        conv.machine.start_transaction(Envelope(None, ()))
    assert conv.flush() == (b"", [])
    assert conv.state is State.READY


# -- refused recipients ---------------------------------------------------------------------------


def test_lock_step_some_refused() -> None:
    conv = session()
    conv.machine.start_transaction(envelope("a@example.net", "b@example.net"))
    conv.reply(250, "ok")
    assert conv.reply(550, "5.1.1 unknown")[0] == b"RCPT TO:<b@example.net>\r\n"
    assert conv.reply(250, "ok") == (DATA, [])
    conv.reply(354, "go")
    conv.do(lambda: send_message(conv))
    _, events = conv.reply(250, "ok")
    done = only(events, TransactionDone)
    assert isinstance(done, TransactionDone)
    assert list(done.accepted) == ["b@example.net"]
    assert done.refused["a@example.net"].code == 550


def test_lock_step_all_refused() -> None:
    conv = session()
    conv.machine.start_transaction(envelope("a@example.net", "b@example.net"))
    conv.reply(250, "ok")
    conv.reply(550, "5.1.1 unknown a")
    sent, events = conv.reply(450, "4.2.1 try later b")
    assert (sent, events) == (RSET, [])
    assert conv.waiting_for is Step.RSET
    sent, events = conv.reply(250, "ok")
    assert sent == b""
    failed = only(events, TransactionRefused)
    assert isinstance(failed, TransactionRefused)
    error = failed.error
    assert isinstance(error, errors.RecipientsRefused)
    assert error.step is Step.RCPT
    assert set(error.refused) == {"a@example.net", "b@example.net"}
    assert "a@example.net" in str(error)
    assert "b@example.net" in str(error)
    assert not error.temporary  # one refusal was permanent
    assert b"DATA" not in conv.sent
    assert conv.state is State.READY


def test_lock_step_all_refused_temporarily() -> None:
    conv = session()
    conv.machine.start_transaction(envelope("a@example.net"))
    conv.reply(250, "ok")
    conv.reply(450, "4.2.1 later")
    _, events = conv.reply(250, "ok")
    failed = only(events, TransactionRefused)
    assert isinstance(failed, TransactionRefused)
    assert failed.error.temporary


def test_pipelined_all_refused_data_554() -> None:
    conv = session("PIPELINING")
    conv.machine.start_transaction(envelope("a@example.net", "b@example.net"))
    conv.flush()
    sent, events = conv.feed(b"250 ok\r\n550 no a\r\n550 no b\r\n554 5.5.1 no valid recipients\r\n")
    assert (sent, events) == (RSET, [])
    _, events = conv.reply(250, "ok")
    failed = only(events, TransactionRefused)
    assert isinstance(failed, TransactionRefused)
    assert isinstance(failed.error, errors.RecipientsRefused)
    assert set(failed.error.refused) == {"a@example.net", "b@example.net"}
    assert conv.state is State.READY


def test_pipelined_all_refused_data_354() -> None:
    conv = session("PIPELINING")
    conv.machine.start_transaction(envelope("a@example.net"))
    conv.flush()
    sent, events = conv.feed(b"250 ok\r\n550 no a\r\n354 go ahead\r\n")
    # RFC 2920 §3.1: an empty message, never the body.
    assert (sent, events) == (b".\r\n", [])
    assert conv.waiting_for is Step.DATA_END
    assert conv.reply(554, "no valid recipients") == (RSET, [])
    _, events = conv.reply(250, "ok")
    failed = only(events, TransactionRefused)
    assert isinstance(failed, TransactionRefused)
    assert isinstance(failed.error, errors.RecipientsRefused)
    assert conv.state is State.READY


def test_pipelined_all_refused_data_354_then_250() -> None:
    conv = session("PIPELINING")
    conv.machine.start_transaction(envelope("a@example.net"))
    conv.flush()
    conv.feed(b"250 ok\r\n550 no a\r\n354 go ahead\r\n")
    assert conv.reply(250, "ok, nothing") == (RSET, [])
    _, events = conv.reply(250, "ok")
    failed = only(events, TransactionRefused)
    assert isinstance(failed, TransactionRefused)
    assert isinstance(failed.error, errors.RecipientsRefused)


def test_all_or_nothing_lock_step() -> None:
    conv = session()
    env = envelope("a@example.net", "b@example.net", all_or_nothing=True)
    conv.machine.start_transaction(env)
    conv.reply(250, "ok")
    conv.reply(250, "ok")
    assert conv.reply(550, "no b") == (RSET, [])
    _, events = conv.reply(250, "ok")
    failed = only(events, TransactionRefused)
    assert isinstance(failed, TransactionRefused)
    assert isinstance(failed.error, errors.RecipientsRefused)
    assert list(failed.error.refused) == ["b@example.net"]
    assert b"DATA" not in conv.sent


def test_all_or_nothing_all_accepted() -> None:
    conv = session()
    conv.machine.start_transaction(envelope("a@example.net", all_or_nothing=True))
    conv.reply(250, "ok")
    assert conv.reply(250, "ok") == (DATA, [])


def test_all_or_nothing_pipelined_holds_data_back() -> None:
    conv = session("PIPELINING")
    env = envelope("a@example.net", "b@example.net", all_or_nothing=True)
    sent, _ = conv.do(lambda: conv.machine.start_transaction(env))
    assert sent == (
        b"MAIL FROM:<from@example.org>\r\nRCPT TO:<a@example.net>\r\nRCPT TO:<b@example.net>\r\n"
    )
    assert conv.feed(b"250 ok\r\n250 ok\r\n250 ok\r\n") == (DATA, [])
    assert conv.reply(354, "go") == (b"", [BodyWanted(1)])


def test_all_or_nothing_pipelined_one_refused() -> None:
    conv = session("PIPELINING")
    env = envelope("a@example.net", "b@example.net", all_or_nothing=True)
    conv.machine.start_transaction(env)
    conv.flush()
    assert conv.feed(b"250 ok\r\n550 no a\r\n250 ok\r\n") == (RSET, [])
    _, events = conv.reply(250, "ok")
    failed = only(events, TransactionRefused)
    assert isinstance(failed, TransactionRefused)
    assert isinstance(failed.error, errors.RecipientsRefused)
    assert list(failed.error.refused) == ["a@example.net"]
    assert b"DATA" not in conv.sent


@pytest.mark.parametrize("pipelining", [False, True])
@pytest.mark.parametrize("all_or_nothing", [False, True])
def test_duplicate_recipients(pipelining: bool, all_or_nothing: bool) -> None:
    conv = session(*(["PIPELINING"] if pipelining else []))
    env = envelope("a@example.net", "a@example.net", all_or_nothing=all_or_nothing)
    conv.machine.start_transaction(env)
    conv.flush()
    conv.reply(250, "ok")
    conv.reply(250, "ok")
    conv.reply(250, "ok")
    assert conv.sent.count(b"RCPT TO:<a@example.net>\r\n") == 2
    assert conv.sent.count(DATA) == 1
    assert conv.reply(354, "go") == (b"", [BodyWanted(1)])


def test_duplicate_recipients_all_refused_pipelined() -> None:
    conv = session("PIPELINING")
    conv.machine.start_transaction(envelope("a@example.net", "a@example.net"))
    conv.flush()
    # Nobody to deliver to: the 354 gets an empty message, never the body.
    assert conv.feed(b"250 ok\r\n550 no\r\n550 no\r\n354 go\r\n") == (b".\r\n", [])
    assert conv.reply(554, "no recipients") == (RSET, [])
    _, events = conv.reply(250, "ok")
    failed = only(events, TransactionRefused)
    assert isinstance(failed, TransactionRefused)
    assert isinstance(failed.error, errors.RecipientsRefused)


# -- refused MAIL and DATA ------------------------------------------------------------------------


def test_mail_refused_lock_step() -> None:
    conv = session()
    conv.machine.start_transaction(envelope("a@example.net"))
    conv.flush()
    assert conv.reply(550, "5.7.1 sender rejected") == (RSET, [])
    assert conv.waiting_for is Step.RSET
    _, events = conv.reply(250, "ok")
    failed = only(events, TransactionRefused)
    assert isinstance(failed, TransactionRefused)
    assert isinstance(failed.error, errors.MailboxUnavailable)
    assert failed.error.step is Step.MAIL
    assert b"RCPT" not in conv.sent
    assert conv.state is State.READY


@pytest.mark.parametrize("all_or_nothing", [False, True])
def test_mail_refused_pipelined(all_or_nothing: bool) -> None:
    conv = session("PIPELINING")
    env = envelope("a@example.net", "b@example.net", all_or_nothing=all_or_nothing)
    conv.machine.start_transaction(env)
    conv.flush()
    replies = b"553 5.1.8 bad sender\r\n503 need MAIL\r\n503 need MAIL\r\n"
    if not all_or_nothing:
        replies += b"503 need MAIL\r\n"
    assert conv.feed(replies) == (RSET, [])
    assert conv.waiting_for is Step.RSET
    _, events = conv.reply(250, "ok")
    failed = only(events, TransactionRefused)
    assert isinstance(failed, TransactionRefused)
    assert isinstance(failed.error, errors.MailboxNameInvalid)
    assert failed.error.step is Step.MAIL
    assert failed.error.code == 553
    assert conv.state is State.READY
    assert conv.waiting_for is None
    # All the pipelined replies were consumed: a new transaction works.
    sent, _ = conv.do(lambda: conv.machine.start_transaction(envelope("c@example.net")))
    assert sent.startswith(b"MAIL FROM:")
    assert conv.feed(b"250 ok\r\n250 ok\r\n354 go\r\n") == (b"", [BodyWanted(2)])


def test_mail_refused_pipelined_data_354() -> None:
    conv = session("PIPELINING")
    conv.machine.start_transaction(envelope("a@example.net"))
    conv.flush()
    sent, events = conv.feed(b"550 no\r\n250 ok\r\n354 go\r\n")
    assert (sent, events) == (b".\r\n", [])
    assert conv.reply(554, "no") == (RSET, [])
    _, events = conv.reply(250, "ok")
    failed = only(events, TransactionRefused)
    assert isinstance(failed, TransactionRefused)
    assert failed.error.step is Step.MAIL


def test_data_refused() -> None:
    conv = session()
    conv.machine.start_transaction(envelope())
    conv.reply(250, "ok")
    conv.reply(250, "ok")
    assert conv.reply(554, "5.3.0 no data for you") == (RSET, [])
    _, events = conv.reply(250, "ok")
    failed = only(events, TransactionRefused)
    assert isinstance(failed, TransactionRefused)
    assert isinstance(failed.error, errors.TransactionFailed)
    assert failed.error.step is Step.DATA


def test_data_refused_pipelined() -> None:
    conv = session("PIPELINING")
    conv.machine.start_transaction(envelope())
    conv.flush()
    assert conv.feed(b"250 ok\r\n250 ok\r\n451 4.3.0 later\r\n") == (RSET, [])
    _, events = conv.reply(250, "ok")
    failed = only(events, TransactionRefused)
    assert isinstance(failed, TransactionRefused)
    assert isinstance(failed.error, errors.ProcessingError)
    assert failed.error.step is Step.DATA
    assert failed.error.temporary


@pytest.mark.parametrize(
    ("code", "error"),
    [
        (552, errors.StorageExceeded),
        (451, errors.ProcessingError),
        (554, errors.TransactionFailed),
        (550, errors.MailboxUnavailable),
    ],
)
def test_end_of_data_refused(code: int, error: type[errors.SMTPError]) -> None:
    conv = session()
    conv.machine.start_transaction(envelope())
    conv.reply(250, "ok")
    conv.reply(250, "ok")
    conv.reply(354, "go")
    conv.do(lambda: send_message(conv))
    sent, events = conv.reply(code, "refused")
    assert sent == b""  # no RSET needed after the end of data
    failed = only(events, TransactionRefused)
    assert isinstance(failed, TransactionRefused)
    assert isinstance(failed.error, error)
    assert failed.error.step is Step.DATA_END
    assert conv.state is State.READY
    assert conv.waiting_for is None


def test_second_transaction_after_a_failed_one() -> None:
    conv = session()
    conv.machine.start_transaction(envelope("a@example.net"))
    conv.reply(250, "ok")
    conv.reply(550, "no")
    _, events = conv.reply(250, "reset")
    assert isinstance(only(events, TransactionRefused), TransactionRefused)
    sent, _ = conv.do(lambda: conv.machine.start_transaction(envelope("b@example.net")))
    assert sent == b"MAIL FROM:<from@example.org>\r\n"
    assert conv.reply(250, "ok") == (b"RCPT TO:<b@example.net>\r\n", [])
    assert conv.reply(250, "ok") == (DATA, [])
    conv.reply(354, "go")
    conv.do(lambda: send_message(conv))
    _, events = conv.reply(250, "queued")
    done = only(events, TransactionDone)
    assert isinstance(done, TransactionDone)
    assert list(done.accepted) == ["b@example.net"]
    assert done.refused == {}


def test_second_transaction_after_a_successful_one() -> None:
    conv = session("PIPELINING")
    for rcpt in ("a@example.net", "b@example.net"):
        conv.machine.start_transaction(envelope(rcpt))
        sent, _ = conv.flush()
        assert f"RCPT TO:<{rcpt}>".encode() in sent
        conv.feed(b"250 ok\r\n250 ok\r\n354 go\r\n")
        conv.do(lambda: send_message(conv))
        _, events = conv.reply(250, "ok")
        assert isinstance(only(events, TransactionDone), TransactionDone)


def test_rset_refused() -> None:
    conv = session()
    conv.machine.start_transaction(envelope())
    conv.reply(550, "no")
    sent, events = conv.reply(500, "what RSET?")
    assert sent == QUIT
    assert len(events) == 2
    assert isinstance(events[0], TransactionRefused)
    assert isinstance(events[1], SessionFailed)
    assert events[1].error.step is Step.RSET


# -- 421 and unexpected replies -------------------------------------------------------------------


@pytest.mark.parametrize("pipelining", [False, True])
def test_421_mid_transaction(pipelining: bool) -> None:
    conv = session(*(["PIPELINING"] if pipelining else []))
    conv.machine.start_transaction(envelope("a@example.net", "b@example.net"))
    conv.flush()
    sent, events = conv.feed(b"250 ok\r\n421 4.3.2 shutting down\r\n")
    # Lock-step: the first RCPT went out after the MAIL reply; nothing after the 421.
    assert sent == (b"" if pipelining else b"RCPT TO:<a@example.net>\r\n")
    error = session_failure(events, errors.ServiceUnavailable)
    assert error.step is Step.RCPT
    assert error.temporary
    assert events[1:] == [Closed(clean=False)]
    assert QUIT not in conv.sent
    assert conv.state is State.CLOSED
    assert conv.waiting_for is None
    # Anything after is ignored.
    assert conv.feed(b"250 ok\r\n") == (b"", [])


def test_421_at_end_of_data() -> None:
    conv = session()
    conv.machine.start_transaction(envelope())
    conv.reply(250, "ok")
    conv.reply(250, "ok")
    conv.reply(354, "go")
    conv.do(lambda: send_message(conv))
    sent, events = conv.reply(421, "bye")
    assert sent == b""
    assert session_failure(events, errors.ServiceUnavailable).step is Step.DATA_END
    closed(events, clean=False)


def test_reply_with_nothing_pending() -> None:
    conv = session()
    sent, events = conv.reply(250, "surprise")
    assert sent == QUIT
    error = session_failure(events, errors.UnexpectedResponse)
    assert error.reply is not None
    assert error.reply.code == 250
    assert conv.reply(221, "bye") == (b"", [Closed(clean=True)])


def test_unsolicited_421() -> None:
    conv = session()
    sent, events = conv.reply(421, "4.4.2 idle too long")
    assert sent == b""
    session_failure(events, errors.ServiceUnavailable)
    assert events[1:] == [Closed(clean=False)]


def test_early_reply_during_body() -> None:
    conv = session()
    conv.machine.start_transaction(envelope())
    conv.reply(250, "ok")
    conv.reply(250, "ok")
    conv.reply(354, "go")
    conv.machine.send_body(b"partial\r\n")
    sent, events = conv.reply(554, "stop that")
    assert sent == b"partial\r\n"
    session_failure(events, errors.UnexpectedResponse)
    closed(events, clean=False)
    assert b".\r\n" not in conv.sent


@pytest.mark.parametrize("garbage", [b"hello\r\n", b"250-a\r\n251 b\r\n", b"2500 x\r\n"])
def test_malformed_reply(garbage: bytes) -> None:
    conv = session()
    conv.machine.start_transaction(envelope())
    conv.flush()
    sent, events = conv.feed(garbage)
    assert sent == b""
    error = session_failure(events, errors.MalformedReply)
    assert error.step is Step.MAIL
    assert events[1:] == [Closed(clean=False)]


def test_reply_too_long() -> None:
    conv = Conversation()
    events: list[Event] = []
    for _ in range(100):
        events += conv.feed(b"x" * 1000)[1]
        if events:
            break
    assert session_failure(events, errors.ReplyTooLong).step is Step.GREETING
    closed(events, clean=False)


# -- timeouts -------------------------------------------------------------------------------------


def at_step(step: Step) -> Conversation:
    """A conversation waiting for ``step``."""
    if step is Step.GREETING:
        conv = Conversation()
    elif step in (Step.EHLO, Step.HELO, Step.STARTTLS):
        conv = Conversation()
        conv.reply(220, "mx.example")
        if step is Step.HELO:
            conv.reply(502, "no")
        elif step is Step.STARTTLS:
            conv.feed(ehlo_reply("STARTTLS"))
    elif step is Step.AUTH:
        conv, _, _ = auth_session(Authentication("user", "pass"))
    else:
        conv = session()
        conv.machine.start_transaction(envelope())
        if step is Step.RSET:
            conv.reply(550, "no")
        if step in (Step.RCPT, Step.DATA, Step.BODY, Step.DATA_END):
            conv.reply(250, "ok")
        if step in (Step.DATA, Step.BODY, Step.DATA_END):
            conv.reply(250, "ok")
        if step in (Step.BODY, Step.DATA_END):
            conv.reply(354, "go")
        if step is Step.DATA_END:
            send_message(conv)
    conv.flush()
    assert conv.waiting_for is step
    return conv


QUITTABLE = [
    Step.GREETING,
    Step.EHLO,
    Step.HELO,
    Step.STARTTLS,
    Step.AUTH,
    Step.MAIL,
    Step.RCPT,
    Step.DATA,
    Step.DATA_END,
    Step.RSET,
]


@pytest.mark.parametrize("step", QUITTABLE)
def test_timeout_quits(step: Step) -> None:
    conv = at_step(step)
    sent, events = conv.do(conv.machine.timed_out)
    assert sent == QUIT
    error = session_failure(events, errors.ResponseTimeout)
    assert len(events) == 1
    assert error.step is step
    assert error.temporary
    assert step.value in str(error)
    assert conv.state is State.QUITTING
    # Late replies to what was pending are skipped; the QUIT reply closes.
    late = b"".join(wire(250, "late") for _ in range(len(conv.machine._pending) - 1))
    assert conv.feed(late + wire(221, "bye")) == (b"", [Closed(clean=True)])


def test_timeout_in_body_aborts() -> None:
    conv = at_step(Step.BODY)
    conv.machine.send_body(b"some\r\n")
    sent, events = conv.do(conv.machine.timed_out)
    assert sent == b"some\r\n"
    error = session_failure(events, errors.ResponseTimeout)
    assert error.step is Step.BODY
    assert events[1:] == [Closed(clean=False)]
    assert QUIT not in conv.sent
    assert b".\r\n" not in conv.sent


def test_timeout_while_quitting() -> None:
    conv = session()
    assert conv.do(conv.machine.quit) == (QUIT, [])
    assert conv.waiting_for is Step.QUIT
    assert conv.do(conv.machine.timed_out) == (b"", [Closed(clean=False)])
    assert conv.state is State.CLOSED


def test_timeout_after_fatal_error_while_quitting() -> None:
    conv = at_step(Step.MAIL)
    conv.machine.timed_out()
    conv.flush()
    assert conv.do(conv.machine.timed_out) == (b"", [Closed(clean=False)])


def test_timeout_after_close_is_ignored() -> None:
    conv = session()
    conv.machine.connection_lost()
    conv.flush()
    assert conv.do(conv.machine.timed_out) == (b"", [])


# -- connection lost ------------------------------------------------------------------------------


@pytest.mark.parametrize("step", [*QUITTABLE, Step.BODY])
def test_connection_lost(step: Step) -> None:
    conv = at_step(step)
    sent, events = conv.do(conv.machine.connection_lost)
    assert sent == b""
    error = session_failure(events, errors.ConnectionLost)
    assert isinstance(error, errors.ConnectionLost)
    assert error.step is step
    assert error.maybe_delivered is (step is Step.DATA_END)
    assert error.temporary
    assert events[1:] == [Closed(clean=False)]
    assert conv.state is State.CLOSED


def test_connection_lost_when_ready() -> None:
    conv = session()
    _, events = conv.do(conv.machine.connection_lost)
    error = session_failure(events, errors.ConnectionLost)
    assert isinstance(error, errors.ConnectionLost)
    assert error.step is None
    assert not error.maybe_delivered


def test_connection_lost_with_a_known_cause() -> None:
    conv = at_step(Step.EHLO)
    cause = errors.TLSFailure("handshake failed")
    _, events = conv.do(lambda: conv.machine.connection_lost(cause))
    assert session_failure(events, errors.TLSFailure) is cause
    assert cause.step is Step.EHLO
    closed(events, clean=False)


def test_connection_lost_keeps_the_step_of_its_cause() -> None:
    conv = at_step(Step.STARTTLS)
    conv.reply(220, "go")
    cause = errors.TLSFailure("handshake failed", step=Step.TLS)
    _, events = conv.do(lambda: conv.machine.connection_lost(cause))
    assert session_failure(events, errors.TLSFailure).step is Step.TLS


def test_connection_lost_while_quitting_is_clean() -> None:
    conv = session()
    conv.machine.quit()
    conv.flush()
    assert conv.do(conv.machine.connection_lost) == (b"", [Closed(clean=True)])


def test_connection_lost_twice() -> None:
    conv = session()
    conv.machine.connection_lost()
    conv.flush()
    assert conv.do(conv.machine.connection_lost) == (b"", [])


# -- body failures --------------------------------------------------------------------------------


def test_body_line_too_long() -> None:
    conv = at_step(Step.BODY)
    sent, events = conv.do(lambda: conv.machine.send_body(b"fine\r\n"))
    assert (sent, events) == (b"fine\r\n", [])
    sent, events = conv.do(lambda: conv.machine.send_body(b"x" * 999 + b"\r\n"))
    assert sent == b""
    error = session_failure(events, errors.InvalidBody)
    assert error.step is Step.BODY
    assert events[1:] == [Closed(clean=False)]
    assert conv.state is State.CLOSED
    with pytest.raises(errors.UsageError):
        conv.machine.end_body()
    with pytest.raises(errors.UsageError):
        conv.machine.send_body(b"more")
    assert conv.flush() == (b"", [])
    assert not conv.sent.endswith(b".\r\n")
    assert b"\r\n.\r\n" not in conv.sent


def test_body_line_too_long_across_chunks() -> None:
    conv = at_step(Step.BODY)
    conv.machine.send_body(b"x" * 600)
    _, events = conv.do(lambda: conv.machine.send_body(b"x" * 600))
    session_failure(events, errors.InvalidBody)
    closed(events, clean=False)
    assert b".\r\n" not in conv.sent


def test_eight_bit_body_without_8bitmime() -> None:
    conv = at_step(Step.BODY)
    sent, events = conv.do(lambda: conv.machine.send_body("café\r\n".encode()))
    assert sent == b""
    error = session_failure(events, errors.EightBitUnsupported)
    assert error.step is Step.BODY
    assert events[1:] == [Closed(clean=False)]
    assert b".\r\n" not in conv.sent


def test_eight_bit_body_with_8bitmime() -> None:
    conv = session("8BITMIME")
    conv.machine.start_transaction(envelope())
    conv.reply(250, "ok")
    conv.reply(250, "ok")
    conv.reply(354, "go")
    body = "café\r\n".encode()
    assert conv.do(lambda: send_message(conv, body)) == (body + b".\r\n", [])


def test_body_calls_out_of_turn() -> None:
    conv = session()
    with pytest.raises(errors.UsageError):
        conv.machine.send_body(b"x")
    with pytest.raises(errors.UsageError):
        conv.machine.end_body()
    conv.machine.start_transaction(envelope())
    with pytest.raises(errors.UsageError):
        conv.machine.send_body(b"x")
    assert b"x" not in conv.flush()[0].replace(b"example", b"")


def record(conv: Conversation, events: list[Event]) -> tuple[bytes, list[Event]]:
    sent, new = Conversation.flush(conv)
    events += new
    return sent, new


# -- waiting_for ----------------------------------------------------------------------------------


def test_waiting_for_through_a_whole_session() -> None:
    auth = Authentication("user", "pass")
    conv = Conversation(authentication=auth)
    events: list[Event] = []
    conv.flush = lambda: record(conv, events)  # type: ignore[method-assign]
    seen = [conv.waiting_for]
    conv.reply(220, "mx.example")
    seen.append(conv.waiting_for)
    conv.feed(ehlo_reply("STARTTLS"))
    seen.append(conv.waiting_for)
    conv.reply(220, "go")
    seen.append(conv.waiting_for)
    conv.machine.tls_started()
    seen.append(conv.waiting_for)
    conv.feed(ehlo_reply("AUTH PLAIN"))
    seen.append(conv.waiting_for)
    conv.reply(235, "ok")
    seen.append(conv.waiting_for)
    conv.machine.start_transaction(envelope())
    seen.append(conv.waiting_for)
    conv.reply(250, "ok")
    seen.append(conv.waiting_for)
    conv.reply(250, "ok")
    seen.append(conv.waiting_for)
    conv.reply(354, "go")
    seen.append(conv.waiting_for)
    send_message(conv)
    seen.append(conv.waiting_for)
    conv.reply(250, "ok")
    seen.append(conv.waiting_for)
    conv.machine.start_transaction(envelope())
    conv.reply(550, "no")
    seen.append(conv.waiting_for)
    conv.reply(250, "ok")
    seen.append(conv.waiting_for)
    conv.machine.quit()
    seen.append(conv.waiting_for)
    conv.reply(221, "bye")
    seen.append(conv.waiting_for)
    assert seen == [
        Step.GREETING,
        Step.EHLO,
        Step.STARTTLS,
        None,  # TLS handshake: the driver's own timer
        Step.EHLO,
        Step.AUTH,
        None,
        Step.MAIL,
        Step.RCPT,
        Step.DATA,
        Step.BODY,
        Step.DATA_END,
        None,
        Step.RSET,
        None,
        Step.QUIT,
        None,
    ]
    assert [type(e) for e in events] == [
        StartTLS,
        Ready,
        BodyWanted,
        TransactionDone,
        TransactionRefused,
        Closed,
    ]


# -- quit -----------------------------------------------------------------------------------------


def test_quit() -> None:
    conv = session()
    assert conv.do(conv.machine.quit) == (QUIT, [])
    assert conv.state is State.QUITTING
    assert conv.do(conv.machine.quit) == (b"", [])  # only once
    assert conv.reply(221, "2.0.0 bye") == (b"", [Closed(clean=True)])
    assert conv.state is State.CLOSED
    assert conv.waiting_for is None
    assert conv.do(conv.machine.quit) == (b"", [])
    assert conv.feed(b"250 late\r\n") == (b"", [])


def test_quit_answered_with_an_error_still_closes() -> None:
    conv = session()
    conv.machine.quit()
    conv.flush()
    assert conv.reply(500, "eh?") == (b"", [Closed(clean=True)])


def _quit_asked_mid_body(*keywords: str, **kwargs: object) -> Conversation:
    """A pipelining session whose one send has its body to send, QUIT asked for."""
    conv = session("PIPELINING", *keywords, **kwargs)
    conv.machine.start_transaction(envelope())
    conv.flush()
    assert conv.do(conv.machine.quit) == (b"", [])
    with pytest.raises(errors.UsageError):
        conv.machine.start_transaction(envelope())  # no new send once QUIT is asked for
    assert conv.feed(b"250 ok\r\n250 ok\r\n354 go\r\n") == (b"", [BodyWanted(1)])
    conv.machine.send_body(b"hi\r\n")
    return conv


def test_quit_mid_transaction_leaves_with_the_final_dot() -> None:
    conv = _quit_asked_mid_body()
    assert conv.do(conv.machine.end_body) == (b"hi\r\n.\r\n" + QUIT, [])
    assert conv.state is State.DATA_END  # the dot's reply is still to come, and its timeout
    assert conv.waiting_for is Step.DATA_END
    sent, events = conv.reply(250, "queued")
    assert sent == b""  # QUIT is not sent twice
    assert isinstance(only(events, TransactionDone), TransactionDone)
    assert conv.state is State.QUITTING
    assert conv.reply(221, "bye") == (b"", [Closed(clean=True)])
    assert conv.sent.count(QUIT) == 1


def test_quit_with_the_dot_both_replies_in_one_read() -> None:
    conv = _quit_asked_mid_body()
    conv.do(conv.machine.end_body)
    sent, events = conv.feed(b"250 queued\r\n221 bye\r\n")
    assert sent == b""
    assert [type(event) for event in events] == [TransactionDone, Closed]
    closed(events, clean=True)


def test_quit_with_the_dot_the_message_refused() -> None:
    conv = _quit_asked_mid_body()
    conv.do(conv.machine.end_body)
    sent, events = conv.reply(554, "5.7.1 no thanks")
    assert sent == b""  # neither RSET nor a second QUIT
    refused = only(events, TransactionRefused)
    assert isinstance(refused, TransactionRefused)
    assert refused.error.reply is not None and refused.error.reply.code == 554
    assert conv.reply(221, "bye") == (b"", [Closed(clean=True)])


def test_quit_with_the_dot_no_reply_in_time() -> None:
    conv = _quit_asked_mid_body()
    conv.do(conv.machine.end_body)
    sent, events = conv.do(conv.machine.timed_out)
    assert sent == b""  # QUIT has left already
    error = session_failure(events, errors.ResponseTimeout)
    assert error.maybe_delivered
    assert conv.waiting_for is Step.QUIT
    assert conv.feed(b"250 late\r\n221 bye\r\n") == (b"", [Closed(clean=True)])


def test_quit_mid_transaction_waits_without_pipelining() -> None:
    conv = session()
    conv.machine.start_transaction(envelope())
    conv.flush()
    conv.machine.quit()
    conv.reply(250, "ok")
    conv.reply(250, "ok")
    assert conv.reply(354, "go") == (b"", [BodyWanted(1)])
    conv.machine.send_body(b"hi\r\n")
    assert conv.do(conv.machine.end_body) == (b"hi\r\n.\r\n", [])
    sent, events = conv.reply(250, "queued")
    assert sent == QUIT
    assert isinstance(only(events, TransactionDone), TransactionDone)
    assert conv.reply(221, "bye") == (b"", [Closed(clean=True)])


def test_quit_waits_for_the_last_bdat_chunk_reply() -> None:
    conv = session("PIPELINING", "CHUNKING")
    conv.machine.start_transaction(envelope())
    conv.flush()
    conv.machine.quit()
    assert conv.feed(b"250 ok\r\n250 ok\r\n") == (b"", [BodyWanted(1)])
    conv.machine.send_body(b"hi\r\n")
    assert conv.do(conv.machine.end_body) == (b"BDAT 4 LAST\r\nhi\r\n", [])
    sent, events = conv.reply(250, "queued")
    assert sent == QUIT
    assert isinstance(only(events, TransactionDone), TransactionDone)


def test_quit_leaves_with_the_last_transaction_of_a_split_send() -> None:
    conv = session("PIPELINING", max_recipients=1)
    conv.machine.start_transaction(envelope("a@example.org", "b@example.org"))
    conv.flush()
    conv.machine.quit()
    assert conv.feed(b"250 ok\r\n250 ok\r\n354 go\r\n") == (b"", [BodyWanted(1, again=True)])
    conv.machine.send_body(b"hi\r\n")
    sent, _ = conv.do(conv.machine.end_body)
    assert sent == b"hi\r\n.\r\nMAIL FROM:<from@example.org>\r\nRCPT TO:<b@example.org>\r\n" + DATA
    assert conv.feed(b"250 one\r\n250 ok\r\n250 ok\r\n354 go\r\n")[0] == b""
    conv.machine.send_body(b"hi\r\n")
    assert conv.do(conv.machine.end_body) == (b"hi\r\n.\r\n" + QUIT, [])
    sent, events = conv.reply(250, "two")
    assert sent == b""
    assert isinstance(only(events, TransactionDone), TransactionDone)
    assert conv.reply(221, "bye") == (b"", [Closed(clean=True)])


def test_next_transaction_pipelined_after_the_final_dot() -> None:
    conv = session("PIPELINING")
    conv.machine.start_transaction(envelope("a@example.org"))
    conv.flush()
    conv.feed(b"250 ok\r\n250 ok\r\n354 go\r\n")
    conv.machine.send_body(b"one\r\n")
    conv.machine.end_body()
    conv.machine.start_transaction(envelope("b@example.org"))
    sent, events = conv.flush()
    assert sent == (
        b"one\r\n.\r\nMAIL FROM:<from@example.org>\r\nRCPT TO:<b@example.org>\r\n" + DATA
    )
    assert events == []
    assert conv.waiting_for is Step.DATA_END
    sent, events = conv.feed(b"250 first queued\r\n250 ok\r\n250 ok\r\n354 go\r\n")
    assert sent == b""
    assert [type(e) for e in events] == [TransactionDone, BodyWanted]
    first = events[0]
    assert isinstance(first, TransactionDone)
    assert first.reply.text == "first queued"
    assert list(first.accepted) == ["a@example.org"]
    conv.machine.send_body(b"two")
    assert conv.do(conv.machine.end_body) == (b"two\r\n.\r\n", [])
    sent, events = conv.reply(250, "second queued")
    done = only(events, TransactionDone)
    assert isinstance(done, TransactionDone)
    assert list(done.accepted) == ["b@example.org"]
    assert conv.state is State.READY


def test_next_transaction_pipelined_after_rset() -> None:
    conv = session("PIPELINING")
    conv.machine.start_transaction(envelope("a@example.org"))
    conv.flush()
    sent, _ = conv.feed(b"550 no sender\r\n503 no\r\n503 no\r\n")
    assert sent == RSET
    conv.machine.start_transaction(envelope("b@example.org"))
    sent, _ = conv.flush()
    assert sent.startswith(b"MAIL FROM:")
    sent, events = conv.feed(b"250 reset\r\n250 ok\r\n250 ok\r\n354 go\r\n")
    assert [type(e) for e in events] == [TransactionRefused, BodyWanted]
    failed = events[0]
    assert isinstance(failed, TransactionRefused)
    assert isinstance(failed.error, errors.MailboxUnavailable)


def test_no_pipelined_start_without_pipelining() -> None:
    conv = session()
    conv.machine.start_transaction(envelope())
    conv.flush()
    conv.reply(250, "ok")
    conv.reply(250, "ok")
    conv.reply(354, "go")
    conv.machine.end_body()
    conv.flush()
    conv.machine.start_transaction(envelope("b@example.org"))
    assert conv.flush() == (b"", [])  # queued until the end of data is answered
    sent, _ = conv.reply(250, "queued")
    assert sent == b"MAIL FROM:<from@example.org>\r\n"


def test_timeout_after_final_dot_may_have_delivered() -> None:
    conv = session()
    conv.machine.start_transaction(envelope())
    conv.flush()
    conv.reply(250, "ok")
    conv.reply(250, "ok")
    conv.reply(354, "go")
    conv.machine.send_body(b"x")
    conv.machine.end_body()
    conv.flush()
    _, events = conv.do(conv.machine.timed_out)
    error = session_failure(events, errors.ResponseTimeout)
    assert error.step is Step.DATA_END
    assert isinstance(error, errors.ResponseTimeout)
    assert error.maybe_delivered


@pytest.mark.parametrize("step", [Step.GREETING, Step.BODY])
def test_quit_when_quit_cannot_be_sent(step: Step) -> None:
    conv = at_step(step)
    sent, events = conv.do(conv.machine.quit)
    assert sent == b""
    if step is Step.BODY:  # the send under way is reported failed, not forgotten
        error = session_failure(events, errors.ConnectionLost)
        assert error.step is Step.BODY
        events = events[1:]
    assert events == [Closed(clean=False)]
    assert conv.state is State.CLOSED


def test_quit_while_waiting_for_tls() -> None:
    conv = at_step(Step.STARTTLS)
    conv.reply(220, "go")
    assert conv.do(conv.machine.quit) == (b"", [Closed(clean=False)])


def test_data_after_close_is_ignored() -> None:
    conv = Conversation()
    conv.reply(421, "no")
    assert conv.feed(b"220 hello again\r\n") == (b"", [])
    assert conv.state is State.CLOSED


def test_mailbox_objects_in_envelope() -> None:
    conv = session()
    env = Envelope(Mailbox("a", "example.org"), (Mailbox("Postmaster", None),))
    sent, _ = conv.do(lambda: conv.machine.start_transaction(env))
    assert sent == b"MAIL FROM:<a@example.org>\r\n"
