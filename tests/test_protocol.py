"""The Twisted layer (SMTPClientProtocol, Session, sendmail/submit), in memory.

Every test runs against :mod:`txcolombe.testing`'s server on a fake clock:
STARTTLS and implicit TLS are real TLS, timeouts are fake seconds, and each
test ends with no timer left on the clock and every connection closed (the
``network`` fixture checks both).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import IConsumer, IProtocolFactory, IStreamClientEndpoint
from twisted.logger import formatEvent, globalLogPublisher
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

import txcolombe
from tests.conftest import TRICKY_BODIES, on_the_wire
from tests.helpers import failure_of, result_of
from txcolombe import (
    Authentication,
    ConnectionLost,
    InvalidBody,
    MalformedReply,
    Mechanism,
    Receipt,
    RecipientsRefused,
    ResponseTimeout,
    ServiceUnavailable,
    STARTTLSRefused,
    STARTTLSUnavailable,
    Step,
    Timeouts,
    TLSFailure,
)
from txcolombe.client.body import CHUNK, body_producer
from txcolombe.codec.errors import UsageError
from txcolombe.codec.reply import Reply
from txcolombe.testing import END_OF_DATA, GREETING, MemorySMTP, MemorySMTPServer

DOMAIN = "client.example.com"
MESSAGE = b"From: a@example.com\r\nTo: b@example.org\r\nSubject: test\r\n\r\nHello.\r\n"
ALICE = Authentication("alice", "s3cret")
T = Timeouts()

# -- helpers ----------------------------------------------------------------------------------


def assert_clean(fake: MemorySMTP) -> None:
    """No timer left on the clock, no connection left open."""
    assert fake.reactor.getDelayedCalls() == []
    assert all(connection.closed for connection in fake.connections)


@pytest.fixture
def network() -> Iterator[Callable[..., MemorySMTP]]:
    """Make in-memory networks; check each is clean after the test."""
    made: list[MemorySMTP] = []

    def make(**server_options: Any) -> MemorySMTP:
        server_options.setdefault("users", {"alice": "s3cret"})
        fake = MemorySMTP(MemorySMTPServer(**server_options))
        made.append(fake)
        return fake

    yield make
    for fake in made:
        assert_clean(fake)


@pytest.fixture
def fake(network: Callable[..., MemorySMTP]) -> MemorySMTP:
    return network()


def body(fake: MemorySMTP, data: bytes = MESSAGE) -> IBodyProducer:
    # Session.send adapts bytes with Twisted's global cooperator, which runs
    # on the global reactor, not on fake.reactor: see
    # test_bytes_body_runs_on_the_given_reactor. Until then, adapt it here.
    return body_producer(data, cooperator=fake.cooperator)


def send(
    fake: MemorySMTP,
    content: Any = None,
    *,
    recipients: tuple[str, ...] = ("b@example.org",),
    destination: str = "mx.example.org",
    **options: Any,
) -> Deferred[Receipt]:
    options.setdefault("endpoint", fake.endpoint())
    options.setdefault("trust_root", fake.trust_root)
    return txcolombe.sendmail(
        destination,
        "a@example.com",
        list(recipients),
        content if content is not None else body(fake),
        domain=DOMAIN,
        reactor=fake.reactor,
        **options,
    )


class Stream:
    """A pull-stream body fed by hand: each call gives a Deferred the test fires."""

    def __init__(self) -> None:
        self.waiting: list[Deferred[bytes | None]] = []

    def __call__(self) -> Deferred[bytes | None]:
        d: Deferred[bytes | None] = Deferred()
        self.waiting.append(d)
        return d

    def feed(self, chunk: bytes | None) -> None:
        self.waiting.pop(0).callback(chunk)


@implementer(IBodyProducer)
class SpyBody:
    """Passes everything to ``inner`` and notes the producer calls."""

    def __init__(self, inner: IBodyProducer) -> None:
        self.inner = inner
        self.length = inner.length
        self.calls: list[str] = []

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        self.calls.append("start")
        return self.inner.startProducing(consumer)  # type: ignore[no-any-return]

    def pauseProducing(self) -> None:
        self.calls.append("pause")
        self.inner.pauseProducing()

    def resumeProducing(self) -> None:
        self.calls.append("resume")
        self.inner.resumeProducing()

    def stopProducing(self) -> None:
        self.calls.append("stop")
        self.inner.stopProducing()


# -- happy paths ------------------------------------------------------------------------------


def test_sendmail_through_starttls_and_auth(fake: MemorySMTP) -> None:
    d = send(fake, authentication=ALICE)
    fake.flush()
    receipt = result_of(d)
    [transaction] = fake.server.transactions
    assert transaction.data == MESSAGE
    assert transaction.tls and transaction.auth == "alice" and transaction.helo == DOMAIN
    assert transaction.sender == "a@example.com"
    assert transaction.recipients == ("b@example.org",)
    assert transaction.mail_parameters == ("BODY=8BITMIME", f"SIZE={len(MESSAGE)}")
    assert fake.server.commands[:4] == [
        f"EHLO {DOMAIN}",
        "STARTTLS",
        f"EHLO {DOMAIN}",
        "AUTH PLAIN AGFsaWNlAHMzY3JldA==",
    ]
    assert fake.server.commands[-1] == "QUIT"
    assert receipt.queue_id == transaction.queue_id
    connection = fake.connections[0]
    assert connection.closed and not connection.client.aborted  # a clean QUIT


def test_submit_on_587_requires_starttls_and_authenticates_with_login(fake: MemorySMTP) -> None:
    d = txcolombe.submit(
        "smtp.example.org",
        "a@example.com",
        ["b@example.org"],
        body(fake),
        port=587,
        domain=DOMAIN,
        trust_root=fake.trust_root,
        authentication=Authentication("alice", "s3cret", Mechanism.LOGIN),
        reactor=fake.reactor,
        endpoint=fake.endpoint(),
    )
    fake.flush()
    receipt = result_of(d)
    assert receipt.tls is not None and not receipt.tls.implicit
    assert "STARTTLS" in fake.server.commands and "AUTH LOGIN" in fake.server.commands
    assert fake.server.transactions[0].auth == "alice"


def test_submit_on_465_is_implicit_tls(fake: MemorySMTP) -> None:
    d = txcolombe.submit(
        "smtp.example.org",
        "a@example.com",
        ["b@example.org"],
        body(fake),
        domain=DOMAIN,
        trust_root=fake.trust_root,
        authentication=ALICE,
        reactor=fake.reactor,
        endpoint=fake.endpoint(implicit_tls=True),
    )
    fake.flush()
    receipt = result_of(d)
    assert receipt.tls is not None and receipt.tls.implicit
    assert "STARTTLS" not in fake.server.commands
    assert fake.server.transactions[0].tls and fake.server.transactions[0].auth == "alice"
    assert fake.connections[0].client.tcp_no_delay  # through the TLS wrapper


def test_receipt_content(fake: MemorySMTP) -> None:
    fake.server.add_responder(
        lambda command, argument: (
            Reply.of(550, "5.1.1 no such user")
            if command == "RCPT" and "nobody" in argument
            else None
        )
    )
    d = send(fake, recipients=("b@example.org", "nobody@example.org", "c@example.org"))
    fake.flush()
    receipt = result_of(d)
    assert set(receipt.accepted) == {"b@example.org", "c@example.org"}
    assert receipt.accepted["b@example.org"].code == 250
    assert list(receipt.refused) == ["nobody@example.org"]
    assert receipt.refused["nobody@example.org"].enhanced_status == (5, 1, 1)
    assert receipt.reply.code == 250
    assert receipt.queue_id == "MEM000001" == fake.server.transactions[0].queue_id
    assert receipt.tls is not None
    assert receipt.tls.version.startswith("TLSv1.") and receipt.tls.cipher
    assert not receipt.tls.implicit
    # The extensions are those advertised after STARTTLS.
    assert receipt.extensions.server_name == "mx.example.org"
    assert "STARTTLS" not in receipt.extensions
    assert receipt.extensions.auth_mechanisms == {"PLAIN", "LOGIN"}
    assert receipt.extensions.size == 10485760
    assert fake.server.transactions[0].recipients == ("b@example.org", "c@example.org")


def test_plaintext_when_starttls_is_off(fake: MemorySMTP) -> None:
    d = send(fake, starttls=False)
    fake.flush()
    receipt = result_of(d)
    assert receipt.tls is None
    assert "STARTTLS" not in fake.server.commands
    assert not fake.server.transactions[0].tls


@pytest.mark.parametrize("name", sorted(TRICKY_BODIES))
def test_tricky_bodies_arrive_byte_exact(fake: MemorySMTP, name: str) -> None:
    data = TRICKY_BODIES[name]
    d = send(fake, body(fake, data))
    fake.flush()
    result_of(d)
    assert fake.server.transactions[0].data == on_the_wire(data)


def test_untrusted_certificate_fails_tls(fake: MemorySMTP) -> None:
    d = send(fake, trust_root=None)  # the platform's roots do not know our CA
    fake.flush()
    error = failure_of(d, TLSFailure)
    assert error.step is Step.TLS and error.temporary
    assert not any(c.startswith("MAIL") for c in fake.server.commands)


def test_certificate_for_another_name_fails_tls(fake: MemorySMTP) -> None:
    d = send(fake, destination="mx.example.net")
    fake.flush()
    assert not any(c.startswith("MAIL") for c in fake.server.commands)
    error = failure_of(d, TLSFailure)
    assert error.step is Step.TLS and error.temporary
    assert "mx.example.net" in str(error)


def test_starttls_refused(fake: MemorySMTP) -> None:
    fake.server.script("STARTTLS", Reply.of(454, "4.7.0 TLS not available"))
    d = send(fake)
    fake.flush()
    error = failure_of(d, STARTTLSRefused)
    assert error.code == 454 and error.step is Step.STARTTLS
    assert fake.server.commands[-1] == "QUIT"


def test_authentication_needs_starttls(network: Callable[..., MemorySMTP]) -> None:
    fake = network(extensions=["PIPELINING", "AUTH PLAIN"], auth_without_tls=True)
    d = send(fake, authentication=ALICE)
    fake.flush()
    error = failure_of(d, STARTTLSUnavailable)
    assert error.step is Step.STARTTLS
    assert not any(c.startswith("AUTH") for c in fake.server.commands)  # never in clear


# -- timeouts -------------------------------------------------------------------------------


def quits(writes: list[bytes]) -> int:
    """How many QUITs the client wrote."""
    return sum(write.endswith(b"QUIT\r\n") for write in writes)


@pytest.mark.parametrize(
    ("command", "step", "seconds"),
    [
        (GREETING, Step.GREETING, T.greeting),
        ("EHLO", Step.EHLO, T.command),
        ("MAIL", Step.MAIL, T.mail),
        ("RCPT", Step.RCPT, T.rcpt),
        ("DATA", Step.DATA, T.data_start),
        (END_OF_DATA, Step.DATA_END, T.data_end),
    ],
)
def test_response_timeout_at_each_step(
    fake: MemorySMTP, command: str, step: Step, seconds: float
) -> None:
    fake.server.script(command, None)  # the server hangs there
    d = send(fake, starttls=False)
    fake.flush()
    connection = fake.connections[0]
    # sendmail() asks for QUIT at once: with PIPELINING it leaves with the final dot.
    quit_early = step is Step.DATA_END
    fake.advance(seconds - 1)
    assert not d.called
    assert quits(connection.client.writes) == int(quit_early)
    fake.advance(1)
    assert connection.client.writes[-1].endswith(b"QUIT\r\n")  # a polite QUIT first
    assert quits(connection.client.writes) == 1  # and only one
    assert not connection.closed
    # Which the hung server never answers. How long the client waits for it
    # is test_a_timeout_waits_for_quit_only_the_quit_grace's business.
    fake.advance(max(seconds, T.quit))
    error = failure_of(d, ResponseTimeout)
    assert error.step is step and error.temporary
    assert connection.closed and connection.client.aborted
    assert fake.server.transactions == []


@pytest.mark.parametrize(("command", "seconds"), [(GREETING, T.greeting), ("MAIL", T.mail)])
def test_a_timeout_waits_for_quit_only_the_quit_grace(
    fake: MemorySMTP, command: str, seconds: float
) -> None:
    fake.server.script(command, None)
    d = send(fake, starttls=False)
    fake.advance(seconds)
    fake.advance(T.quit)
    try:
        assert fake.connections[0].closed
        failure_of(d, ResponseTimeout)
    finally:
        fake.advance(seconds)  # let the stale timer run out: leave nothing behind
        d.addErrback(lambda _: None)


def test_timeouts_are_configurable(fake: MemorySMTP) -> None:
    fake.server.script("EHLO", None)
    d = send(fake, starttls=False, timeouts=Timeouts(command=7, quit=1))
    fake.advance(6)
    assert not d.called
    fake.advance(1)
    assert failure_of(d, ResponseTimeout).step is Step.EHLO
    fake.advance(7)
    assert fake.connections[0].closed


def test_stalled_body_times_out(fake: MemorySMTP) -> None:
    stream = Stream()
    spy = SpyBody(body_producer(stream))
    d = send(fake, spy, starttls=False)
    fake.flush()
    stream.feed(b"Subject: slow\r\n\r\n")
    fake.advance(T.data_block - 1)
    assert not d.called
    fake.advance(1)
    error = failure_of(d, ResponseTimeout)
    assert error.step is Step.BODY
    connection = fake.connections[0]
    assert connection.client.aborted and b"QUIT\r\n" not in connection.client.writes
    assert "stop" in spy.calls
    assert fake.server.transactions == []


def test_slow_but_moving_body_does_not_time_out(fake: MemorySMTP) -> None:
    stream = Stream()
    d = send(fake, stream, starttls=False)
    fake.flush()
    for n in range(4):
        fake.advance(T.data_block - 1)
        stream.feed(b"line %d\r\n" % n)
    fake.advance(T.data_block - 1)
    stream.feed(None)
    fake.flush()
    result_of(d)
    assert fake.reactor.seconds() > 4 * T.data_block
    assert fake.server.transactions[0].data == b"line 0\r\nline 1\r\nline 2\r\nline 3\r\n"


def test_quit_gets_a_grace_period(fake: MemorySMTP) -> None:
    fake.server.script("QUIT", None)
    d = send(fake, starttls=False)
    fake.flush()
    # The receipt fires on the final 250: the unanswered QUIT does not delay it.
    assert fake.server.transactions
    assert isinstance(result_of(d), Receipt)
    connection = fake.connections[0]
    assert connection.client.writes[-1].endswith(b".\r\nQUIT\r\n")  # with the final dot
    fake.advance(T.quit - 1)
    assert not connection.closed  # QUIT still waits in the background...
    fake.advance(1)
    assert connection.closed and connection.client.aborted  # ...for its grace only
    assert fake.reactor.getDelayedCalls() == []


def test_an_error_does_not_wait_for_quit_either(fake: MemorySMTP) -> None:
    fake.server.script("RCPT", Reply.of(550, "5.1.1 No such user"))
    fake.server.script("QUIT", None)
    d = send(fake, starttls=False)
    fake.flush()
    error = failure_of(d, RecipientsRefused)
    assert error.refused["b@example.org"].code == 550
    connection = fake.connections[0]
    assert connection.client.writes[-1] == b"QUIT\r\n" and not connection.closed
    fake.advance(T.quit)
    assert connection.closed
    assert fake.reactor.getDelayedCalls() == []


def test_each_rcpt_reply_restarts_the_timer(network: Callable[..., MemorySMTP]) -> None:
    fake = network(extensions=["8BITMIME"])  # no PIPELINING: one RCPT at a time
    fake.server.script("RCPT", Reply.of(250, "2.1.5 Ok, slowly"), delay=T.rcpt - 100, times=None)
    d = send(fake, recipients=("b@example.org", "c@example.org", "d@example.org"))
    for _ in range(3):
        fake.advance(T.rcpt - 100)
    fake.advance(T.quit)
    assert len(result_of(d).accepted) == 3


# -- cancellation ---------------------------------------------------------------------------


def test_cancel_while_connecting(fake: MemorySMTP) -> None:
    d = send(fake)
    d.cancel()
    failure_of(d, CancelledError)
    assert not fake.flush()
    assert fake.connections == []


def test_cancel_during_the_greeting(fake: MemorySMTP) -> None:
    fake.server.script(GREETING, None)
    d = send(fake)
    fake.flush()
    assert not d.called and len(fake.reactor.getDelayedCalls()) == 1  # the greeting timer
    d.cancel()
    fake.flush()
    failure_of(d, CancelledError)
    assert fake.connections[0].closed and fake.connections[0].client.aborted


def test_cancel_during_the_body(fake: MemorySMTP) -> None:
    stream = Stream()
    spy = SpyBody(body_producer(stream))
    d = send(fake, spy)
    fake.flush()
    stream.feed(b"Subject: x\r\n\r\nfirst part\r\n")
    fake.flush()
    assert not d.called
    d.cancel()
    fake.flush()
    failure_of(d, CancelledError)
    assert "stop" in spy.calls
    assert fake.connections[0].client.aborted
    assert fake.server.transactions == []


# -- the server goes away ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "step", "options"),
    [
        (GREETING, Step.GREETING, {"starttls": False}),
        ("EHLO", Step.EHLO, {"starttls": False}),
        ("STARTTLS", Step.STARTTLS, {}),
        ("AUTH", Step.AUTH, {"authentication": ALICE}),
        ("MAIL", Step.MAIL, {"starttls": False}),
        ("RCPT", Step.RCPT, {"starttls": False}),
        ("DATA", Step.DATA, {"starttls": False}),
        (END_OF_DATA, Step.DATA_END, {"starttls": False}),
        (END_OF_DATA, Step.DATA_END, {}),
    ],
)
def test_server_closing_at_each_step(
    fake: MemorySMTP, command: str, step: Step, options: dict[str, Any]
) -> None:
    fake.server.script(command, None, close=True)
    d = send(fake, **options)
    fake.flush()
    error = failure_of(d, ConnectionLost)
    assert error.step is step and error.temporary
    assert error.maybe_delivered is (step is Step.DATA_END)


def test_server_closing_during_the_body(fake: MemorySMTP) -> None:
    fake.server.script("DATA", Reply.of(354, "go ahead"), close=True)
    stream = Stream()
    d = send(fake, stream, starttls=False)
    fake.flush()
    error = failure_of(d, ConnectionLost)
    assert error.step is Step.BODY and not error.maybe_delivered


def test_reset_after_the_final_dot_may_have_delivered(fake: MemorySMTP) -> None:
    fake.server.script(END_OF_DATA, None, abort=True)
    d = send(fake, starttls=False)
    fake.flush()
    error = failure_of(d, ConnectionLost)
    assert error.step is Step.DATA_END
    assert error.maybe_delivered


@pytest.mark.parametrize(
    ("command", "step"),
    [
        (GREETING, Step.GREETING),
        ("EHLO", Step.EHLO),
        ("MAIL", Step.MAIL),
        ("RCPT", Step.RCPT),
        ("DATA", Step.DATA),
        (END_OF_DATA, Step.DATA_END),
    ],
)
def test_421_then_close(fake: MemorySMTP, command: str, step: Step) -> None:
    fake.server.script(command, Reply.of(421, "4.3.2 shutting down"), close=True)
    d = send(fake, starttls=False)
    fake.flush()
    error = failure_of(d, ServiceUnavailable)
    assert error.step is step and error.code == 421 and error.temporary
    assert "QUIT" not in fake.server.commands  # no QUIT after a 421


# -- a hostile or broken server ------------------------------------------------------------


def test_starttls_response_injection_is_discarded(fake: MemorySMTP) -> None:
    # The 220 and a forged EHLO reply in one plaintext write: the client must
    # not take the forged reply as the answer to its EHLO under TLS.
    fake.server.script("STARTTLS", b"220 2.0.0 Ready\r\n250-mx.example.org\r\n250 INJECTED\r\n")
    d = send(fake)
    fake.flush()
    receipt = result_of(d)
    assert receipt.tls is not None
    assert "INJECTED" not in receipt.extensions
    assert "AUTH" in receipt.extensions  # the real post-TLS EHLO reply
    assert fake.server.commands.count(f"EHLO {DOMAIN}") == 2


@pytest.mark.parametrize(
    ("command", "step"),
    [(GREETING, Step.GREETING), ("EHLO", Step.EHLO), ("MAIL", Step.MAIL)],
)
def test_garbage_reply(fake: MemorySMTP, command: str, step: Step) -> None:
    fake.server.script(command, b"garbage\r\n")
    d = send(fake, starttls=False)
    fake.flush()
    error = failure_of(d, MalformedReply)
    assert error.step is step
    assert fake.connections[0].client.aborted


# -- the body ------------------------------------------------------------------------------------


@pytest.mark.parametrize("starttls", [False, True])
def test_backpressure_pauses_the_body_while_the_server_does_not_read(
    fake: MemorySMTP, starttls: bool
) -> None:
    line = b"x" * 76 + b"\r\n"
    big = line * (4 * 1024 * 1024 // len(line))
    spy = SpyBody(body(fake, big))

    def stop_reading(command: str, argument: str) -> None:
        if command == "DATA":
            fake.connections[0].server.pauseProducing()

    fake.server.add_responder(stop_reading)
    d = send(fake, spy, starttls=starttls)
    fake.flush()
    client = fake.connections[0].client
    assert spy.calls[-1] == "pause"
    buffered = client.buffered
    assert 0 < buffered < 2 * CHUNK
    for _ in range(3):
        fake.flush()
    assert client.buffered == buffered  # the producer stays paused: no growth
    assert not d.called
    fake.connections[0].server.resumeProducing()
    fake.flush()
    assert "resume" in spy.calls
    result_of(d)
    assert fake.server.transactions[0].data == big


def test_body_that_fails_midway_sends_no_final_dot(fake: MemorySMTP) -> None:
    chunks = [b"Subject: x\r\n\r\npart one\r\n"]

    def stream() -> Deferred[bytes]:
        return succeed(chunks.pop()) if chunks else fail(OSError("disk on fire"))

    d = send(fake, stream, starttls=False)
    fake.flush()
    error = failure_of(d, InvalidBody)
    assert error.step is Step.BODY and "disk on fire" in str(error)
    assert isinstance(error.__cause__, OSError)
    connection = fake.connections[0]
    wire = b"".join(connection.client.writes)
    assert b"part one\r\n" in wire and not wire.endswith(b".\r\n")
    assert connection.client.aborted
    assert fake.server.transactions == []


# -- sessions -------------------------------------------------------------------------------------


def connect(fake: MemorySMTP, **options: Any) -> Deferred[txcolombe.Session]:
    return txcolombe.connect(
        "mx.example.org",
        domain=DOMAIN,
        trust_root=fake.trust_root,
        reactor=fake.reactor,
        endpoint=fake.endpoint(),
        **options,
    )


def test_session_runs_two_transactions_on_one_connection(fake: MemorySMTP) -> None:
    async def scenario() -> tuple[Receipt, Receipt]:
        session = await connect(fake)
        first = await session.send("a@example.com", ["b@example.org"], body(fake, b"one\r\n"))
        second = await session.send("a@example.com", "c@example.org", body(fake, b"two\r\n"))
        await session.quit()
        return first, second

    d = Deferred.fromCoroutine(scenario())
    fake.flush()
    first, second = result_of(d)
    assert len(fake.connections) == 1
    assert [t.data for t in fake.server.transactions] == [b"one\r\n", b"two\r\n"]
    assert [t.recipients for t in fake.server.transactions] == [
        ("b@example.org",),
        ("c@example.org",),
    ]
    assert first.queue_id == "MEM000001" and second.queue_id == "MEM000002"
    assert fake.server.commands.count("STARTTLS") == 1


def test_session_passes_body_and_smtputf8_through(fake: MemorySMTP) -> None:
    """body_type and smtputf8 reach MAIL FROM; without them, the default
    (BODY=8BITMIME when offered) is unchanged."""

    async def scenario() -> None:
        session = await connect(fake)
        await session.send("a@example.com", "b@example.org", body(fake), body_type="7BIT")
        await session.send("a@example.com", "b@example.org", body(fake), body_type="8BITMIME")
        await session.send("a@example.com", "b@example.org", body(fake), smtputf8=True)
        await session.send("a@example.com", "b@example.org", body(fake))
        await session.quit()

    fake.server.extensions = [*fake.server.extensions, "SMTPUTF8"]
    d = Deferred.fromCoroutine(scenario())
    fake.flush()
    result_of(d)
    params = [[p for p in t.mail_parameters if not p.startswith("SIZE=")]
              for t in fake.server.transactions]  # fmt: skip
    assert params == [[], ["BODY=8BITMIME"], ["SMTPUTF8", "BODY=8BITMIME"], ["BODY=8BITMIME"]]


def test_session_refuses_an_unknown_body_type(fake: MemorySMTP) -> None:
    d = connect(fake)
    fake.flush()
    session = result_of(d)
    error = failure_of(session.send("a@example.com", "b@example.org", b"x\r\n", body_type="8BIT"),
                       UsageError)  # fmt: skip
    assert "body_type" in str(error)
    assert not [c for c in fake.server.commands if c.startswith("MAIL")]
    session.quit()
    fake.flush()


def test_session_goes_on_after_a_failed_transaction(fake: MemorySMTP) -> None:
    fake.server.script("RCPT", Reply.of(550, "5.1.1 no such user"))
    errors: list[RecipientsRefused] = []

    async def scenario() -> Receipt:
        session = await connect(fake)
        try:
            await session.send("a@example.com", ["nobody@example.org"], body(fake, b"one\r\n"))
        except RecipientsRefused as error:
            errors.append(error)
        receipt = await session.send("a@example.com", ["b@example.org"], body(fake))
        await session.quit()
        return receipt

    d = Deferred.fromCoroutine(scenario())
    fake.flush()
    result_of(d)
    [error] = errors
    assert error.refused["nobody@example.org"].code == 550 and not error.temporary
    assert "RSET" in fake.server.commands
    assert [t.recipients for t in fake.server.transactions] == [("b@example.org",)]
    assert len(fake.connections) == 1


def test_session_async_with_quits(fake: MemorySMTP) -> None:
    async def scenario() -> txcolombe.Session:
        async with await connect(fake) as session:
            await session.send("a@example.com", ["b@example.org"], body(fake))
            assert not session.closed.called
        return session

    d = Deferred.fromCoroutine(scenario())
    fake.flush()
    session = result_of(d)
    assert session.closed.called
    assert fake.server.commands[-1] == "QUIT"
    assert not fake.connections[0].client.aborted
    assert session.tls is not None and "PIPELINING" in session.extensions


def test_session_queues_transactions_and_pipelines_them(fake: MemorySMTP) -> None:
    d = connect(fake)
    fake.flush()
    session = result_of(d)
    stream = Stream()
    first = session.send("a@example.com", ["b@example.org"], stream)
    second = session.send("a@example.com", ["c@example.org"], body(fake, b"two\r\n"))
    third = session.send("a@example.com", ["d@example.org"], body(fake, b"three\r\n"))
    fake.flush()
    assert not first.called and not second.called
    third.cancel()  # not started yet: it just leaves the queue
    failure_of(third, CancelledError)
    stream.feed(b"one\r\n")
    stream.feed(None)
    fake.flush()
    assert result_of(first).queue_id == "MEM000001"
    assert result_of(second).queue_id == "MEM000002"
    assert [t.data for t in fake.server.transactions] == [b"one\r\n", b"two\r\n"]
    # RFC 2920: the next MAIL leaves in the same write as the final dot.
    writes = fake.connections[0].client.writes
    assert any(w.startswith(b".\r\nMAIL FROM:<a@example.com>") for w in writes)
    quit = session.quit()
    fake.flush()
    assert quit.called and not fake.connections[0].client.aborted


@pytest.mark.parametrize(
    ("extensions", "options"),
    [
        (["8BITMIME"], {}),  # no PIPELINING: cancelled while a RCPT reply is due
        (["8BITMIME", "PIPELINING"], {"all_or_nothing": True}),  # DATA waits for RCPT
    ],
)
def test_cancel_before_the_body_ends_with_rset_and_keeps_the_session(
    network: Callable[..., MemorySMTP], extensions: list[str], options: dict[str, Any]
) -> None:
    fake = network(extensions=extensions)
    connecting = connect(fake, tls_mode=txcolombe.TLSMode.NONE)
    fake.flush()
    session = result_of(connecting)
    fake.server.script("RCPT", Reply.of(250, "2.1.5 Ok, slowly"), delay=5)
    first = session.send("a@example.com", ["b@example.org", "c@example.org"], b"one\r\n", **options)
    second = session.send("a@example.com", ["d@example.org"], b"two\r\n")
    fake.flush()
    assert not first.called
    first.cancel()
    failure_of(first, CancelledError)
    fake.advance(5)
    assert "RSET" in fake.server.commands and "DATA" in fake.server.commands
    assert fake.server.commands.index("RSET") < fake.server.commands.index("DATA")
    assert result_of(second).accepted.keys() == {"d@example.org"}
    assert [t.recipients for t in fake.server.transactions] == [("d@example.org",)]
    assert session.usable and not fake.connections[0].client.aborted
    quit = session.quit()
    fake.flush()
    result_of(quit)


def test_cancel_after_a_pipelined_data_still_aborts(fake: MemorySMTP) -> None:
    connecting = connect(fake, tls_mode=txcolombe.TLSMode.NONE)
    fake.flush()
    session = result_of(connecting)
    fake.server.script("DATA", Reply.of(354, "Go ahead"), delay=5)
    d = session.send("a@example.com", ["b@example.org"], b"one\r\n")
    fake.flush()
    d.cancel()  # DATA has left with MAIL and RCPT: a 354 cannot be taken back
    fake.flush()
    failure_of(d, CancelledError)
    assert fake.connections[0].client.aborted
    assert fake.server.transactions == []
    fake.advance(5)


# -- the transport --------------------------------------------------------------------------------


def test_tcp_nodelay_and_one_write_per_command_group(fake: MemorySMTP) -> None:
    d = send(fake, recipients=("b@example.org", "c@example.org"), starttls=False)
    fake.flush()
    result_of(d)
    client = fake.connections[0].client
    assert client.tcp_no_delay
    assert client.writes[:2] == [
        f"EHLO {DOMAIN}\r\n".encode(),
        b"MAIL FROM:<a@example.com> BODY=8BITMIME SIZE=%d\r\n" % len(MESSAGE)
        + b"RCPT TO:<b@example.org>\r\nRCPT TO:<c@example.org>\r\nDATA\r\n",
    ]
    # A body of one chunk leaves with its final dot, in one write, and
    # sendmail()'s QUIT with them (PIPELINING: QUIT may end a group).
    assert client.writes[-1] == MESSAGE + b".\r\nQUIT\r\n"


def test_lock_step_without_pipelining(network: Callable[..., MemorySMTP]) -> None:
    fake = network(extensions=["8BITMIME"])
    d = send(fake, recipients=("b@example.org", "c@example.org"))
    fake.flush()
    result_of(d)
    assert fake.connections[0].client.writes[1:5] == [
        b"MAIL FROM:<a@example.com> BODY=8BITMIME\r\n",
        b"RCPT TO:<b@example.org>\r\n",
        b"RCPT TO:<c@example.org>\r\n",
        b"DATA\r\n",
    ]


# -- known bugs, kept failing until fixed ----------------------------------------------------------


def test_bytes_body_runs_on_the_given_reactor(fake: MemorySMTP) -> None:
    d = send(fake, MESSAGE)
    fake.flush()
    delivered = d.called
    if not delivered:  # leave nothing behind for the other tests
        for connection in fake.connections:
            connection.client.abortConnection()
        fake.flush()
        d.addErrback(lambda _: None)
    assert delivered
    assert fake.server.transactions[0].data == MESSAGE


def test_implicit_tls_wrapper_uses_the_given_reactor(fake: MemorySMTP) -> None:
    clocks: list[object] = []

    @implementer(IStreamClientEndpoint)
    class Recording:
        def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
            clocks.append(getattr(factory, "_clock", None))
            return fake.endpoint(implicit_tls=True).connect(factory)

    d = txcolombe.submit(
        "smtp.example.org",
        "a@example.com",
        ["b@example.org"],
        body(fake),
        domain=DOMAIN,
        trust_root=fake.trust_root,
        reactor=fake.reactor,
        endpoint=Recording(),
    )
    fake.flush()
    result_of(d)
    assert clocks == [fake.reactor]


# -- large recipient lists (RFC 5321 §4.5.3.1.8, .10) ---------------------------------------


def test_a_large_recipient_list_goes_in_several_transactions_with_the_same_body(
    fake: MemorySMTP,
) -> None:
    people = tuple(f"r{i}@example.org" for i in range(250))
    line = b"y" * 76 + b"\r\n"
    big = line * (3 * CHUNK // len(line))  # streamed by the cooperator, not in one write
    d = send(fake, body(fake, big), recipients=people)
    fake.flush()
    receipt = result_of(d)
    assert len(fake.connections) == 1
    assert [len(t.recipients) for t in fake.server.transactions] == [100, 100, 50]
    assert [t.data for t in fake.server.transactions] == [big] * 3
    assert sorted(receipt.accepted) == sorted(people)
    assert receipt.refused == {}
    assert [p.queue_id for p in receipt.parts] == [t.queue_id for t in fake.server.transactions]
    assert receipt.queue_id == fake.server.transactions[0].queue_id


@pytest.mark.parametrize("refusal", ["452 4.5.3", "552 5.5.3"])
def test_too_many_recipients_go_in_the_next_transaction(fake: MemorySMTP, refusal: str) -> None:
    taken = [0]

    def limit(command: str, argument: str) -> Reply | None:
        # A server that takes 30 recipients per transaction.
        if command == "MAIL":
            taken[0] = 0
        elif command == "RCPT":
            taken[0] += 1
            if taken[0] > 30:
                code, status = refusal.split()
                return Reply.of(int(code), f"{status} Error: too many recipients")
        return None

    fake.server.add_responder(limit)
    people = tuple(f"r{i}@example.org" for i in range(100))
    d = send(fake, recipients=people)
    fake.flush()
    receipt = result_of(d)
    assert [len(t.recipients) for t in fake.server.transactions] == [30, 30, 30, 10]
    assert sorted(receipt.accepted) == sorted(people)
    assert receipt.refused == {}  # not bounced (552), not even deferred (452)
    assert len(fake.connections) == 1


def test_the_per_transaction_limit_is_an_option(fake: MemorySMTP) -> None:
    people = tuple(f"r{i}@example.org" for i in range(7))
    d = send(fake, recipients=people, max_recipients=3)
    fake.flush()
    receipt = result_of(d)
    assert [len(t.recipients) for t in fake.server.transactions] == [3, 3, 1]
    assert sorted(receipt.accepted) == sorted(people)
    assert len(fake.connections) == 1


@pytest.mark.parametrize("bad", [0, -1, True, "10"])
def test_a_wrong_per_transaction_limit_is_refused_before_connecting(
    fake: MemorySMTP, bad: Any
) -> None:
    d = send(fake, max_recipients=bad)
    with pytest.raises(UsageError, match="max_recipients"):
        result_of(d)
    assert fake.connections == []


# -- the debug trace -----------------------------------------------------------------------------


@contextlib.contextmanager
def traces() -> Iterator[list[str]]:
    """The conversation's debug events, rendered as an observer would."""
    rendered: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if "conversation" in event and event.get("log_namespace") == "txcolombe":
            rendered.append(formatEvent(event).removeprefix("mx.example.org:25 "))

    globalLogPublisher.addObserver(observe)
    try:
        yield rendered
    finally:
        globalLogPublisher.removeObserver(observe)


