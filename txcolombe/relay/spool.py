"""The spool: one immutable file per message plus a small state file, made durable.

Layout of the spool directory::

    queue/<id>.msg     the envelope (one JSON line after a magic line) and the message
    queue/<id>.state   per-recipient delivery state (JSON), rewritten atomically
    queue/*.tmp        files being written; never 250'd, removed at start
                       (``<id>.in.tmp``: a message still arriving)

Every write is write → fsync → rename → fsync(dir), so that after a crash a
file is either entirely there or not at all. Writes are *group-committed*:
the operations that arrive while a commit runs go together into the next
one, with their files fsynced in parallel and the directory fsynced once, so
concurrent messages share the cost of durability.

Removals (after delivery) are not waited for, but the message file is not
left behind either, since a delivered message still in the spool at a
crash is delivered twice: it is unlinked here at once (one cheap system
call; the committer may have two commits ahead of it, each two fsyncs),
which no crash of the relay can undo. The state file's unlink and the
directory fsync that makes both durable against a power loss go through the
committer, batched: they ride along with the next commit (done after it, so
as not to delay its answer) and are made durable by the one after; when no
commit comes, a commit of the removals alone runs after
:data:`REMOVAL_DELAY` seconds. (Committing each removal at once instead
cost the intake half its throughput, for no fewer duplicates.) A state file
left alone by a crash in between is removed at the next start.

Commits run in a committer child process; the reactor thread only builds
the bytes and hears back once per commit. Each batch has a number, echoed in
its reply, and each channel to a committer knows the batches it carries: a
reply is credited to its own batch only, and when a committer dies exactly
the batches it held fail (their clients hear 451), while later batches go to
its replacement. A failed write of a new message is undone (its file is
removed if the dead committer got as far as the rename), so that a message
the client will send again is never kept twice; removals it held are tried
again.

A large message is not held in memory: :meth:`Spool.incoming` gives an
:class:`IncomingFile` that writes it to ``<id>.in.tmp`` as it arrives; at its
end the file is fsynced (in a thread), renamed to ``<id>.msg`` and the
directory fsynced by a commit, before the caller hears that it is durable.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import secrets
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from txcolombe.client.options import default_reactor
from txcolombe.relay.child import reap_later, spawn
from txcolombe.relay.committer import (
    REPLY_SIZE,
    UNLINK,
    WRITE,
    Committer,
    Op,
    decode_reply,
    encode_batch,
    reply_header,
)

MAGIC = b"TXCOLOMBE-SPOOL 1\n"

log = Logger(namespace="txcolombe.relay")

#: Seconds after which removals not carried by a commit are done and made durable.
REMOVAL_DELAY = 0.05

#: Batches sent to the committer before its answer to the first: the next
#: batch waits in its socket rather than for a turn of our reactor.
MAX_INFLIGHT = 2

_ids = itertools.count(secrets.randbits(24))


def new_queue_id() -> str:
    """A unique, roughly time-ordered queue id: microseconds (14 hex digits)
    and a counter started at random (6 hex digits)."""
    return f"{time.time_ns() // 1000:014X}{next(_ids) & 0xFFFFFF:06X}"


@dataclass(frozen=True, slots=True)
class _Write:
    name: str
    parts: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class _Unlink:
    name: str


_Op = _Write | _Unlink
_Batch = list[tuple[_Op, "Deferred[None] | None"]]


class Spool:
    """The durable store. Call :meth:`start` before use and :meth:`stop` after.

    :param inline: commit synchronously in this process (tests with a fake
        clock); else a committer child process does the file work.
    """

    def __init__(
        self, directory: Path, *, reactor: Any = None, fsync: bool = True, inline: bool = False
    ) -> None:
        if reactor is None:
            reactor = default_reactor()
        self.directory = Path(directory)
        self.queue_dir = self.directory / "queue"
        self._dir = str(self.queue_dir)
        self.fsync = fsync
        self.inline = inline
        self._reactor = reactor
        self._pending: _Batch = []
        #: Batches sent and not yet answered, by number (inline: none).
        self._inflight: dict[int, _Batch] = {}
        self._batch_numbers = itertools.count(1)
        self._dirty = False  # unlinks done but not yet made durable
        self._timer: IDelayedCall | None = None
        self._drained: list[Deferred[None]] = []
        self._committer: Committer | None = None
        self._child: subprocess.Popen[bytes] | None = None
        self._channel: _Channel | None = None
        self._stopping = False
        self.commits = 0

    def start(self) -> None:
        self.queue_dir.mkdir(parents=True, exist_ok=True)
        self.directory.chmod(0o700)
        for leftover in self.queue_dir.glob("*.tmp"):
            leftover.unlink()
        for state in self.queue_dir.glob("*.state"):
            if not state.with_suffix(".msg").exists():
                state.unlink()  # its message was never durable, or was removed before a crash
        self._stopping = False
        if self.inline:
            self._committer = Committer(self._dir, fsync=self.fsync)
        else:
            self._spawn()

    def _spawn(self) -> None:
        """Start the committer child, talking over a socket pair."""
        args = [self._dir] if self.fsync else [self._dir, "--no-fsync"]
        self._channel = _Channel(self)
        self._child = spawn("txcolombe.relay.committer", args, self._reactor, self._channel)

    def stop(self) -> Deferred[None]:
        """Stop the committer; fires once it has exited (after :meth:`drain`,
        nothing is lost; what was not drained is finished here)."""
        self._stopping = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        channel, self._channel = self._channel, None
        child, self._child = self._child, None
        if channel is not None:
            channel.close()
        exited = succeed(None) if child is None else reap_later(child, self._reactor, 30)
        return exited.addCallback(lambda _: self._stopped())

    def _stopped(self) -> None:
        if self._pending or self._dirty:
            # Not drained: finish here, synchronously.
            batch, self._pending = self._pending, []
            committer = self._committer or Committer(self._dir, fsync=self.fsync)
            ops = _joined(batch)
            committer.commit(ops)
            committer.unlink_after(ops)
            if self.fsync:
                committer.commit([])
            if committer is not self._committer:
                committer.close()
            self._dirty = False
        if self._committer is not None:
            self._committer.close()
            self._committer = None

    # -- writing ---------------------------------------------------------------

    def write_message(self, queue_id: str, envelope: dict[str, Any], data: bytes) -> Deferred[None]:
        """Store a new message durably; fires once it would survive a crash."""
        head = json.dumps(envelope, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        return self._submit(_Write(f"{queue_id}.msg", (MAGIC, head, b"\n", data)))

    def write_state(self, queue_id: str, state: dict[str, Any]) -> Deferred[None]:
        """Replace a message's state file durably."""
        return self._submit(_Write(f"{queue_id}.state", (json.dumps(state).encode("utf-8"),)))

    def remove(self, queue_id: str, *, state: bool = True) -> None:
        """Remove a message (and its state file, if it has one) after delivery
        or deletion. Not waited for: the message file is unlinked at once;
        the rest (state file, directory fsync) is done with the next commit,
        or within :data:`REMOVAL_DELAY` seconds, and durable by the commit after."""
        name = f"{queue_id}.msg"
        with contextlib.suppress(OSError):  # else the committer's unlink says why
            os.unlink(os.path.join(self._dir, name))
        if state:
            self._pending.append((_Unlink(f"{queue_id}.state"), None))
        # Again by the committer (a no-op then), so that the directory fsync
        # that makes it durable comes after it.
        self._pending.append((_Unlink(name), None))
        self._later()

    def incoming(self, queue_id: str, envelope: dict[str, Any]) -> IncomingFile:
        """Start writing a new message as it arrives (its ``size`` is filled
        in at the end); see :class:`IncomingFile`."""
        return IncomingFile(self, queue_id, envelope)

    def sync_directory(self, name: str) -> Deferred[None]:
        """Fires once the queue directory has been fsynced after now (a
        rename done before the call is durable then). Carried by the next
        commit as the unlink of ``name``, a file that must not exist."""
        return self._submit(_Unlink(name))

    def drain(self) -> Deferred[None]:
        """Fires once every operation submitted so far is done and durable."""
        if not self._inflight and not self._pending and not self._dirty:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._drained.append(d)
        self._flush()
        return d

    def _submit(self, op: _Op) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._pending.append((op, d))
        if len(self._inflight) < MAX_INFLIGHT:
            self._commit_pending()
        return d

    def _later(self) -> None:
        """Make sure pending removals and undurable unlinks are seen to soon."""
        if self._timer is None and not self._inflight:
            self._timer = self._reactor.callLater(REMOVAL_DELAY, self._flush)

    def _flush(self) -> None:
        """Commit what is pending now, even if it is only removals (or nothing:
        a directory fsync for unlinks done after the last one)."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if not self._inflight and (self._pending or self._dirty):
            self._commit_pending()

    def _commit_pending(self) -> None:
        batch, self._pending = self._pending, []
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._committer is not None:  # inline
            ops = _joined(batch)
            result = self._committer.commit(ops)
            for error in self._committer.unlink_after(ops):
                log.error("cannot remove a spool file: {error}", error=error)
            self._finished(batch, result)
            return
        if self._channel is None and not self._stopping:
            self._spawn()
        channel = self._channel
        if channel is None:
            self._finished(batch, OSError("the spool is stopped"))
            return
        number = next(self._batch_numbers) & 0xFFFFFFFF
        self._inflight[number] = batch
        channel.batches.add(number)
        channel.send(encode_batch(number, (_wire(op) for op, _ in batch)))

    def _answer(self, channel: _Channel, number: int, result: bool | OSError) -> None:
        """The committer's reply to batch ``number``, sent on ``channel``."""
        if number not in channel.batches:
            # Never credit a reply to a batch it does not belong to.
            log.error("the spool committer answered unknown batch {number}", number=number)
            return
        channel.batches.discard(number)
        self._finished(self._inflight.pop(number), result)

    def _channel_lost(self, channel: _Channel, reason: Failure) -> None:
        """A committer died: fail exactly the batches it held."""
        if self._channel is channel:
            self._channel = None
            if self._child is not None and not self._stopping:
                log.error("the spool committer stopped: {reason}", reason=reason.getErrorMessage())
                if self._child.poll() is None:
                    self._child.kill()
                self._child.wait()
                self._child = None
        lost = [self._inflight.pop(number) for number in sorted(channel.batches)]
        channel.batches.clear()
        for batch in lost:
            # Undo what the dead committer may have done of new messages that
            # are now refused, and try its removals again (both idempotent).
            for op, _ in batch:
                if isinstance(op, _Unlink):
                    self._pending.append((op, None))
                elif op.name.endswith(".msg"):
                    self._pending.append((_Unlink(op.name), None))
        error = OSError("the spool committer stopped")
        for batch in lost:
            self._finished(batch, error)

    def _finished(self, batch: _Batch, result: bool | OSError) -> None:
        self.commits += 1
        unlinks = any(isinstance(op, _Unlink) for op, _ in batch)
        writes = any(isinstance(op, _Write) for op, _ in batch)
        if result is True:
            # The fsync covered every unlink done before it: all but this
            # batch's own when it had writes (those came after).
            self._dirty = unlinks and writes
        elif isinstance(result, OSError):
            if writes:
                self._dirty = self._dirty or unlinks
            else:
                log.error("cannot sync the spool directory: {error}", error=result)
                self._dirty = False  # nothing more to try; do not loop
        else:
            self._dirty = self._dirty or unlinks  # no fsync (fsync=False)
        self._dirty = self._dirty and self.fsync
        for _, d in batch:
            if d is None:
                continue
            if isinstance(result, OSError):
                d.errback(result)
            else:
                d.callback(None)
        if len(self._inflight) < MAX_INFLIGHT and any(d is not None for _, d in self._pending):
            self._commit_pending()
        elif self._inflight:
            return  # the next answer will see to the rest
        elif self._pending or self._dirty:
            if self._drained:
                self._commit_pending()
            else:
                self._later()
        elif self._drained:
            waiters, self._drained = self._drained, []
            for waiter in waiters:
                waiter.callback(None)

    # -- reading -----------------------------------------------------------------

    def queue_ids(self) -> Iterator[str]:
        """The ids of the stored messages, oldest first."""
        names = sorted(p.name for p in self.queue_dir.glob("*.msg"))
        return (name[: -len(".msg")] for name in names)

    def read_envelope(self, queue_id: str) -> dict[str, Any]:
        with (self.queue_dir / f"{queue_id}.msg").open("rb") as f:
            if f.readline() != MAGIC:
                raise ValueError(f"{queue_id}: not a spool file")
            envelope: dict[str, Any] = json.loads(f.readline())
            return envelope

    def read_data(self, queue_id: str) -> bytes:
        with (self.queue_dir / f"{queue_id}.msg").open("rb") as f:
            f.readline()
            f.readline()
            return f.read()

    def read_state(self, queue_id: str) -> dict[str, Any] | None:
        try:
            state: dict[str, Any] = json.loads((self.queue_dir / f"{queue_id}.state").read_bytes())
        except FileNotFoundError:
            return None
        return state


