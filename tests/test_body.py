"""Every kind of body through txcolombe.client.body.body_producer to a consumer.

Synchronous sources run on a Cooperator driven by a fake clock, one work unit
per tick, so that each test decides when each chunk is produced; one test
uses the real reactor and Twisted's global cooperator (pytest-twisted).
"""

from __future__ import annotations

import email.message
import io
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IConsumer
from twisted.internet.task import Cooperator
from twisted.python.failure import Failure
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from tests.helpers import fired
from txcolombe.client.body import (
    BURST,
    CHUNK,
    PullProducer,
    ReadProducer,
    body_producer,
    known_length,
    message_bytes,
)
from txcolombe.codec.errors import InvalidArgument, UsageError

# -- helpers ----------------------------------------------------------------------------------


@implementer(IConsumer)
class Collector:
    """A consumer that keeps every write."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.producer: Any = None

    def write(self, data: bytes) -> None:
        assert isinstance(data, bytes)
        self.chunks.append(data)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)


class Ticker:
    """A Cooperator that runs one work unit per :meth:`tick`, when the test says."""

    def __init__(self) -> None:
        self.pending: list[_Call] = []
        self.cooperator = Cooperator(
            terminationPredicateFactory=lambda: lambda: True,
            scheduler=self._schedule,
        )

    def _schedule(self, work: Callable[[], None]) -> _Call:
        call = _Call(self, work)
        self.pending.append(call)
        return call

    def tick(self) -> None:
        due, self.pending = self.pending, []
        for call in due:
            call.called = True
            call.work()

    def run(self, limit: int = 10_000) -> None:
        for _ in range(limit):
            if not self.pending:
                return
            self.tick()
        raise AssertionError("the producer never finished")


class _Call:
    """The scheduler's handle: what Cooperator needs of an IDelayedCall."""

    def __init__(self, ticker: Ticker, work: Callable[[], None]) -> None:
        self.ticker = ticker
        self.work = work
        self.called = False

    def cancel(self) -> None:
        self.ticker.pending.remove(self)

    def active(self) -> bool:
        return self in self.ticker.pending


@pytest.fixture
def ticker() -> Ticker:
    return Ticker()


def produce(producer: IBodyProducer, ticker: Ticker | None = None) -> Collector:
    consumer = Collector()
    done = producer.startProducing(consumer)
    if ticker is not None:
        ticker.run()
    [result] = fired(done)
    if isinstance(result, Failure):
        result.raiseException()
    assert result is None
    return consumer


# -- bytes-like ----------------------------------------------------------------------------------

