"""txcolombe.testing on its own: the in-memory server, transports and network.

Most tests here talk to :class:`MemorySMTPServer` with a raw client (bytes in,
bytes out), so that what they check is the server and not txcolombe's client.
"""

from __future__ import annotations

import base64
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import optionsForClientTLS
from twisted.python.failure import Failure
from zope.interface import implementer

import txcolombe
from tests.helpers import result_of
from txcolombe.codec.errors import StorageExceeded
from txcolombe.codec.reply import Reply, ReplyParser
from txcolombe.codec.step import Step
from txcolombe.testing import (
    DEFAULT_EXTENSIONS,
    END_OF_DATA,
    GREETING,
    MemoryConnection,
    MemorySMTP,
    MemorySMTPServer,
    Response,
    Transaction,
)

# -- helpers --------------------------------------------------------------------------------


class RawClient(Protocol):
    """A client that writes what it is told and keeps what it receives."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        self.lost = reason

    def take(self) -> bytes:
        data = bytes(self.received)
        self.received.clear()
        return data

    def replies(self) -> list[Reply]:
        parser = ReplyParser()
        parser.feed(self.take())
        replies = []
        while (reply := parser.next_reply()) is not None:
            replies.append(reply)
        return replies

    def send(self, *lines: str | bytes) -> None:
        assert self.transport is not None
        self.transport.write(
            b"".join((ln.encode() if isinstance(ln, str) else ln) + b"\r\n" for ln in lines)
        )


def raw_connect(fake: MemorySMTP, **options: Any) -> tuple[RawClient, MemoryConnection]:
    client = RawClient()
    d = fake.endpoint(**options).connect(Factory.forProtocol(lambda: client))
    fake.flush()
    assert result_of(d) is client
    return client, fake.connections[-1]


def codes(replies: list[Reply]) -> list[int]:
    return [r.code for r in replies]


def b64(text: str | bytes) -> str:
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


@pytest.fixture
def fake() -> MemorySMTP:
    return MemorySMTP()


def greeted(fake: MemorySMTP) -> RawClient:
    client, _ = raw_connect(fake)
    assert codes(client.replies()) == [220]
    client.send("EHLO client.example.com")
    fake.flush()
    assert codes(client.replies()) == [250]
    return client


def deliver(fake: MemorySMTP, client: RawClient, stuffed: bytes) -> list[int]:
    client.send("MAIL FROM:<a@example.com>", "RCPT TO:<b@example.org>", "DATA")
    client.transport.write(stuffed)  # type: ignore[union-attr]
    fake.flush()
    return codes(client.replies())


# -- the conversation -----------------------------------------------------------------------


def test_greeting_and_ehlo_advertise_the_extensions(fake: MemorySMTP) -> None:
    client, _ = raw_connect(fake)
    [greeting] = client.replies()
    assert greeting.code == 220 and greeting.lines[0].startswith("mx.example.org ")
    client.send("EHLO client.example.com")
    fake.flush()
    [ehlo] = client.replies()
    assert ehlo.code == 250
    assert ehlo.lines[0] == "mx.example.org greets client.example.com"
    assert "STARTTLS" in ehlo.lines and "PIPELINING" in ehlo.lines
    # AUTH only under TLS by default
    assert not any(line.startswith("AUTH") for line in ehlo.lines)


def test_helo_and_the_simple_commands(fake: MemorySMTP) -> None:
    client, _ = raw_connect(fake)
    client.take()
    client.send("HELO client.example.com", "NOOP", "VRFY bob", "FOO bar", "RSET", "QUIT")
    fake.flush()
    replies = client.replies()
    assert codes(replies) == [250, 250, 252, 500, 250, 221]
    assert replies[0].lines == ("mx.example.org",)
    assert client.lost is not None and client.lost.check(ConnectionDone)
    assert fake.connections[0].closed


def test_commands_out_of_sequence_are_refused(fake: MemorySMTP) -> None:
    client, _ = raw_connect(fake)
    client.take()
    client.send("MAIL FROM:<a@example.com>", "EHLO c.example", "RCPT TO:<b@example.org>", "DATA")
    client.send("MAIL FROM:<a@example.com>", "DATA", "MAIL FROM:<a@example.com>", "EHLO")
    client.send("RSET", "MAIL FROM:a@example.com", "AUTH PLAIN")
    fake.flush()
    assert codes(client.replies()) == [503, 250, 503, 503, 250, 554, 503, 501, 250, 501, 503]
    assert fake.server.transactions == []


def test_pipelined_transaction_is_recorded_byte_exact(fake: MemorySMTP) -> None:
    client = greeted(fake)
    client.send("MAIL FROM:<a@example.com> BODY=8BITMIME SIZE=40", "RCPT TO:<b@example.org>")
    client.send("RCPT TO:<c@example.org> NOTIFY=NEVER", "DATA")
    client.transport.write(b"Subject: x\r\n\r\n..one\r\n.\xe9t\xe9\r\nbare\nlf\r\n.\r\n")  # type: ignore[union-attr]
    fake.flush()
    replies = client.replies()
    assert codes(replies) == [250, 250, 250, 354, 250]
    assert replies[-1].queue_id == "MEM000001"
    assert fake.server.transactions == [
        Transaction(
            sender="a@example.com",
            recipients=("b@example.org", "c@example.org"),
            data=b"Subject: x\r\n\r\n.one\r\n\xe9t\xe9\r\nbare\nlf\r\n",
            mail_parameters=("BODY=8BITMIME", "SIZE=40"),
            rcpt_parameters=((), ("NOTIFY=NEVER",)),
            tls=False,
            auth=None,
            helo="client.example.com",
            queue_id="MEM000001",
        )
    ]
    assert fake.server.transactions[0].message()["Subject"] == "x"
    assert "MAIL FROM:<a@example.com> BODY=8BITMIME SIZE=40" in fake.server.commands


def test_empty_body_and_null_sender(fake: MemorySMTP) -> None:
    client = greeted(fake)
    client.send("MAIL FROM:<>", "RCPT TO:<b@example.org>", "DATA", ".")
    fake.flush()
    assert codes(client.replies()) == [250, 250, 354, 250]
    [transaction] = fake.server.transactions
    assert transaction.sender == "" and transaction.data == b""


def test_final_dot_split_across_writes(fake: MemorySMTP) -> None:
    client = greeted(fake)
    client.send("MAIL FROM:<a@example.com>", "RCPT TO:<b@example.org>", "DATA")
    fake.flush()
    assert codes(client.replies()) == [250, 250, 354]
    for byte in b"line\r\n..\r\n.\r\n":
        client.transport.write(bytes([byte]))  # type: ignore[union-attr]
        fake.flush()
    assert codes(client.replies()) == [250]
    assert fake.server.transactions[0].data == b"line\r\n.\r\n"


_LINES = st.lists(
    st.one_of(
        st.sampled_from([b"", b".", b"..", b".x", b"x.", b"\xff"]),
        st.binary(max_size=30).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    ),
    max_size=12,
)


@settings(max_examples=60, deadline=None)
@given(lines=_LINES, cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=6))
def test_dot_unstuffing_is_exact_whatever_the_chunks(lines: list[bytes], cuts: list[int]) -> None:
    fake = MemorySMTP()
    client = greeted(fake)
    client.send("MAIL FROM:<a@example.com>", "RCPT TO:<b@example.org>", "DATA")
    body = b"".join(line + b"\r\n" for line in lines)
    stuffed = b"".join((b"." if ln.startswith(b".") else b"") + ln + b"\r\n" for ln in lines)
    stuffed += b".\r\n"
    start = 0
    for cut in [*sorted({min(c, len(stuffed)) for c in cuts}), len(stuffed)]:
        client.transport.write(stuffed[start:cut])  # type: ignore[union-attr]
        fake.flush()
        start = cut
    assert codes(client.replies())[-1] == 250
    assert [t.data for t in fake.server.transactions] == [body]


def test_size_limit() -> None:
    fake = MemorySMTP(MemorySMTPServer(extensions=["SIZE 10"]))
    client = greeted(fake)
    client.send("MAIL FROM:<a@example.com> SIZE=11")
    fake.flush()
    assert codes(client.replies()) == [552]
    assert deliver(fake, client, b"0123456789\r\n.\r\n") == [250, 250, 354, 552]
    assert fake.server.transactions == []


# -- BDAT -----------------------------------------------------------------------------------

CHUNKING = (*DEFAULT_EXTENSIONS, "CHUNKING")


def test_bdat_is_read_when_chunking_is_offered() -> None:
    fake = MemorySMTP(MemorySMTPServer(extensions=CHUNKING))
    client = greeted(fake)
    client.send("MAIL FROM:<a@example.com>", "RCPT TO:<b@example.org>")
    client.send(b"BDAT 6\r\n.dot\r\nBDAT 5 LAST\r\nend")  # send() adds a CRLF
    fake.flush()
    assert codes(client.replies()) == [250, 250, 250, 250]
    [transaction] = fake.server.transactions
    assert transaction.data == b".dot\r\nend\r\n"  # the chunks as they were sent
    assert fake.server.commands[-2:] == ["BDAT 6", "BDAT 5 LAST"]
    client.send("BDAT 3 LAST", "a", "NOOP")  # no transaction: refused, "a\r\n" read whole
    fake.flush()
    assert codes(client.replies()) == [503, 250]


def test_bdat_without_chunking_is_an_unknown_command(fake: MemorySMTP) -> None:
    client = greeted(fake)
    client.send("MAIL FROM:<a@example.com>", "RCPT TO:<b@example.org>", "BDAT 2 LAST")
    fake.flush()
    assert codes(client.replies()) == [250, 250, 500]


BIG = b"Subject: big\r\n\r\n" + b".a line of the body\r\n" * 40_000


def test_the_client_sends_bdat_to_the_memory_server() -> None:
    fake = MemorySMTP(MemorySMTPServer(extensions=CHUNKING))
    d = txcolombe.sendmail(
        "mx.example.org", "a@example.com", ["b@example.org"], BIG,
        trust_root=fake.trust_root, reactor=fake.reactor,
    )  # fmt: skip
    receipt = fake.run(d)
    transaction = fake.assert_sent(recipients=["b@example.org"], subject="big")
    assert transaction.data == BIG and receipt.queue_id == transaction.queue_id
    bdat = [c for c in fake.server.commands if c.startswith("BDAT")]
    assert len(bdat) >= 3 and bdat[-1].endswith(" LAST") and "DATA" not in fake.server.commands
    fake.assert_clean()


@pytest.mark.parametrize("times", [1, None])
def test_the_client_after_a_refused_bdat_chunk(times: int | None) -> None:
    fake = MemorySMTP(MemorySMTPServer(extensions=CHUNKING))
    fake.server.script("BDAT", Reply.of(552, "5.3.4 Message too big for me"), times=times)
    d = txcolombe.sendmail(
        "mx.example.org", "a@example.com", ["b@example.org"], BIG,
        trust_root=fake.trust_root, reactor=fake.reactor,
    )  # fmt: skip
    with pytest.raises(StorageExceeded) as caught:
        fake.run(d)
    assert caught.value.code == 552 and caught.value.step is Step.BODY
    commands = fake.server.commands
    assert commands[-2:] == ["RSET", "QUIT"]
    assert not any(c.endswith(" LAST") for c in commands)  # the body was stopped
    fake.assert_nothing_sent()
    fake.assert_clean()


# -- STARTTLS and AUTH ----------------------------------------------------------------------


def test_starttls_is_real_tls_and_resets_the_session(fake: MemorySMTP) -> None:
    client, connection = raw_connect(fake)
    client.take()
    # Bytes pipelined after STARTTLS are dropped by the server (RFC 3207).
    client.send("EHLO c.example", "STARTTLS", "NOOP")
    fake.flush()
    assert codes(client.replies()) == [250, 220]
    assert client.transport is not None
    client.transport.startTLS(  # type: ignore[attr-defined]
        optionsForClientTLS("mx.example.org", trustRoot=fake.trust_root)
    )
    client.send("MAIL FROM:<a@example.com>", "EHLO c.example")
    fake.flush()
    replies = client.replies()
    assert codes(replies) == [503, 250]  # no EHLO yet after TLS
    assert "STARTTLS" not in replies[1].lines and "AUTH PLAIN LOGIN" in replies[1].lines
    assert connection.client.tls and connection.server.tls
    assert connection.server_protocol.tls
    handle = connection.client.getHandle()
    assert handle is not None and handle.get_protocol_version_name().startswith("TLS")  # type: ignore[attr-defined]
    assert "NOOP" not in fake.server.commands  # read before TLS: discarded
    assert deliver(fake, client, b"hi\r\n.\r\n") == [250, 250, 354, 250]
    assert fake.server.transactions[0].tls


def tls_client(fake: MemorySMTP) -> RawClient:
    client = greeted(fake)
    client.send("STARTTLS")
    fake.flush()
    assert codes(client.replies()) == [220]
    client.transport.startTLS(  # type: ignore[union-attr]
        optionsForClientTLS("mx.example.org", trustRoot=fake.trust_root)
    )
    client.send("EHLO c.example")
    fake.flush()
    assert codes(client.replies()) == [250]
    return client


PLAIN_ALICE = b64(b"\x00alice\x00s3cret")
PLAIN_WRONG = b64(b"\x00alice\x00wrong")


@pytest.fixture
def users() -> MemorySMTP:
    return MemorySMTP(MemorySMTPServer(users={"alice": "s3cret"}, require_auth=True))


@pytest.mark.parametrize(
    ("lines", "expected_codes", "identity"),
    [
        ([f"AUTH PLAIN {PLAIN_ALICE}"], [235], "alice"),
        (["AUTH PLAIN", PLAIN_ALICE], [334, 235], "alice"),
        ([f"AUTH PLAIN {b64(bytes(3))}"], [501], None),
        ([f"AUTH PLAIN {PLAIN_WRONG}"], [535], None),
        (["AUTH PLAIN", "*"], [334, 501], None),
        (["AUTH PLAIN not-base64!"], [501], None),
        (["AUTH LOGIN", b64("alice"), b64("s3cret")], [334, 334, 235], "alice"),
        ([f"AUTH LOGIN {b64('alice')}", b64("s3cret")], [334, 235], "alice"),
        (["AUTH LOGIN", b64("bob"), b64("s3cret")], [334, 334, 535], None),
        (["AUTH LOGIN", b64("alice"), "*"], [334, 334, 501], None),
        (["AUTH CRAM-MD5"], [504], None),
    ],
)
def test_auth(
    users: MemorySMTP, lines: list[str], expected_codes: list[int], identity: str | None
) -> None:
    client = tls_client(users)
    client.send(*lines)
    users.flush()
    assert codes(client.replies()) == expected_codes
    assert users.server.connections[0].authenticated == identity
    # require_auth: MAIL only once authenticated
    assert deliver(users, client, b"x\r\n.\r\n")[0] == (250 if identity else 530)
    if identity:
        assert users.server.transactions[0].auth == identity


def test_auth_is_only_offered_under_tls_unless_asked(users: MemorySMTP) -> None:
    client = greeted(users)
    client.send(f"AUTH PLAIN {PLAIN_ALICE}")
    users.flush()
    assert codes(client.replies()) == [503]
    plain = MemorySMTP(MemorySMTPServer(users={"alice": "s3cret"}, auth_without_tls=True))
    client = greeted(plain)
    client.send(f"AUTH PLAIN {PLAIN_ALICE}", "AUTH LOGIN")
    plain.flush()
    assert codes(client.replies()) == [235, 503]


def test_implicit_tls_endpoint(fake: MemorySMTP) -> None:
    client = RawClient()
    factory = Factory.forProtocol(lambda: client)
    from twisted.internet.endpoints import wrapClientTLS

    tls = optionsForClientTLS("smtp.example.org", trustRoot=fake.trust_root)
    d = wrapClientTLS(tls, fake.endpoint(implicit_tls=True)).connect(factory)
    fake.flush()
    assert result_of(d) is client
    assert codes(client.replies()) == [220]
    assert fake.connections[0].server_protocol.tls
    assert fake.connections[0].server.getHost().port == 465  # type: ignore[attr-defined]
    assert fake.reactor.getDelayedCalls() == []


def test_endpoint_error_and_cancel(fake: MemorySMTP) -> None:
    d = fake.endpoint(error=ConnectionRefusedError()).connect(Factory.forProtocol(RawClient))
    assert not d.called
    fake.flush()
    with pytest.raises(ConnectionRefusedError):
        result_of(d)
    d = fake.endpoint().connect(Factory.forProtocol(RawClient))
    d.cancel()
    with pytest.raises(CancelledError):
        result_of(d)
    assert not fake.flush()
    assert fake.connections == [] and fake.server.connections == []


# -- scripting ------------------------------------------------------------------------------


def test_script_answers_the_next_occurrences_in_order(fake: MemorySMTP) -> None:
    fake.server.script("RCPT", Reply.of(450, "4.2.1 busy"))
    fake.server.script("RCPT", Reply.of(251, "2.1.5 forwarded"))
    fake.server.script("NOOP", Reply.of(421, "4.3.2 bye"), times=None)
    client = greeted(fake)
    client.send("MAIL FROM:<a@example.com>")
    client.send(*(f"RCPT TO:<{n}@example.org>" for n in "xyz"), "NOOP", "NOOP")
    fake.flush()
    replies = client.replies()
    assert codes(replies) == [250, 450, 251, 250, 421, 421]
    assert replies[1].text == "busy"
    # the 450 recipient was not added; the 251 one was
    client.send("DATA", "body", ".")
    fake.flush()
    assert codes(client.replies()) == [354, 250]
    assert fake.server.transactions[0].recipients == ("y@example.org", "z@example.org")


def test_responders_see_every_command_and_may_pass(fake: MemorySMTP) -> None:
    seen: list[tuple[str, str]] = []

    def responder(command: str, argument: str) -> Reply | None:
        seen.append((command, argument))
        if command == "RCPT" and "bad" in argument:
            return Reply.of(550, "5.1.1 no such user")
        return None

    fake.server.add_responder(responder)
    client = greeted(fake)
    client.send("MAIL FROM:<a@example.com>", "RCPT TO:<bad@example.org>", "RCPT TO:<ok@x.org>")
    client.send("DATA", "hi", ".")
    fake.flush()
    assert codes(client.replies()) == [250, 550, 250, 354, 250]
    assert seen[:2] == [(GREETING, ""), ("EHLO", "client.example.com")]
    assert ("RCPT", "TO:<bad@example.org>") in seen
    assert seen[-1] == (END_OF_DATA, "")
    assert fake.server.transactions[0].recipients == ("ok@x.org",)


def test_scripted_greeting_and_end_of_data(fake: MemorySMTP) -> None:
    fake.server.script(GREETING, Reply.of(554, "5.3.2 go away"))
    client, _ = raw_connect(fake)
    assert codes(client.replies()) == [554]
    fake.server.script(END_OF_DATA, Reply.of(451, "4.3.0 try later"))
    client = greeted(fake)
    assert deliver(fake, client, b"first\r\n.\r\n") == [250, 250, 354, 451]
    assert deliver(fake, client, b"second\r\n.\r\n") == [250, 250, 354, 250]
    assert [t.data for t in fake.server.transactions] == [b"second\r\n"]


def test_slow_reply_waits_for_the_clock_and_holds_later_commands(fake: MemorySMTP) -> None:
    fake.server.script("MAIL", Reply.of(250, "2.1.0 slowly"), delay=30)
    client = greeted(fake)
    client.send("MAIL FROM:<a@example.com>", "RCPT TO:<b@example.org>")
    fake.flush()
    assert client.take() == b""
    fake.advance(29)
    assert client.take() == b""
    assert len(fake.reactor.getDelayedCalls()) == 1
    fake.advance(1)
    replies = client.replies()
    assert codes(replies) == [250, 250] and replies[0].text == "slowly"
    assert fake.reactor.getDelayedCalls() == []


def test_advance_delivers_between_timers(fake: MemorySMTP) -> None:
    fake.server.script("NOOP", Reply.of(250, "late"), delay=200)
    client = greeted(fake)
    client.send("NOOP")
    seen: list[bytes] = []
    fake.reactor.callLater(300, lambda: seen.append(client.take()))
    fake.advance(400)
    assert seen == [b"250 late\r\n"]
    assert fake.reactor.seconds() == 400


def test_no_reply_hangs_and_its_timer_goes_with_the_connection(fake: MemorySMTP) -> None:
    fake.server.script("NOOP", None)
    fake.server.script("RSET", Reply.of(250, "late"), delay=100)
    client = greeted(fake)
    client.send("NOOP", "RSET")
    fake.advance(1000)
    assert client.take() == b""
    client2 = greeted(fake)
    client2.send("RSET")
    fake.flush()
    assert client2.take() == b""
    assert len(fake.reactor.getDelayedCalls()) == 1
    client2.transport.loseConnection()  # type: ignore[union-attr]
    fake.flush()
    assert fake.reactor.getDelayedCalls() == []
    assert fake.server.connections[1].closed


def test_close_and_abort_after_a_reply(fake: MemorySMTP) -> None:
    fake.server.script("MAIL", Reply.of(421, "4.3.2 shutting down"), close=True)
    client = greeted(fake)
    client.send("MAIL FROM:<a@example.com>", "NOOP")
    fake.flush()
    assert codes(client.replies()) == [421]
    assert client.lost is not None and client.lost.check(ConnectionDone)
    fake.server.script("MAIL", None, abort=True)
    client = greeted(fake)
    client.send("MAIL FROM:<a@example.com>")
    fake.flush()
    assert client.take() == b""
    assert client.lost is not None and not client.lost.check(ConnectionDone)
    assert fake.connections[1].server.aborted


def test_raw_bytes_and_responses(fake: MemorySMTP) -> None:
    fake.server.script("NOOP", b"250 one\r\n250 two\r\n")
    fake.server.add_responder(
        lambda command, _: Response(Reply.of(252, "later"), delay=5) if command == "VRFY" else None
    )
    client = greeted(fake)
    client.send("NOOP", "VRFY x")
    fake.flush()
    assert [r.text for r in client.replies()] == ["one", "two"]
    fake.advance(5)
    assert codes(client.replies()) == [252]
    fake.server.inject(b"421 unsolicited\r\n")
    fake.flush()
    assert client.take() == b"421 unsolicited\r\n"


def test_response_positive() -> None:
    assert Response(Reply.of(354, "go")).positive
    assert Response(b"220 ok\r\n").positive
    assert not Response(b"garbage").positive
    assert not Response(Reply.of(450, "no")).positive
    assert not Response(None, close=True).positive


# -- transports and the pump ----------------------------------------------------------------


@implementer(IPushProducer)
class SpyProducer:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def pauseProducing(self) -> None:
        self.calls.append("pause")

    def resumeProducing(self) -> None:
        self.calls.append("resume")

    def stopProducing(self) -> None:
        self.calls.append("stop")


def test_transport_pauses_its_producer_until_the_buffer_drains() -> None:
    fake = MemorySMTP(buffer_size=100)
    client, connection = raw_connect(fake)
    producer = SpyProducer()
    transport = connection.client
    transport.registerProducer(producer, True)
    transport.write(b"x" * 100)
    assert producer.calls == []
    transport.write(b"NOOP\r\n")
    assert producer.calls == ["pause"] and transport.buffered == 106
    transport.write(b"NOOP\r\n")
    assert producer.calls == ["pause"]
    connection.server.pauseProducing()  # the server stops reading
    fake.flush()
    assert producer.calls == ["pause"] and transport.buffered == 112
    connection.server.resumeProducing()
    fake.flush()
    assert producer.calls == ["pause", "resume"] and transport.buffered == 0
    transport.loseConnection()
    fake.flush()
    assert producer.calls == ["pause", "resume", "stop"]  # like TCP: stopped when lost
    assert client.lost is not None


def test_tcp_no_delay_and_writes_are_recorded(fake: MemorySMTP) -> None:
    client, connection = raw_connect(fake)
    assert not connection.client.getTcpNoDelay()
    connection.client.setTcpNoDelay(True)
    client.send("NOOP", "NOOP")
    assert connection.client.tcp_no_delay
    assert connection.client.writes == [b"NOOP\r\nNOOP\r\n"]


def test_flush_gives_up_on_an_endless_conversation() -> None:
    class Chatty(RawClient):
        def dataReceived(self, data: bytes) -> None:
            self.send("NOOP")

    fake = MemorySMTP()
    fake.max_rounds = 50
    fake.endpoint().connect(Factory.forProtocol(Chatty))
    with pytest.raises(RuntimeError, match="did not settle"):
        fake.flush()


def test_the_server_protocol_keeps_its_old_name() -> None:
    import txcolombe.testing as testing
    from txcolombe.server.protocol import SMTPServerProtocol
    from txcolombe.testing import MemoryServerProtocol

    # One SMTPServerProtocol class in the package: the relay's; the in-memory
    # server's protocol was renamed, and its 0.1 name still imports.
    assert testing.SMTPServerProtocol is MemoryServerProtocol
    assert MemoryServerProtocol is not SMTPServerProtocol
    assert "SMTPServerProtocol" in dir(testing) and "MemoryServerProtocol" in testing.__all__
    fake = MemorySMTP()
    raw_connect(fake)
    assert isinstance(fake.server.connections[0], MemoryServerProtocol)
    assert fake.connections[0].server_protocol.machine is not None
