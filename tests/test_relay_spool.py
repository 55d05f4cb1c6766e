"""The spool and its committer: durability order, group commit, removals,
the committer child process (and its death)."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import Clock, deferLater

from tests.test_relay_committer_faults import Harness
from txcolombe.relay.committer import (
    REPLY_SIZE,
    UNLINK,
    WRITE,
    Committer,
    decode_batch,
    decode_reply,
    encode_batch,
    encode_reply,
    reply_header,
)
from txcolombe.relay.spool import MAGIC, REMOVAL_DELAY, Spool

ENVELOPE = {"sender": "a@x.test", "recipients": ["b@y.test"]}


class Syscalls:
    """Records the committer's file system calls, in order."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, queue_dir: Path) -> None:
        self.calls: list[tuple[str, str]] = []
        self.names: dict[int, str] = {}
        real_open, real_fsync = os.open, os.fsync
        real_rename, real_unlink = os.rename, os.unlink

        def opened(path: str, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
            fd = real_open(path, flags, mode, dir_fd=dir_fd)
            self.names[fd] = Path(path).name if dir_fd is not None else "<dir>"
            return fd

        def fsync(fd: int) -> None:
            real_fsync(fd)
            self.calls.append(("fsync", self.names.get(fd, "<dir>")))

        def rename(src: str, dst: str, **kw: int) -> None:
            real_rename(src, dst, **kw)
            self.calls.append(("rename", f"{src}>{dst}"))

        def unlink(path: str, **kw: int) -> None:
            real_unlink(path, **kw)
            self.calls.append(("unlink", Path(path).name))

        monkeypatch.setattr(os, "open", opened)
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "rename", rename)
        monkeypatch.setattr(os, "unlink", unlink)

    def mark(self, what: str) -> None:
        self.calls.append(("mark", what))


@pytest.fixture
def inline(tmp_path: Path) -> Iterator[tuple[Spool, Clock]]:
    clock = Clock()
    spool = Spool(tmp_path / "spool", reactor=clock, inline=True)
    spool.start()
    yield spool, clock
    spool.stop()


def test_write_is_fsynced_renamed_and_the_directory_fsynced_before_it_fires(
    inline: tuple[Spool, Clock], monkeypatch: pytest.MonkeyPatch
) -> None:
    spool, _ = inline
    calls = Syscalls(monkeypatch, spool.queue_dir)
    d = spool.write_message("Q1", ENVELOPE, b"Subject: x\r\n\r\nbody\r\n")
    d.addCallback(lambda _: calls.mark("fired"))
    assert d.called
    assert calls.calls == [
        ("fsync", "Q1.msg.tmp"),
        ("rename", "Q1.msg.tmp>Q1.msg"),
        ("fsync", "<dir>"),
        ("mark", "fired"),
    ]
    stored = (spool.queue_dir / "Q1.msg").read_bytes()
    assert stored.startswith(MAGIC) and stored.endswith(b"\r\n\r\nbody\r\n")
    assert spool.read_envelope("Q1") == ENVELOPE
    assert spool.read_data("Q1") == b"Subject: x\r\n\r\nbody\r\n"
    assert not list(spool.queue_dir.glob("*.tmp"))


def test_one_directory_fsync_per_batch_and_the_last_write_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tmp_path.joinpath("q").mkdir()
    calls = Syscalls(monkeypatch, tmp_path / "q")
    committer = Committer(str(tmp_path / "q"))
    try:
        batch = [(WRITE, f"m{i}.msg", b"x" * i) for i in range(5)]
        batch += [(WRITE, "s.state", b"old"), (WRITE, "s.state", b"new")]
        assert committer.commit(batch) is True
    finally:
        committer.close()
    fsyncs = [name for kind, name in calls.calls if kind == "fsync"]
    assert sorted(fsyncs[:-1]) == sorted([f"m{i}.msg.tmp" for i in range(5)] + ["s.state.tmp"])
    assert fsyncs[-1] == "<dir>"  # once, after every rename
    assert [kind for kind, _ in calls.calls].index("rename") > len(fsyncs) - 2
    assert (tmp_path / "q" / "s.state").read_bytes() == b"new"
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == sorted(
        [f"m{i}.msg" for i in range(5)] + ["s.state"]
    )


