"""Every kind of body a caller may give, as one ``IBodyProducer``.

Bytes, binary files, iterables and async iterables of bytes, pull streams
(the seed's ``unit -> (string * int * int) option Lwt.t``: here a callable
returning the next chunk, or a ``Deferred``/awaitable of it, ``None`` at the
end), ``email.message.Message`` objects and ready ``IBodyProducer``\\ s all
become producers that write one bounded chunk at a time and honour
``pauseProducing``, so a body of any size is sent in constant memory at the
pace the server reads it.
"""

from __future__ import annotations

import contextlib
import email.message
import email.policy
import inspect
import io
import os
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable, Iterator
from typing import IO, Any, Union, cast

from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.interfaces import IConsumer
from twisted.internet.task import Cooperator, TaskDone, TaskStopped, cooperate
from twisted.python.failure import Failure
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from txcolombe.codec.errors import InvalidArgument

#: Bytes handed to the transport at a time. Larger chunks would save little
#: per octet and cost more: malloc serves copies of 1 MiB from fresh pages, and
#: the page faults cost more than the encoder's work on the chunk.
CHUNK = 256 * 1024

#: Chunks a :class:`ReadProducer` writes in a row to a consumer that does not
#: pause it (the transport does, once its buffer is full) before it lets the
#: reactor run.
BURST = 4

Chunk = bytes | bytearray | memoryview | tuple[bytes, int, int]
PullStream = Callable[[], Chunk | Awaitable[Chunk | None] | None]
# Union, not "|": a zope Interface does not support "|" at run time.
Body = Union[  # noqa: UP007
    bytes,
    bytearray,
    memoryview,
    IO[bytes],
    IBodyProducer,
    email.message.Message,
    Iterable[bytes],
    AsyncIterable[bytes],
    PullStream,
]


def _as_bytes(chunk: object) -> bytes:
    if isinstance(chunk, bytes):
        return chunk
    if isinstance(chunk, bytearray | memoryview):
        return bytes(chunk)
    if (
        isinstance(chunk, tuple)
        and len(chunk) == 3
        and isinstance(chunk[0], bytes | bytearray | str)
    ):
        # The seed's (buffer, offset, length).
        buffer, offset, length = chunk
        data = buffer.encode("latin-1") if isinstance(buffer, str) else bytes(buffer)
        return data[offset : offset + length]
    raise TypeError(f"a body chunk must be bytes, not {type(chunk).__name__}")


@implementer(IBodyProducer)
class IterableProducer:
    """Writes the chunks of a synchronous iterator, one per cooperative step."""

    def __init__(
        self,
        chunks: Iterator[bytes],
        length: int | object = UNKNOWN_LENGTH,
        cooperator: Cooperator | None = None,
    ) -> None:
        self.length = length
        self._chunks = chunks
        self._cooperate = cooperator.cooperate if cooperator is not None else cooperate
        self._task: Any = None
        self._paused = False

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        self._task = self._cooperate(self._write(consumer))
        done: Deferred[None] = self._task.whenDone()
        done.addCallback(lambda _: None)
        done.addErrback(_never_after_stop)
        return done

    def _write(self, consumer: IConsumer) -> Iterator[None]:
        for chunk in self._chunks:
            data = _as_bytes(chunk)
            for start in range(0, len(data), CHUNK):
                consumer.write(data[start : start + CHUNK] if len(data) > CHUNK else data)
                yield None

    # The task counts pauses; producers are paused and resumed as a state.
    def pauseProducing(self) -> None:
        if self._task is not None and not self._paused:
            self._paused = True
            with contextlib.suppress(TaskDone, TaskStopped):
                self._task.pause()

    def resumeProducing(self) -> None:
        if self._task is not None and self._paused:
            self._paused = False
            with contextlib.suppress(TaskDone, TaskStopped):
                self._task.resume()

    def stopProducing(self) -> None:
        if self._task is not None:
            with contextlib.suppress(TaskDone, TaskStopped):
                self._task.stop()


@implementer(IBodyProducer)
class SmallBodyProducer:
    """A body that fits in one chunk: written at once, without a reactor turn."""

    def __init__(self, data: bytes) -> None:
        self.length = len(data)
        self._data = data

    @property
    def data(self) -> bytes:
        """The whole body (the protocol sends it without a producer's round)."""
        return self._data

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        if self._data:
            consumer.write(self._data)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass  # everything is written already

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


