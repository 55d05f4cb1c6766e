"""The spool when its committer dies: a model test that kills it at random
points (in process, on a fake clock, with the real :class:`Committer` doing
the file work), and the real child process killed while batches are in
flight.

The one property: a write's Deferred succeeds only once *that* write is on
disk, each Deferred fires exactly once, and a committer's death fails exactly
the batches it held.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import DeferredList
from twisted.internet.task import Clock, deferLater
from twisted.python.failure import Failure

from txcolombe.relay.committer import Committer, decode_batch, encode_reply
from txcolombe.relay.spool import MAGIC, REMOVAL_DELAY, Spool, _Channel

ENVELOPE = {"sender": "a@x.test", "recipients": ["b@y.test"]}


class _NoSocket:
    """The fake channel's transport: no socket to write to directly."""

    def getHandle(self) -> None:
        return None


class FakeChannel(_Channel):
    """A committer "child" that the test runs step by step: requests wait in
    :attr:`requests` until the test lets the real committer do them."""

    def __init__(self, spool: Spool) -> None:
        super().__init__(spool)
        self.transport = _NoSocket()  # type: ignore[assignment]
        self.requests: list[tuple[int, list[Any]]] = []
        self.dead = False

    def send(self, frame: bytes) -> None:
        assert not self.dead, "a batch was sent to a dead committer"
        self.requests.append(decode_batch(frame[4:]))

    def close(self) -> None:
        self._closing = True
        self.die()

    def die(self) -> None:
        if not self.dead:
            self.dead = True
            self.connectionLost(Failure(ConnectionError("killed")))  # type: ignore[no-untyped-call]


@dataclass
class Harness:
    spool: Spool
    committer: Committer
    channels: list[FakeChannel] = field(default_factory=list)
    #: name → (data, outcomes fired: "ok"/"failed")
    writes: dict[str, tuple[bytes, list[str]]] = field(default_factory=dict)
    removed: set[str] = field(default_factory=set)

    @property
    def channel(self) -> FakeChannel | None:
        live = [c for c in self.channels if not c.dead]
        return live[-1] if live else None

    def spawn(self) -> None:
        channel = FakeChannel(self.spool)
        self.channels.append(channel)
        self.spool._channel = channel

    def write(self, name: str) -> None:
        data = f"body of {name}\r\n".encode()
        fired: list[str] = []
        self.writes[name] = (data, fired)
        path = self.spool.queue_dir / f"{name}.msg"

        def ok(_: object) -> None:
            # Durable *now*, with this message's own bytes.
            assert path.read_bytes().endswith(b"\n" + data), f"{name} answered 250 unwritten"
            fired.append("ok")

        def failed(_: Failure) -> None:
            fired.append("failed")

        self.spool.write_message(name, ENVELOPE, data).addCallbacks(ok, failed)

    def answer(self, commit: bool = True, die_after: bool = False) -> None:
        """The live committer does its oldest request (or dies on it)."""
        channel = self.channel
        if channel is None or not channel.requests:
            return
        number, ops = channel.requests.pop(0)
        if commit:
            result = self.committer.commit(ops)
            self.committer.unlink_after(ops)
        if die_after or not commit:
            channel.die()
            return
        channel.dataReceived(encode(number, result))


def encode(number: int, result: bool | OSError) -> bytes:
    return encode_reply(number, result)


ACTIONS = st.lists(
    st.sampled_from(["write", "write", "write", "answer", "answer", "kill", "crash", "remove"]),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(actions=ACTIONS)
def test_a_committer_death_fails_exactly_its_batches(
    tmp_path_factory: Any, actions: list[str]
) -> None:
    directory = tmp_path_factory.mktemp("spool")
    clock = Clock()
    spool = Spool(directory, reactor=clock, fsync=False)
    spool.queue_dir.mkdir(parents=True)
    committer = Committer(str(spool.queue_dir), fsync=False)
    h = Harness(spool, committer)
    spool._spawn = h.spawn  # type: ignore[method-assign]
    h.spawn()
    count = 0
    try:
        for action in actions:
            if action == "write":
                count += 1
                h.write(f"M{count:03d}")
            elif action == "answer":
                h.answer()
            elif action == "kill":  # dies before doing its oldest batch
                h.answer(commit=False)
            elif action == "crash":  # does it, then dies before replying
                h.answer(die_after=True)
            elif action == "remove":
                done = [n for n, (_, f) in h.writes.items() if f == ["ok"] and n not in h.removed]
                if done:
                    h.removed.add(done[0])
                    spool.remove(done[0], state=False)
        # Let everything finish: answer until nothing is waiting.
        for _ in range(1000):
            clock.advance(REMOVAL_DELAY)
            if h.channel is None or not h.channel.requests:
                if not spool._pending and not spool._inflight:
                    break
                if h.channel is None:
                    h.spawn()
            h.answer()
        assert not spool._inflight and not spool._pending
        for name, (data, fired) in h.writes.items():
            assert len(fired) == 1, f"{name} fired {fired}"
            path = spool.queue_dir / f"{name}.msg"
            if fired == ["ok"] and name not in h.removed:
                stored = path.read_bytes()
                assert stored.startswith(MAGIC) and stored.endswith(b"\n" + data)
            else:
                # Refused (the client sends it again) or removed: not kept.
                assert not path.exists(), f"{name} ({fired}) left in the queue"
    finally:
        committer.close()


# -- the real child process ----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_killing_the_committer_with_batches_in_flight(tmp_path: Path) -> None:
    """Kill the real child while it holds batches, several times: every write
    that succeeded is on disk, every other one failed and left nothing."""
    spool = Spool(tmp_path / "spool", reactor=reactor)
    spool.start()
    outcomes: dict[str, bool] = {}
    try:
        for round_ in range(6):
            names = [f"R{round_}W{i:03d}" for i in range(40)]
            writes = [spool.write_message(n, ENVELOPE, n.encode() * 2000) for n in names]
            child = spool._child
            assert child is not None
            os.kill(child.pid, signal.SIGKILL)
            results = await DeferredList(writes, consumeErrors=True)
            for name, (ok, _) in zip(names, results, strict=True):
                outcomes[name] = ok
            await deferLater(reactor, 0.05, lambda: None)
        later = spool.write_message("LAST", ENVELOPE, b"last\r\n")
        await later
        await spool.drain()
    finally:
        await spool.stop()
    assert any(not ok for ok in outcomes.values()), "no kill caught a batch in flight"
    for name, ok in outcomes.items():
        path = tmp_path / "spool" / "queue" / f"{name}.msg"
        if ok:
            assert path.read_bytes().endswith(b"\n" + name.encode() * 2000), name
        else:
            assert not path.exists(), f"{name} failed but stays in the queue"
    assert (tmp_path / "spool" / "queue" / "LAST.msg").exists()


def test_a_reply_for_an_unknown_batch_is_credited_to_nothing(tmp_path: Path) -> None:
    clock = Clock()
    spool = Spool(tmp_path / "spool", reactor=clock, fsync=False)
    spool.queue_dir.mkdir(parents=True)
    committer = Committer(str(spool.queue_dir), fsync=False)
    h = Harness(spool, committer)
    spool._spawn = h.spawn  # type: ignore[method-assign]
    h.spawn()
    try:
        h.write("A")
        channel = h.channel
        assert channel is not None
        number = channel.requests[0][0]
        channel.dataReceived(encode(number + 1000, True))  # not A's number
        assert h.writes["A"][1] == []  # A is still waiting
        h.answer()
        assert h.writes["A"][1] == ["ok"]
    finally:
        committer.close()