#: The width of the ``size`` field of an incoming file's envelope, written
#: as blanks first and filled in at the end (JSON allows the blanks).
_SIZE_WIDTH = 20


class IncomingFile:
    """A message written to the spool as it arrives: ``<id>.in.tmp``, with
    the spool file's head (magic line, envelope line) first.

    A write error (a full disk) is kept and given by :meth:`finish`; nothing
    is raised to the caller mid-message. :meth:`abort` removes the file.
    """

    def __init__(self, spool: Spool, queue_id: str, envelope: dict[str, Any]) -> None:
        self.spool = spool
        self.queue_id = queue_id
        self.size = 0
        self.error: OSError | None = None
        self._tmp = f"{queue_id}.in.tmp"
        head = json.dumps(
            {k: v for k, v in envelope.items() if k != "size"},
            ensure_ascii=False,
            separators=(",", ":"),
        ).encode("utf-8")
        head = head[:-1] + b',"size":'
        self._size_at = len(MAGIC) + len(head)
        self._fd: int | None = None
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            self._fd = os.open(spool.queue_dir / self._tmp, flags, 0o600)
        except OSError as error:
            self.error = error  # given by finish(): the client hears 451
            return
        self._write_all(MAGIC + head + b" " * _SIZE_WIDTH + b"}\n")

    def write(self, data: bytes) -> None:
        """The next part of the message."""
        self.size += len(data)
        self._write_all(data)

    def _write_all(self, data: bytes) -> None:
        if self.error is not None or self._fd is None:
            return
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as error:
            self.error = error

    def finish(self) -> Deferred[None]:
        """Make the message durable as ``<id>.msg``; fires once it would
        survive a crash (the file is removed on any failure)."""
        fd = self._fd
        if fd is None or self.error is not None:
            error = self.error or OSError("the message was aborted")
            self.abort()
            return fail(error)
        try:
            os.pwrite(fd, b"%*d" % (_SIZE_WIDTH, self.size), self._size_at)
        except OSError as error:
            self.abort()
            return fail(error)
        spool = self.spool
        if not spool.fsync:
            synced: Deferred[None] = succeed(None)
        elif spool.inline:
            synced = maybeDeferred(os.fsync, fd)
        else:
            reactor = spool._reactor
            synced = deferToThreadPool(reactor, reactor.getThreadPool(), os.fsync, fd)
        synced.addCallback(lambda _: self._rename())
        synced.addErrback(self._failed)
        return synced

    def _rename(self) -> Deferred[None]:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        queue_dir = self.spool.queue_dir
        os.rename(queue_dir / self._tmp, queue_dir / f"{self.queue_id}.msg")
        return self.spool.sync_directory(self._tmp)

    def _failed(self, failure: Failure) -> Failure:
        """Nothing of a message that was not answered 250 stays behind."""
        self.abort()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.spool.queue_dir / f"{self.queue_id}.msg")
        return failure

    def abort(self) -> None:
        """Forget the message: close and remove its file."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.spool.queue_dir / self._tmp)


def _wire(op: _Op) -> tuple[int, str, tuple[bytes, ...]]:
    if isinstance(op, _Write):
        return (WRITE, op.name, op.parts)
    return (UNLINK, op.name, ())


def _joined(batch: _Batch) -> list[Op]:
    """The batch as the in-process committer takes it."""
    ops = (_wire(op) for op, _ in batch)
    return [(kind, name, b"".join(parts)) for kind, name, parts in ops]


class _Channel(Protocol):
    """The relay's end of the socket to the committer child."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        #: The numbers of the batches sent on this channel and not answered.
        self.batches: set[int] = set()
        self._buffer = bytearray()
        self._direct: socket.socket | None = None
        self._closing = False

    def connectionMade(self) -> None:
        handle = self.transport.getHandle()  # type: ignore[union-attr]
        if isinstance(handle, socket.socket):
            self._direct = handle

    def send(self, frame: bytes) -> None:
        """Write a request: straight to the socket when it takes it whole (no
        turn of the reactor), else the rest (and every request after it)
        through the transport, until the committer has answered every
        request: then Twisted's buffer is empty again."""
        direct = self._direct
        if direct is not None:
            try:
                sent = direct.send(frame)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                sent = 0  # the transport will find out
            if sent == len(frame):
                return
            frame = frame[sent:]
            self._direct = None
        self.transport.write(frame)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while len(self._buffer) >= REPLY_SIZE:
            number, status, length = reply_header(self._buffer)
            if len(self._buffer) < REPLY_SIZE + length:
                return
            text = bytes(self._buffer[REPLY_SIZE : REPLY_SIZE + length])
            del self._buffer[: REPLY_SIZE + length]
            if self._direct is None and len(self.batches) == 1:
                # The committer has read every request: Twisted's buffer is empty.
                handle = self.transport.getHandle()  # type: ignore[union-attr]
                self._direct = handle if isinstance(handle, socket.socket) else None
            self.spool._answer(self, number, decode_reply(status, text))

    def close(self) -> None:
        self._closing = True
        self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure | None = None) -> None:
        if not self._closing or self.batches:
            self.spool._channel_lost(self, reason or Failure(ConnectionError("closed")))  # type: ignore[no-untyped-call]