BIG = bytes(range(256)) * (CHUNK * 5 // 2 // 256)  # 2.5 chunks


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_bytes_like(ticker: Ticker, kind: type) -> None:
    source = kind(BIG)
    producer = body_producer(source, cooperator=ticker.cooperator)
    assert isinstance(producer, ReadProducer)
    assert known_length(producer) == len(BIG)
    consumer = produce(producer, ticker)
    assert consumer.data == BIG
    assert [len(c) for c in consumer.chunks] == [CHUNK, CHUNK, len(BIG) - 2 * CHUNK]


def test_bytes_are_copied(ticker: Ticker) -> None:
    source = bytearray(b"before\r\n")
    producer = body_producer(source, cooperator=ticker.cooperator)
    source[:] = b"after!\r\n"
    assert produce(producer, ticker).data == b"before\r\n"


def test_empty_body(ticker: Ticker) -> None:
    producer = body_producer(b"", cooperator=ticker.cooperator)
    assert known_length(producer) == 0
    assert produce(producer, ticker).chunks == []


# -- files ---------------------------------------------------------------------------------------


def test_bytesio_has_no_known_length(ticker: Ticker) -> None:
    stream = io.BytesIO(b"skipped" + BIG)
    stream.seek(7)
    producer = body_producer(stream, cooperator=ticker.cooperator)
    assert producer.length is UNKNOWN_LENGTH and known_length(producer) is None
    assert produce(producer, ticker).data == BIG


def test_binary_file_length_comes_from_fstat(ticker: Ticker, tmp_path: Path) -> None:
    path = tmp_path / "message.eml"
    path.write_bytes(b"0123456789" + BIG)
    with path.open("rb") as file:
        file.seek(10)
        producer = body_producer(file, cooperator=ticker.cooperator)
        assert known_length(producer) == len(BIG)
        consumer = produce(producer, ticker)
    assert consumer.data == BIG
    assert max(len(c) for c in consumer.chunks) <= CHUNK


def test_text_mode_file_is_a_clear_error(ticker: Ticker, tmp_path: Path) -> None:
    """Refused when the producer is made, before anything is read or sent."""
    path = tmp_path / "message.txt"
    path.write_text("Subject: text\n\nhello\n")
    with path.open() as file:
        with pytest.raises(InvalidArgument, match="binary mode") as raised:
            body_producer(file, cooperator=ticker.cooperator)  # type: ignore[arg-type]
        assert isinstance(raised.value, TypeError)  # still a TypeError for old callers
        assert file.tell() == 0


# -- the read producer (files and bytes) --------------------------------------------------------


class Pauser(Collector):
    """A consumer that, like a transport, pauses its producer after each write."""

    def write(self, data: bytes) -> None:
        super().write(data)
        self.producer.pauseProducing()


def reading(
    data: bytes, ticker: Ticker, consumer: Collector | None = None
) -> tuple[ReadProducer, Collector, Deferred[None]]:
    """``data``'s producer started on ``consumer`` (a :class:`Pauser` by default)."""
    producer = body_producer(data, cooperator=ticker.cooperator)
    assert isinstance(producer, ReadProducer)
    consumer = consumer if consumer is not None else Pauser()
    consumer.registerProducer(producer, True)
    return producer, consumer, producer.startProducing(consumer)


def test_read_producer_writes_on_resume_without_a_turn(ticker: Ticker) -> None:
    producer, consumer, done = reading(BIG, ticker)
    assert consumer.chunks == []  # the first chunk waits for a turn
    ticker.tick()
    assert len(consumer.chunks) == 1 and not ticker.pending
    producer.resumeProducing()  # the transport's buffer is empty: the next chunk, now
    assert len(consumer.chunks) == 2 and not ticker.pending
    producer.resumeProducing()
    assert fired(done) == []
    producer.resumeProducing()  # the end of the data
    assert consumer.data == BIG
    assert fired(done) == [None]
    producer.resumeProducing()  # late calls after the end are harmless
    producer.pauseProducing()
    producer.stopProducing()
    assert consumer.data == BIG


def test_read_producer_gives_the_reactor_a_turn_after_a_burst(ticker: Ticker) -> None:
    """A consumer that never pauses gets BURST chunks a turn."""
    data = b"y" * (CHUNK * (BURST + 1))
    producer = body_producer(data, cooperator=ticker.cooperator)
    consumer = Collector()
    done = producer.startProducing(consumer)
    ticker.tick()
    assert len(consumer.chunks) == BURST
    ticker.tick()
    assert consumer.data == data
    assert fired(done) == [None]


def test_read_producer_stopped_while_writing(ticker: Ticker) -> None:
    class Stopper(Collector):
        def write(self, data: bytes) -> None:
            super().write(data)
            self.producer.stopProducing()

    producer, consumer, done = reading(BIG, ticker, Stopper())
    ticker.run()
    producer.resumeProducing()
    assert len(consumer.chunks) == 1
    assert fired(done) == []  # IBodyProducer: stopped, it never fires


def test_read_producer_stopped_before_its_turn(ticker: Ticker) -> None:
    producer, consumer, done = reading(BIG, ticker)
    producer.stopProducing()
    ticker.run()
    assert consumer.chunks == [] and fired(done) == []


def test_read_producer_paused_before_its_turn(ticker: Ticker) -> None:
    producer, consumer, done = reading(BIG, ticker)
    producer.pauseProducing()
    ticker.run()
    assert consumer.chunks == []
    producer.resumeProducing()
    assert len(consumer.chunks) == 1 and fired(done) == []
    producer.stopProducing()


def test_read_producer_resumed_from_within_a_write(ticker: Ticker) -> None:
    """A consumer may pause and resume its producer while it writes (a
    transport that empties its buffer at once): the loop just goes on."""

    class Bouncer(Collector):
        def write(self, data: bytes) -> None:
            super().write(data)
            self.producer.pauseProducing()
            self.producer.resumeProducing()

    _, consumer, done = reading(BIG, ticker, Bouncer())
    ticker.run()
    assert consumer.data == BIG
    assert fired(done) == [None]


def test_read_producer_fails_with_the_consumer(ticker: Ticker) -> None:
    class Refuser(Collector):
        def write(self, data: bytes) -> None:
            raise ValueError("no more")

    producer = body_producer(BIG, cooperator=ticker.cooperator)
    done = producer.startProducing(Refuser())
    ticker.run()
    [failure] = fired(done)
    assert failure.check(ValueError)


def test_read_producer_fails_with_the_file(ticker: Ticker) -> None:
    class Broken(io.RawIOBase):
        def read(self, size: int = -1) -> bytes:
            raise OSError("disk on fire")

    done = body_producer(Broken(), cooperator=ticker.cooperator).startProducing(Collector())
    ticker.run()
    [failure] = fired(done)
    assert failure.check(OSError)


def test_read_producer_refuses_text(ticker: Ticker) -> None:
    """A file-like object that is not a TextIOBase but reads text."""

    class Texty:
        def read(self, size: int) -> str:
            return "text"

    done = body_producer(Texty(), cooperator=ticker.cooperator).startProducing(Collector())  # type: ignore[arg-type]
    ticker.run()
    [failure] = fired(done)
    assert failure.check(TypeError) and "binary mode" in str(failure.value)


# -- iterables -----------------------------------------------------------------------------------


def test_iterable_of_chunks(ticker: Ticker) -> None:
    chunks = [b"one\r\n", bytearray(b"two\r\n"), memoryview(b"three\r\n"), b"x" * (CHUNK + 1)]
    producer = body_producer(chunks, cooperator=ticker.cooperator)  # type: ignore[arg-type]
    assert known_length(producer) is None
    consumer = produce(producer, ticker)
    assert consumer.chunks == [b"one\r\n", b"two\r\n", b"three\r\n", b"x" * CHUNK, b"x"]


def test_generator_is_pulled_one_chunk_per_step(ticker: Ticker) -> None:
    pulled: list[int] = []

    def lines() -> Iterator[bytes]:
        for n in range(3):
            pulled.append(n)
            yield b"line %d\r\n" % n

    producer = body_producer(lines(), cooperator=ticker.cooperator)
    consumer = Collector()
    done = producer.startProducing(consumer)
    assert pulled == []
    ticker.tick()
    assert pulled == [0] and consumer.chunks == [b"line 0\r\n"]
    ticker.run()
    assert consumer.data == b"line 0\r\nline 1\r\nline 2\r\n"
    assert fired(done) == [None]


def test_a_chunk_that_is_not_bytes_fails_the_body(ticker: Ticker) -> None:
    producer = body_producer([b"ok\r\n", "text"], cooperator=ticker.cooperator)  # type: ignore[list-item]
    done = producer.startProducing(Collector())
    ticker.run()
    [failure] = fired(done)
    assert failure.check(TypeError) and "str" in str(failure.value)


def test_iterable_producer_pause_resume(ticker: Ticker) -> None:
    producer = body_producer([b"a", b"b", b"c"], cooperator=ticker.cooperator)  # type: ignore[arg-type]
    consumer = Collector()
    done = producer.startProducing(consumer)
    ticker.tick()
    assert consumer.chunks == [b"a"]
    producer.pauseProducing()
    for _ in range(5):
        ticker.tick()
    assert consumer.chunks == [b"a"]
    producer.resumeProducing()
    ticker.run()
    assert consumer.chunks == [b"a", b"b", b"c"]
    assert fired(done) == [None]
    producer.pauseProducing()  # late calls after the end are harmless
    producer.stopProducing()


def test_iterable_producer_pause_and_resume_are_idempotent(ticker: Ticker) -> None:
    producer = body_producer([b"a", b"b", b"c"], cooperator=ticker.cooperator)  # type: ignore[arg-type]
    consumer = Collector()
    done = producer.startProducing(consumer)
    try:
        producer.resumeProducing()  # not paused: nothing to do (IPushProducer)
        ticker.tick()
        producer.pauseProducing()
        producer.pauseProducing()
        producer.resumeProducing()
        ticker.run()
        assert consumer.chunks == [b"a", b"b", b"c"]
    finally:
        producer.stopProducing()
        done.addErrback(lambda _: None)


def test_iterable_producer_stop(ticker: Ticker) -> None:
    producer = body_producer([b"a", b"b", b"c"], cooperator=ticker.cooperator)  # type: ignore[arg-type]
    consumer = Collector()
    done = producer.startProducing(consumer)
    ticker.tick()
    producer.stopProducing()
    ticker.run()
    assert consumer.chunks == [b"a"]
    producer.stopProducing()  # twice is fine
    producer.pauseProducing()
    ticker.run()
    assert consumer.chunks == [b"a"]
    done.addErrback(lambda _: None)


def test_iterable_producer_stop_never_fires_the_deferred(ticker: Ticker) -> None:
    producer = body_producer([b"a", b"b"], cooperator=ticker.cooperator)  # type: ignore[arg-type]
    done = producer.startProducing(Collector())
    producer.stopProducing()
    ticker.run()
    assert fired(done) == []


# -- asynchronous sources ---------------------------------------------------------------------


def test_async_generator() -> None:
    gate: Deferred[None] = Deferred()

    async def chunks() -> AsyncIterator[bytes]:
        yield b"first\r\n"
        await gate
        yield b"second\r\n"

    producer = body_producer(chunks())
    assert isinstance(producer, PullProducer) and known_length(producer) is None
    consumer = Collector()
    done = producer.startProducing(consumer)
    assert consumer.chunks == [b"first\r\n"] and fired(done) == []
    gate.callback(None)
    assert consumer.chunks == [b"first\r\n", b"second\r\n"]
    assert fired(done) == [None]


def test_pull_stream_of_deferreds() -> None:
    waiting: list[Deferred[bytes | None]] = []

    def next_chunk() -> Deferred[bytes | None]:
        d: Deferred[bytes | None] = Deferred()
        waiting.append(d)
        return d

    producer = body_producer(next_chunk)
    consumer = Collector()
    done = producer.startProducing(consumer)
    assert len(waiting) == 1
    waiting[0].callback(b"one\r\n")
    assert consumer.chunks == [b"one\r\n"] and len(waiting) == 2
    waiting[1].callback(None)
    assert fired(done) == [None] and len(waiting) == 2


def test_pull_stream_of_seed_tuples_and_plain_values() -> None:
    # The seed's (buffer, offset, length), as bytes, bytearray or str buffers.
    chunks: list[Any] = [
        (b"xxHello", 2, 5),
        succeed((bytearray(b", world!!"), 0, 7)),
        (" caf\xe9\r\n", 0, 7),
        b"plain\r\n",
        None,
    ]
    producer = body_producer(lambda: chunks.pop(0))
    consumer = produce(producer)
    assert consumer.chunks == [b"Hello", b", world", b" caf\xe9\r\n", b"plain\r\n"]


def test_pull_stream_coroutine() -> None:
    parts = [b"a\r\n", b"b\r\n"]

    async def next_chunk() -> bytes | None:
        return parts.pop(0) if parts else None

    assert produce(body_producer(next_chunk)).data == b"a\r\nb\r\n"


def test_pull_stream_failure_fails_the_body() -> None:
    def broken() -> bytes:
        raise OSError("unreadable")

    [failure] = fired(body_producer(broken).startProducing(Collector()))
    assert failure.check(OSError)


def test_pull_producer_pause_resume_stop() -> None:
    calls: list[Deferred[bytes | None]] = []

    def next_chunk() -> Deferred[bytes | None]:
        calls.append(Deferred())
        return calls[-1]

    producer = body_producer(next_chunk)
    consumer = Collector()
    done = producer.startProducing(consumer)
    producer.pauseProducing()  # while a chunk is on its way
    calls[0].callback(b"one")
    assert consumer.chunks == [b"one"]
    assert len(calls) == 1  # paused: the next chunk is not asked for
    producer.resumeProducing()
    assert len(calls) == 2
    producer.resumeProducing()  # resuming twice changes nothing
    assert len(calls) == 2
    calls[1].callback(b"two")
    assert consumer.chunks == [b"one", b"two"] and len(calls) == 3
    producer.stopProducing()
    calls[2].callback(b"three")  # arrives after stop: dropped
    assert consumer.chunks == [b"one", b"two"] and len(calls) == 3
    done.addErrback(lambda _: None)


def test_pull_producer_stop_while_paused() -> None:
    chunks = [b"one", b"two"]
    producer = body_producer(lambda: chunks.pop(0))
    consumer = Collector()

    @implementer(IConsumer)
    class Pausing(Collector):
        def write(self, data: bytes) -> None:
            super().write(data)
            producer.pauseProducing()

    consumer = Pausing()
    done = producer.startProducing(consumer)
    assert consumer.chunks == [b"one"]
    producer.stopProducing()
    assert consumer.chunks == [b"one"] and chunks == [b"two"]
    done.addErrback(lambda _: None)


def test_pull_producer_stop_never_fires_the_deferred() -> None:
    waiting: list[Deferred[bytes | None]] = []

    def next_chunk() -> Deferred[bytes | None]:
        waiting.append(Deferred())
        return waiting[-1]

    producer = body_producer(next_chunk)
    done = producer.startProducing(Collector())
    producer.stopProducing()
    waiting[0].callback(b"late")
    assert fired(done) == []


# -- messages ---------------------------------------------------------------------------------


def test_email_message_is_serialised_with_crlf(ticker: Ticker) -> None:
    message = email.message.EmailMessage()
    message["From"] = "a@example.com"
    message["To"] = "b@example.org"
    message["Subject"] = "héllo wörld"
    message.set_content("line one\nline two\n.dot\n")
    producer = body_producer(message, cooperator=ticker.cooperator)
    data = produce(producer, ticker).data
    assert known_length(producer) == len(data) == len(message_bytes(message))
    assert b"\n" not in data.replace(b"\r\n", b"")
    assert b"Subject: =?utf-8?q?h=C3=A9llo_w=C3=B6rld?=\r\n" in data
    assert data.endswith(b"\r\n\r\nline one\r\nline two\r\n.dot\r\n")


def test_legacy_message_with_raw_utf8_header_falls_back_to_smtputf8(ticker: Ticker) -> None:
    message = email.message.Message()
    message["Subject"] = "héllo"
    message.set_payload("a\nb\n")
    data = produce(body_producer(message, cooperator=ticker.cooperator), ticker).data
    assert data == "Subject: héllo\r\n\r\na\r\nb\r\n".encode()


# -- producers and mistakes -----------------------------------------------------------------------


def test_body_producer_passes_through_unchanged() -> None:
    inner = body_producer(b"x")
    assert body_producer(inner) is inner


@pytest.mark.parametrize(
    ("value", "message"),
    [("text", "encode it first"), (42, "unsupported body type int"), (None, "NoneType")],
)
def test_unsupported_bodies_are_usage_errors(value: Any, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        body_producer(value)


# -- the real reactor ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_default_cooperator_on_the_real_reactor() -> None:
    consumer = Collector()
    producer = body_producer(BIG)
    await producer.startProducing(consumer)
    assert consumer.data == BIG and len(consumer.chunks) == 3