@implementer(IBodyProducer)
class ReadProducer:
    """Writes what ``read(size)`` returns, :data:`CHUNK` octets at a time,
    until it returns ``b""``: a file's contents, or slices of a bytes body.

    A push producer that writes in a loop while it is not paused, not a
    Cooperator task stepped once per chunk: the transport pauses it when its
    buffer is full and resumes it, from its write callback, once the buffer
    is empty, and the next chunk is written there and then. Only the first
    chunks, and the chunks after a burst of :data:`BURST` that nothing
    paused, wait for a turn of the cooperator.
    """

    def __init__(
        self,
        read: Callable[[int], bytes],
        length: int | object = UNKNOWN_LENGTH,
        cooperator: Cooperator | None = None,
    ) -> None:
        self.length = length
        self._read = read
        self._cooperate = cooperator.cooperate if cooperator is not None else cooperate
        self._consumer: IConsumer | None = None
        self._done: Deferred[None] = Deferred()
        self._task: Any = None  # the cooperator's next turn, while one is due
        self._paused = False
        self._writing = False
        self._finished = False

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        self._consumer = consumer
        self._later()
        return self._done

    def _later(self) -> None:
        """Write on the cooperator's next turn (unless a turn is due already)."""
        if self._task is None:
            self._task = self._cooperate(self._turns())

    def _turns(self) -> Iterator[None]:
        while self._write():
            yield None
        self._task = None

    def _write(self) -> bool:
        """Write chunks while not paused; True if a burst ended it (more to write)."""
        if self._writing or self._finished or self._consumer is None:
            # Writing already (a consumer resumed it from within a write: the
            # loop goes on), done, or not started.
            return False
        self._writing = True
        try:
            for _ in range(BURST):
                if self._paused or self._finished:
                    return False
                chunk = self._read(CHUNK)
                if isinstance(chunk, str):
                    raise TypeError("the body file is open in text mode; open it in binary mode")
                if not chunk:
                    self._finish(None)
                    return False
                self._consumer.write(chunk)
            return not (self._paused or self._finished)
        except Exception:
            self._finish(Failure())  # type: ignore[no-untyped-call]
            return False
        finally:
            self._writing = False

    def _finish(self, failure: Failure | None) -> None:
        if self._finished:
            return  # stopped meanwhile: IBodyProducer, the Deferred never fires
        self._finished = True
        if failure is None:
            self._done.callback(None)
        else:
            self._done.errback(failure)

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        if self._write():
            self._later()

    def stopProducing(self) -> None:
        # IBodyProducer: once stopped, the Deferred never fires. A pending
        # turn finds the producer finished and ends (stopping its task from
        # within its own step would upset the Cooperator).
        self._finished = True


def until_stopped(work: Deferred[None], stopped: Callable[[], bool]) -> Deferred[None]:
    """A producer's Deferred for ``work``: its outcome, unless the producer was
    stopped meanwhile (IBodyProducer: once stopped, it never fires)."""
    done: Deferred[None] = Deferred()

    def finished(result: object) -> None:
        if stopped():
            return
        if isinstance(result, Failure):
            done.errback(result)
        else:
            done.callback(None)

    work.addBoth(finished)
    return done


def _never_after_stop(failure: Failure) -> Deferred[None]:
    """IBodyProducer: once stopped, the producer's Deferred never fires."""
    if not isinstance(failure.value, TaskStopped):
        failure.raiseException()
    return Deferred()


@implementer(IBodyProducer)
class PullProducer:
    """Writes what an asynchronous source yields, waiting while paused."""

    def __init__(
        self, next_chunk: Callable[[], Awaitable[object]], length: int | object = UNKNOWN_LENGTH
    ) -> None:
        self.length = length
        self._next = next_chunk
        self._resume: Deferred[None] | None = None
        self._paused = False
        self._stopped = False

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        return until_stopped(ensureDeferred(self._run(consumer)), lambda: self._stopped)

    async def _run(self, consumer: IConsumer) -> None:
        while not self._stopped:
            chunk = await self._next()
            if chunk is None or self._stopped:
                return
            consumer.write(_as_bytes(chunk))
            while self._paused and not self._stopped:
                self._resume = Deferred()
                await self._resume

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        waiting, self._resume = self._resume, None
        if waiting is not None:
            waiting.callback(None)

    def stopProducing(self) -> None:
        self._stopped = True
        self.resumeProducing()


