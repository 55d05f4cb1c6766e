"""Progress of a long send on the command line: bytes so far, of how many, and the rate.

The message file is wrapped in :class:`CountingFile`, which counts what the
body producer reads; with the transport's backpressure, what has been read
is what has been written to the connection, less one chunk. A
:class:`ProgressDisplay` shows that count every half second, on one line
rewritten in place on a terminal, or as plain lines otherwise.
"""

from __future__ import annotations

import os
from typing import IO

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

INTERVAL = 0.5
"""Seconds between two updates."""

_MIB = 1024 * 1024


class CountingFile:
    """A binary file that counts the bytes read from it; the rest is the file's own."""

    def __init__(self, file: IO[bytes]) -> None:
        self._file = file
        self.count = 0
        self.size = _remaining(file)

    def read(self, size: int = -1) -> bytes:
        chunk = self._file.read(size)
        self.count += len(chunk)
        return chunk

    def readinto(self, buffer: bytearray | memoryview) -> int:
        got: int = self._file.readinto(buffer)  # type: ignore[attr-defined]
        self.count += got or 0
        return got

    def fileno(self) -> int:
        return self._file.fileno()

    def tell(self) -> int:
        return self._file.tell()

    def close(self) -> None:
        self._file.close()


def _remaining(file: IO[bytes]) -> int | None:
    try:
        return os.fstat(file.fileno()).st_size - file.tell()
    except (OSError, AttributeError, ValueError):
        return None


def describe(count: int, size: int | None, seconds: float) -> str:
    """One line: ``3.0 MiB of 8.0 MiB sent (37%), 1.5 MiB/s``."""
    done = f"{count / _MIB:.1f} MiB"
    if size:
        done += f" of {size / _MIB:.1f} MiB sent ({min(100, count * 100 // size)}%)"
    else:
        done += " sent"
    rate = count / seconds / _MIB if seconds > 0 else 0.0
    return f"{done}, {rate:.1f} MiB/s"


class ProgressDisplay:
    """Shows a :class:`CountingFile`'s count on ``out`` until :meth:`stop`."""

    def __init__(
        self, counter: CountingFile, out: IO[str], clock: IReactorTime, *, terminal: bool
    ) -> None:
        self._counter = counter
        self._out = out
        self._clock = clock
        self._terminal = terminal
        self._started = clock.seconds()
        self._shown = False
        self._loop = LoopingCall(self._show)
        self._loop.clock = clock

    def start(self) -> None:
        self._loop.start(INTERVAL, now=False)

    def _show(self) -> None:
        line = describe(
            self._counter.count, self._counter.size, self._clock.seconds() - self._started
        )
        if self._terminal:
            self._out.write(f"\r{line}\x1b[K")
        else:
            self._out.write(f"{line}\n")
        self._out.flush()
        self._shown = True

    def stop(self) -> None:
        """Stop updating; a last line says where the body ended."""
        if self._loop.running:
            self._loop.stop()
        if self._shown or self._counter.count:
            self._show()
            if self._terminal:
                self._out.write("\n")
                self._out.flush()
