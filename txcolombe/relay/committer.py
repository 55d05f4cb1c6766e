"""The spool's committer: a batch of file operations, made durable.

A batch is a list of operations on files of the spool's ``queue`` directory:
*write* (the whole content of a file) or *unlink*. :meth:`Committer.commit`
writes every file to ``<name>.tmp``, fsyncs the files in parallel, renames
them into place and fsyncs the directory once: after it returns, the batch
would survive a crash. A batch with writes has its unlinks done *after* the
commit (:meth:`Committer.unlink_after`), so as not to delay the answer; they
become durable with the next directory fsync. A batch without writes has its
unlinks done first, then the fsync.

The relay runs this in a child process (``python -m txcolombe.relay.committer
DIRECTORY``, talking over its standard input, a socket), so that its system
calls never contend for the relay's interpreter lock: one request frame per
batch, one reply frame per batch, carrying the batch's id, so that a reply is
credited to its own batch and to no other. Tests run it in process.

Frames (network byte order)::

    request  := length:u32 batch:u32 op*          (length of what follows it)
    op       := kind:u8 name_length:u16 data_length:u32 name data
    reply    := batch:u32 status:u8 text_length:u16 text
                                    (0: synced, 1: done, no fsync, 2: failed, text says why)

The child ignores SIGINT and SIGTERM: it ends when its socket closes, after
finishing the batch at hand, so a signal to the whole process group cannot
cut a commit short.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import sys
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO

WRITE, UNLINK = 1, 2
SYNCED, DONE, FAILED = 0, 1, 2

_LENGTH = struct.Struct("!I")
_BATCH = struct.Struct("!I")
_OP = struct.Struct("!BHI")
_REPLY = struct.Struct("!IBH")
REPLY_SIZE = _REPLY.size

#: (kind, file name, data); data is empty for an unlink.
Op = tuple[int, str, bytes]


class Committer:
    """Performs batches on the files of ``directory``."""

    def __init__(self, directory: str, *, fsync: bool = True, threads: int = 8) -> None:
        self.directory = directory
        self.fsync = fsync
        self._dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fsync")

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        os.close(self._dir_fd)

    def commit(self, ops: Sequence[Op]) -> bool | OSError:
        """Make the batch's writes durable (and a write-less batch's unlinks).

        True when the directory was fsynced, False when fsync is off, or the
        error that stopped the commit.
        """
        dir_fd = self._dir_fd
        try:
            # A later write of the same file supersedes an earlier one.
            last = {name: i for i, (kind, name, _) in enumerate(ops) if kind == WRITE}
            writes = [op for i, op in enumerate(ops) if op[0] == WRITE and last[op[1]] == i]
            if len(writes) > 1:
                list(self._executor.map(self._write_tmp, writes))
            elif writes:
                self._write_tmp(writes[0])
            for _, name, _ in writes:
                os.rename(name + ".tmp", name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            if not writes:
                self._unlink(ops)
            if self.fsync:
                os.fsync(dir_fd)
                return True
        except OSError as error:
            return error
        return False

    def unlink_after(self, ops: Sequence[Op]) -> list[OSError]:
        """The unlinks of a batch with writes, after its commit."""
        if any(kind == WRITE for kind, _, _ in ops):
            return self._unlink(ops)
        return []

    def _unlink(self, ops: Iterable[Op]) -> list[OSError]:
        errors = []
        for kind, name, _ in ops:
            if kind == UNLINK:
                try:
                    os.unlink(name, dir_fd=self._dir_fd)
                except FileNotFoundError:
                    pass
                except OSError as error:
                    errors.append(error)
        return errors

    def _write_tmp(self, op: Op) -> None:
        _, name, data = op
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        fd = os.open(name + ".tmp", flags, 0o600, dir_fd=self._dir_fd)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)


# -- frames ---------------------------------------------------------------------


def encode_batch(batch: int, ops: Iterable[tuple[int, str, Sequence[bytes]]]) -> bytes:
    """The request frame of batch number ``batch``; each op's data given as
    parts, joined here."""
    out = [b"", _BATCH.pack(batch)]
    for kind, name, parts in ops:
        raw = name.encode("utf-8")
        out.append(_OP.pack(kind, len(raw), sum(map(len, parts))))
        out.append(raw)
        out.extend(parts)
    body_length = sum(map(len, out))
    out[0] = _LENGTH.pack(body_length)
    return b"".join(out)


def decode_batch(body: bytes) -> tuple[int, list[Op]]:
    """The batch number and the ops of a request frame's body."""
    ops: list[Op] = []
    view = memoryview(body)
    (batch,) = _BATCH.unpack_from(view)
    at = _BATCH.size
    while at < len(view):
        kind, name_length, data_length = _OP.unpack_from(view, at)
        at += _OP.size
        name = bytes(view[at : at + name_length]).decode("utf-8")
        if "/" in name or name in ("", ".", ".."):
            raise ValueError(f"bad file name {name!r}")
        at += name_length
        ops.append((kind, name, bytes(view[at : at + data_length])))
        at += data_length
    return batch, ops


def encode_reply(batch: int, result: bool | OSError) -> bytes:
    """The reply frame to batch number ``batch``."""
    if isinstance(result, OSError):
        text = str(result).encode("utf-8")[:4096]
        return _REPLY.pack(batch, FAILED, len(text)) + text
    return _REPLY.pack(batch, SYNCED if result else DONE, 0)


def decode_reply(status: int, text: bytes) -> bool | OSError:
    if status == FAILED:
        return OSError(text.decode("utf-8", "replace"))
    return status == SYNCED


def reply_header(data: bytes | bytearray) -> tuple[int, int, int]:
    """(batch, status, text length) of a reply frame's first :data:`REPLY_SIZE` octets."""
    batch, status, length = _REPLY.unpack_from(data)
    return batch, status, length


# -- the child process ------------------------------------------------------------


def _read_exactly(stream: BinaryIO, size: int) -> bytes | None:
    data = stream.read(size)
    if data is None or len(data) < size:
        return None  # the relay is gone (or died mid-frame): stop
    return data


def serve(channel: socket.socket, committer: Committer) -> None:
    """Answer batches until the channel closes."""
    stream = channel.makefile("rb")
    while (head := _read_exactly(stream, _LENGTH.size)) is not None:
        (length,) = _LENGTH.unpack(head)
        body = _read_exactly(stream, length)
        if body is None:
            return
        try:
            batch, ops = decode_batch(body)
        except (ValueError, struct.error, UnicodeDecodeError) as bad:
            # Without a readable batch number there is no one to answer: the
            # relay fails what it sent when the channel closes.
            print(f"txcolombe committer: bad request: {bad}", file=sys.stderr)
            return
        result = committer.commit(ops)
        channel.sendall(encode_reply(batch, result))
        for error in committer.unlink_after(ops):
            print(f"txcolombe committer: {error}", file=sys.stderr)


def main(argv: Sequence[str]) -> int:
    if len(argv) not in (1, 2) or (len(argv) == 2 and argv[1] != "--no-fsync"):
        print("usage: python -m txcolombe.relay.committer DIRECTORY [--no-fsync]", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    channel = socket.socket(fileno=0)
    committer = Committer(argv[0], fsync=len(argv) == 1)
    try:
        serve(channel, committer)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the relay is gone
    finally:
        committer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