def _file_length(file: IO[bytes]) -> int | object:
    try:
        return os.fstat(file.fileno()).st_size - file.tell()
    except (OSError, AttributeError, ValueError):
        return UNKNOWN_LENGTH


def _reader(data: bytes) -> Callable[[int], bytes]:
    """``read(size)`` over ``data``: copies of its next ``size`` octets."""
    view = memoryview(data)
    position = 0

    def read(size: int) -> bytes:
        nonlocal position
        chunk = bytes(view[position : position + size])
        position += len(chunk)
        return chunk

    return read


def _pull(stream: PullStream) -> Callable[[], Awaitable[object]]:
    async def next_chunk() -> object:
        result: Any = stream()
        if isinstance(result, Deferred) or inspect.isawaitable(result):
            result = await result
        return result

    return next_chunk


def _anext(iterable: AsyncIterable[bytes]) -> Callable[[], Awaitable[object]]:
    iterator = aiter(iterable)

    async def next_chunk() -> object:
        try:
            return await anext(iterator)
        except StopAsyncIteration:
            return None

    return next_chunk


def message_bytes(message: email.message.Message) -> bytes:
    """Serialise a message with CRLF line endings (UTF-8 headers if it has any)."""
    policy = email.policy.SMTP
    try:
        return message.as_bytes(policy=policy)
    except UnicodeEncodeError:
        return message.as_bytes(policy=email.policy.SMTPUTF8)


#: Bodies held in memory whole (a tuple: ``A | B`` would build a union each call).
_IN_MEMORY = (bytes, bytearray, memoryview, email.message.Message)


def body_producer(body: Body, *, cooperator: Cooperator | None = None) -> IBodyProducer:
    """Adapt any supported body to an ``IBodyProducer``.

    :raises UsageError: ``body`` is of no supported kind (e.g. ``str``).
    """
    if type(body) is bytes:  # the usual body, no producer: asked first
        data = body
    else:
        check_body(body)
        if IBodyProducer.providedBy(body):
            return body
        if not isinstance(body, _IN_MEMORY):
            return _streamed(body, cooperator)
        data = message_bytes(body) if isinstance(body, email.message.Message) else bytes(body)
    if len(data) <= CHUNK:
        return SmallBodyProducer(data)
    return ReadProducer(_reader(data), len(data), cooperator)


def _streamed(body: object, cooperator: Cooperator | None) -> IBodyProducer:
    """The producer of a body not held in memory: a file, an iterable, a pull stream."""
    if hasattr(body, "read"):
        file: IO[bytes] = body  # type: ignore[assignment]
        return ReadProducer(file.read, _file_length(file), cooperator)
    if isinstance(body, AsyncIterable):
        return PullProducer(_anext(body))
    if isinstance(body, Iterable):
        return IterableProducer(iter(body), UNKNOWN_LENGTH, cooperator)
    return PullProducer(_pull(cast(PullStream, body)))  # check_body let only these through


def check_body(body: object) -> None:
    """Refuse, before anything is sent, a body of no supported kind.

    Nothing is read: a stream or iterator is left as it was.

    :raises UsageError: a ``str``, a text-mode file or another unsupported type.
    """
    if isinstance(body, bytes):  # the usual body: answered before the other kinds
        return
    if isinstance(body, str):
        raise InvalidArgument("the body must be bytes, not str: encode it first")
    if isinstance(body, io.TextIOBase):
        raise InvalidArgument("the body file is open in text mode; open it in binary mode")
    supported = (
        IBodyProducer.providedBy(body)
        or isinstance(body, _IN_MEMORY)
        or hasattr(body, "read")
        or isinstance(body, AsyncIterable | Iterable)
        or callable(body)
    )
    if not supported:
        raise InvalidArgument(f"unsupported body type {type(body).__name__}")


def known_length(producer: IBodyProducer) -> int | None:
    """The producer's length in octets, or None if unknown."""
    length: object = producer.length
    return length if isinstance(length, int) else None
