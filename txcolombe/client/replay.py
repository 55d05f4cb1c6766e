"""Bodies that can be sent more than once, and at the same time.

:func:`txcolombe.delivery.deliver` sends one body to several domains at once and,
after a failure, to the next exchanger: bytes, ``email.message.Message``
objects, ``BytesIO`` and binary files on regular files (read with
``os.pread`` from their position at the start, so readers never share a
file offset) are used as they are; any other body (iterables, async
iterables, pull streams, producers, pipes) is first copied, in bounded
chunks, to an anonymous temporary file that is closed (and so removed)
when the delivery ends.
"""

from __future__ import annotations

import email.message
import io
import os
import stat
import tempfile
from collections.abc import Iterator
from itertools import chain
from typing import IO

from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IConsumer, IProducer
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from txcolombe.client.body import CHUNK, Body, IterableProducer, body_producer, message_bytes
from txcolombe.codec.errors import InvalidBody, UsageError

__all__ = ["ReplayableBody"]


@implementer(IConsumer)
class _FileConsumer:
    def __init__(self, file: IO[bytes]) -> None:
        self._file = file

    def write(self, data: bytes) -> None:
        self._file.write(data)

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass


def _pread_chunks(fd: int, start: int, end: int) -> Iterator[bytes]:
    position = start
    while position < end:
        chunk = os.pread(fd, min(CHUNK, end - position), position)
        if not chunk:
            return
        position += len(chunk)
        yield chunk


class ReplayableBody:
    """A body that gives a fresh producer for each transaction."""

    def __init__(
        self,
        *,
        data: bytes | None = None,
        file: IO[bytes] | None = None,
        start: int = 0,
        end: int = 0,
        owned: bool = False,
        prefix: bytes = b"",
    ) -> None:
        self._data = data
        self._file = file
        self._start = start
        self._end = end
        self._owned = owned
        self._prefix = prefix

    @property
    def length(self) -> int:
        size = len(self._data) if self._data is not None else self._end - self._start
        return len(self._prefix) + size

    def producer(self) -> IBodyProducer:
        if self._data is not None and not self._prefix:
            return body_producer(self._data)
        if self._data is not None:
            if self.length <= CHUNK:
                return body_producer(self._prefix + self._data)
            data = self._data
            slices = (data[i : i + CHUNK] for i in range(0, len(data), CHUNK))
            return IterableProducer(chain((self._prefix,), slices), self.length)
        assert self._file is not None
        chunks = _pread_chunks(self._file.fileno(), self._start, self._end)
        if self._prefix:
            chunks = chain((self._prefix,), chunks)
        return IterableProducer(chunks, self.length)

    def with_prefix(self, prefix: bytes) -> ReplayableBody:
        """The same body after ``prefix`` (e.g. header fields); it takes over
        the spool, so close the new body, not this one."""
        body = ReplayableBody(
            data=self._data,
            file=self._file,
            start=self._start,
            end=self._end,
            owned=self._owned,
            prefix=prefix + self._prefix,
        )
        self._owned = False
        return body

    def close(self) -> None:
        if self._owned and self._file is not None:
            self._file.close()

    @classmethod
    async def of(cls, body: Body) -> ReplayableBody:
        """Use ``body`` as it is if it can be read again, else spool it.

        :raises UsageError: an unsupported body (e.g. ``str``).
        :raises InvalidBody: reading it for the spool failed.
        """
        if isinstance(body, bytes | bytearray | memoryview):
            return cls(data=bytes(body))
        if isinstance(body, email.message.Message):
            return cls(data=message_bytes(body))
        if isinstance(body, str):
            raise UsageError("the body must be bytes, not str: encode it first")
        file = _regular_file(body)
        if file is not None:
            fd = file.fileno()
            return cls(file=file, start=file.tell(), end=os.fstat(fd).st_size)
        if isinstance(body, io.BytesIO):
            return cls(data=bytes(body.getbuffer()[body.tell() :]))
        producer = body_producer(body)
        spool: IO[bytes] = tempfile.TemporaryFile(prefix="txcolombe-body-")  # noqa: SIM115 - kept open for the delivery
        try:
            await producer.startProducing(_FileConsumer(spool))  # type: ignore[no-untyped-call]
            spool.flush()
        except CancelledError:
            spool.close()
            raise
        except Exception as error:
            spool.close()
            failure = InvalidBody(f"the body could not be read: {error}")
            raise failure from error
        return cls(file=spool, start=0, end=spool.tell(), owned=True)


def _regular_file(body: object) -> IO[bytes] | None:
    """``body`` if it is a binary file on a regular file (pread-able)."""
    if not hasattr(body, "read") or not hasattr(body, "fileno"):
        return None
    try:
        fd = body.fileno()
        if not isinstance(fd, int) or not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
    except (OSError, ValueError, io.UnsupportedOperation):
        return None
    if isinstance(body, io.TextIOBase):
        raise UsageError("the body file is open in text mode; open it in binary mode")
    file: IO[bytes] = body  # type: ignore[assignment]
    return file