def test_a_removed_message_file_goes_at_once_the_rest_is_batched(
    inline: tuple[Spool, Clock], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A delivered message still in the spool at a crash is delivered twice:
    its file is unlinked at once. The state file and the directory fsync go
    through the committer, with the next commit or after REMOVAL_DELAY."""
    spool, clock = inline
    spool.write_message("Q1", ENVELOPE, b"one\r\n")
    spool.write_state("Q1", {"attempts": 1})
    calls = Syscalls(monkeypatch, spool.queue_dir)
    spool.remove("Q1")
    assert [p.name for p in spool.queue_dir.iterdir()] == ["Q1.state"]
    assert calls.calls == [("unlink", "Q1.msg")]
    clock.advance(REMOVAL_DELAY)
    assert not list(spool.queue_dir.iterdir())
    # The committer's batch: the state file, the message file again (already
    # gone: a no-op), then the directory fsync that makes both durable.
    assert calls.calls == [("unlink", "Q1.msg"), ("unlink", "Q1.state"), ("fsync", "<dir>")]
    assert spool.drain().called


def test_a_removal_during_a_commit(tmp_path: Path) -> None:
    """While commits run, the message file is unlinked at once all the same;
    the rest rides along with the next commit (unlinked after its fsync) and
    is made durable by a directory fsync within REMOVAL_DELAY."""
    clock = Clock()
    spool = Spool(tmp_path / "spool", reactor=clock)
    spool.queue_dir.mkdir(parents=True)
    committer = Committer(str(spool.queue_dir))
    harness = Harness(spool, committer)
    spool._spawn = harness.spawn  # type: ignore[method-assign]
    harness.spawn()
    try:
        harness.write("Q1")
        spool.write_state("Q1", {"attempts": 1})
        harness.answer()
        harness.answer()
        harness.write("Q2")  # a commit under way
        spool.remove("Q1")
        channel = harness.channel
        assert channel is not None and len(channel.requests) == 1
        assert not (spool.queue_dir / "Q1.msg").exists()  # a crash now cannot bring it back
        assert (spool.queue_dir / "Q1.state").exists()
        spool.write_message("Q3", ENVELOPE, b"three\r\n")  # second in flight, with the removal
        assert [ops for _, ops in channel.requests][1][:2] == [
            (UNLINK, "Q1.state", b""),
            (UNLINK, "Q1.msg", b""),
        ]
        harness.answer()
        harness.answer()  # Q3's batch: the unlinks done after its fsync
        assert not (spool.queue_dir / "Q1.state").exists() and channel.requests == []
        clock.advance(REMOVAL_DELAY)
        assert [ops for _, ops in channel.requests] == [[]]  # the directory fsync
        harness.answer()
        assert spool.drain().called
    finally:
        committer.close()


def test_frames_round_trip() -> None:
    ops = [(WRITE, "a.msg", (b"head", b"\n", b"data")), (UNLINK, "b.state", ())]
    frame = encode_batch(7, ops)
    assert int.from_bytes(frame[:4], "big") == len(frame) - 4
    assert decode_batch(frame[4:]) == (
        7,
        [(WRITE, "a.msg", b"head\ndata"), (UNLINK, "b.state", b"")],
    )
    with pytest.raises(ValueError, match="bad file name"):
        decode_batch(encode_batch(1, [(WRITE, "../escape", (b"x",))])[4:])
    for number, result in ((1, True), (2**32 - 1, False), (9, OSError("disk full"))):
        raw = encode_reply(number, result)
        echoed, status, length = reply_header(raw)
        assert echoed == number
        back = decode_reply(status, raw[REPLY_SIZE : REPLY_SIZE + length])
        assert back == result if not isinstance(result, OSError) else str(back) == "disk full"


# -- the committer child, with the real reactor -----------------------------------------


@pytest_twisted.ensureDeferred
async def test_committer_process_commits_concurrent_writes(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", reactor=reactor)
    spool.start()
    try:
        child = spool._child
        assert child is not None and child.poll() is None
        writes = [spool.write_message(f"M{i:03d}", ENVELOPE, b"body %d\r\n" % i) for i in range(60)]
        results = await DeferredList(writes, fireOnOneErrback=True)
        assert all(ok for ok, _ in results)
        assert spool.commits < 60  # grouped
        for i in range(60):
            assert spool.read_data(f"M{i:03d}") == b"body %d\r\n" % i
        for i in range(30):
            spool.remove(f"M{i:03d}", state=False)
        await spool.drain()
        assert sorted(spool.queue_ids()) == [f"M{i:03d}" for i in range(30, 60)]
    finally:
        await spool.stop()
    assert child.poll() == 0  # it ended on the socket's close


@pytest_twisted.ensureDeferred
async def test_a_dead_committer_fails_nothing_silently_and_is_replaced(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", reactor=reactor)
    spool.start()
    try:
        first = spool._child
        assert first is not None
        os.kill(first.pid, signal.SIGKILL)
        for _ in range(200):  # the reactor notices the closed socket
            if spool._channel is None:
                break
            await deferLater(reactor, 0.01, lambda: None)
        assert spool._channel is None
        written: Deferred[None] = spool.write_message("AFTER", ENVELOPE, b"x\r\n")
        await written
        assert spool._child is not None and spool._child.pid != first.pid
        assert spool.read_data("AFTER") == b"x\r\n"
    finally:
        await spool.stop()


@pytest_twisted.ensureDeferred
async def test_large_and_small_writes_interleaved_arrive_intact(tmp_path: Path) -> None:
    """Requests bigger than the socket takes at once go through Twisted's
    buffer; the small ones after them must not overtake them."""
    spool = Spool(tmp_path / "spool", reactor=reactor)
    spool.start()
    try:
        bodies = {}
        writes = []
        for i in range(8):
            size = 6_000_000 if i in (0, 1, 5) else 100
            bodies[f"W{i}"] = bytes([65 + i]) * size + b"\r\n"
            writes.append(spool.write_message(f"W{i}", ENVELOPE, bodies[f"W{i}"]))
        results = await DeferredList(writes, fireOnOneErrback=True)
        assert all(ok for ok, _ in results)
        for name, body in bodies.items():
            assert spool.read_data(name) == body
    finally:
        await spool.stop()


def test_a_state_file_left_without_its_message_is_removed_at_start(tmp_path: Path) -> None:
    """A crash between the removal of a message file and of its state file
    leaves the state alone: the next start removes it, and only it."""
    spool = Spool(tmp_path / "spool", inline=True)
    spool.start()
    spool.write_message("Q1", ENVELOPE, b"one\r\n")
    spool.write_state("Q1", {"attempts": 1})
    spool.write_state("Q2", {"attempts": 1})
    spool.stop()
    again = Spool(tmp_path / "spool", inline=True)
    again.start()
    assert sorted(p.name for p in again.queue_dir.iterdir()) == ["Q1.msg", "Q1.state"]
    again.stop()
