"""The spool: one immutable file per message plus a small state file, made durable.

Layout of the spool directory::

    queue/<id>.msg     the envelope (one JSON line after a magic line) and the message
    queue/<id>.state   per-recipient delivery state (JSON), rewritten atomically
    queue/*.tmp        files being written; never 250'd, removed at start

Every write is write → fsync → rename → fsync(dir), so that after a crash a
file is either entirely there or not at all. Writes are *group-committed*:
the operations that arrive while a commit runs go together into the next
one, with their files fsynced in parallel and the directory fsynced once, so
concurrent messages share the cost of durability.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

MAGIC = b"TXCOLOMBE-SPOOL 1\n"


def new_queue_id() -> str:
    """A unique, roughly time-ordered queue id (16 hex digits + 4 random)."""
    return f"{time.time_ns() // 1000:014X}{secrets.token_hex(3).upper()}"


@dataclass(frozen=True)
class _Write:
    name: str
    data: bytes


@dataclass(frozen=True)
class _Unlink:
    name: str


_Op = _Write | _Unlink


class Spool:
    """The durable store. Call :meth:`start` before use and :meth:`stop` after."""

    def __init__(
        self, directory: Path, *, reactor: Any = None, fsync: bool = True, inline: bool = False
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.directory = Path(directory)
        self.queue_dir = self.directory / "queue"
        self.fsync = fsync
        #: Commit synchronously in the caller's thread (tests with a fake clock).
        self.inline = inline
        self._reactor = reactor
        self._pending: list[tuple[_Op, Deferred[None]]] = []
        self._busy = False
        self._drained: list[Deferred[None]] = []
        self._pool: ThreadPool | None = None
        self._executor: ThreadPoolExecutor | None = None
        self.commits = 0

    def start(self) -> None:
        self.queue_dir.mkdir(parents=True, exist_ok=True)
        self.directory.chmod(0o700)
        for leftover in self.queue_dir.glob("*.tmp"):
            leftover.unlink()
        if not self.inline:
            self._pool = ThreadPool(minthreads=1, maxthreads=1, name="txcolombe-spool")
            self._pool.start()
        self._executor = ThreadPoolExecutor(max_workers=16, thread_name_prefix="txcolombe-fsync")

    def stop(self) -> None:
        if self._pool is not None:
            self._pool.stop()
            self._pool = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    # -- writing ---------------------------------------------------------------

    def write_message(self, queue_id: str, envelope: dict[str, Any], data: bytes) -> Deferred[None]:
        """Store a new message durably; fires once it would survive a crash."""
        head = json.dumps(envelope, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        return self._submit(_Write(f"{queue_id}.msg", MAGIC + head + b"\n" + data))

    def write_state(self, queue_id: str, state: dict[str, Any]) -> Deferred[None]:
        """Replace a message's state file durably."""
        return self._submit(_Write(f"{queue_id}.state", json.dumps(state).encode("utf-8")))

    def remove(self, queue_id: str) -> Deferred[None]:
        """Remove a message and its state durably (after delivery or deletion)."""
        d1 = self._submit(_Unlink(f"{queue_id}.state"))
        return self._submit(_Unlink(f"{queue_id}.msg")).addCallback(lambda _: d1)

    def drain(self) -> Deferred[None]:
        """Fires once every operation submitted so far is committed."""
        if not self._busy and not self._pending:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._drained.append(d)
        return d

    def _submit(self, op: _Op) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._pending.append((op, d))
        self._kick()
        return d

    def _kick(self) -> None:
        if self._busy or not self._pending:
            return
        batch, self._pending = self._pending, []
        self._busy = True
        ops = [op for op, _ in batch]
        if self.inline:
            done: Deferred[BaseException | None] = succeed(self._commit(ops))
        else:
            assert self._pool is not None
            done = deferToThreadPool(self._reactor, self._pool, self._commit, ops)

        def finished(result: object) -> None:
            self._busy = False
            self.commits += 1
            for _, d in batch:
                if isinstance(result, BaseException):
                    d.errback(result)
                else:
                    d.callback(None)
            self._kick()
            if not self._busy:
                waiters, self._drained = self._drained, []
                for waiter in waiters:
                    waiter.callback(None)

        done.addBoth(finished)

    def _commit(self, ops: list[_Op]) -> BaseException | None:
        """Run in the spool thread: one group commit."""
        try:
            # A later write of the same file supersedes an earlier one.
            last = {op.name: i for i, op in enumerate(ops) if isinstance(op, _Write)}
            writes = [op for i, op in enumerate(ops) if last.get(op.name) == i]
            assert self._executor is not None
            list(self._executor.map(self._write_tmp, writes))
            for i, op in enumerate(ops):
                target = self.queue_dir / op.name
                if isinstance(op, _Write):
                    if last[op.name] == i:
                        os.replace(self.queue_dir / (op.name + ".tmp"), target)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        target.unlink()
            if self.fsync:
                fd = os.open(self.queue_dir, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except OSError as error:
            return error
        return None

    def _write_tmp(self, op: _Write) -> None:
        path = self.queue_dir / (op.name + ".tmp")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(op.data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

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