def test_a_message_on_its_own_connection_is_one_log_event(fake: MemorySMTP) -> None:
    with traces() as rendered:
        d = send(fake, recipients=("b@example.org", "c@example.org"), starttls=False)
        fake.flush()
        result_of(d)
    # Not an event per line or per read: QUIT left with the final dot, and
    # the replies to both came in one read, logged before the result.
    assert len(rendered) == 1, rendered
    assert [line[:6] for line in rendered[0].split(" | ")] == [
        "< 220 ",
        "> EHLO",
        "< 250 ",
        "> MAIL",
        "> RCPT",
        "> RCPT",
        "> DATA",
        "< 250 ",
        "< 250 ",
        "< 250 ",
        "< 354 ",
        "> <68 ",
        "> QUIT",
        "< 250 ",
        "< 221 ",
    ]


def test_a_session_is_logged_each_time_it_goes_idle(fake: MemorySMTP) -> None:
    with traces() as rendered:
        d = connect(fake)
        fake.flush()
        session = result_of(d)
        assert len(rendered) == 1 and rendered[0].startswith("< 220 ")  # set up
        sent = session.send("a@example.com", ["b@example.org"], body(fake, b"one\r\n"))
        fake.flush()
        result_of(sent)
        assert len(rendered) == 2 and rendered[1].startswith("> MAIL ")
        assert rendered[1].endswith("< 250 2.0.0 Ok: queued as MEM000001")
        closed = session.quit()
        fake.flush()
        result_of(closed)
    assert rendered[2:] == ["> QUIT | < 221 2.0.0 Bye"]
