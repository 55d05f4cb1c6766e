"""The Redis store, against a private redis-server on loopback.

The store's steps must do what the in-process store does (same answers for
the same times), and two Shapers sharing one Redis must together keep one
budget: a ``10/s`` message rate, a connection cap, a suspension.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.task import deferLater

from tools.peers import redis_peer
from txcolombe.delivery.shaping import (
    BackoffRules,
    Limits,
    MemoryStore,
    Rate,
    Shaper,
    ShapingPolicy,
    SiteState,
)
from txcolombe.delivery.shaping.config import parse_shaping
from txcolombe.delivery.shaping.redisstore import DEFAULT_PREFIX, RedisStore

reactor: Any = global_reactor


@pytest_twisted.async_yield_fixture
async def stores(redis_server: redis_peer.RedisPeer) -> AsyncIterator[list[RedisStore]]:
    """Two stores on two connections to the same server (two relays)."""
    made = [
        RedisStore.connect(redis_server.host, redis_server.port, lease_ttl=5, poll=0.05)
        for _ in range(2)
    ]
    try:
        yield made
    finally:
        for store in made:
            await store.disconnect()


@pytest_twisted.ensureDeferred
async def test_steps_match_the_memory_store(stores: list[RedisStore]) -> None:
    redis, memory = stores[0], MemoryStore()
    rules = BackoffRules(suspend=30, rate_factor=0.5, min_rate_factor=0.2, recover=100)
    steps: list[tuple[str, tuple[Any, ...]]] = [
        ("take", ("s", "messages", 1000.0, 0.25)),
        ("take", ("s", "messages", 1000.1, 0.25)),
        ("take", ("s", "messages", 1000.25, 0.25)),
        ("take", ("s", "connections", 1000.25, 2.0)),
        ("take", ("t,u", "messages", 1000.25, 0.25)),
        ("open", ("s", "a", 2, 1000.0)),
        ("open", ("s", "b", 2, 1000.0)),
        ("open", ("s", "c", 2, 1000.0)),
        ("close", ("s", "a")),
        ("open", ("s", "c", 2, 1001.0)),
        ("state", ("s",)),
        ("slow_down", ("s", 1010.0, "421 4.7.0 slow down", rules)),
        ("slow_down", ("s", 1020.0, "421 again", rules)),
        ("slow_down", ("s", 1050.0, "451 4.7.1 later", rules)),
        ("slow_down", ("s", 1100.0, "421 4.7.28 rate", rules)),
        ("state", ("s",)),
        ("state", ("other",)),
    ]
    for name, args in steps:
        expected = await getattr(memory, name)(*args)
        got = await getattr(redis, name)(*args)
        if isinstance(expected, float):
            assert got == pytest.approx(expected, abs=1e-6), (name, args)
        else:
            assert got == expected, (name, args)
    state = await redis.state("s")
    assert state == SiteState(1130.0, "421 4.7.28 rate", 0.2, 1200.0)


@pytest_twisted.ensureDeferred
async def test_slots_of_a_dead_relay_expire(stores: list[RedisStore]) -> None:
    live, dead = stores
    assert await dead.open("s", "dead-1", 1, 100.0)
    assert not await live.open("s", "live-1", 1, 104.0)
    # The dead relay's lease_ttl (5 s) passes: its slot is taken back.
    assert await live.open("s", "live-1", 1, 105.5)
    # A lease in use is refreshed and keeps its slot past its first expiry.
    await live.refresh("s", "live-1", 109.0)
    assert not await dead.open("s", "dead-2", 1, 112.0)
    await live.close("s", "live-1")
    assert await dead.open("s", "dead-2", 1, 112.0)


def shapers(stores: list[RedisStore], **limits: Any) -> list[Shaper]:
    policy = ShapingPolicy(default=Limits(**limits))
    rules = BackoffRules(suspend=0.5)
    return [Shaper(policy, rules, store=store, clock=reactor) for store in stores]


@pytest_twisted.ensureDeferred
async def test_two_shapers_share_one_10_per_second_budget(stores: list[RedisStore]) -> None:
    granted: list[tuple[float, int]] = []

    async def send(shaper: Shaper, which: int, count: int) -> None:
        lease = await shaper.acquire("shared.example")
        for _ in range(count):
            await lease.message()
            granted.append((reactor.seconds(), which))
        lease.release()

    both = shapers(stores, message_rate=Rate.parse("10/s"))
    started = reactor.seconds()
    runs = [Deferred.fromCoroutine(send(shaper, i, 15)) for i, shaper in enumerate(both)]
    for run in runs:
        await run
    times = sorted(t for t, _ in granted)
    assert len(times) == 30
    assert {which for _, which in granted} == {0, 1}
    # 30 tokens at 10/s: 2.9 s from the first to the last, whoever took them.
    assert times[-1] - times[0] >= 2.9 - 0.02
    # Never more than 10 in a second (11 on a closed window, plus jitter).
    for t in times:
        assert sum(1 for u in times if t <= u < t + 1.0) <= 11
    # And not much slower than the budget allows.
    assert times[-1] - started < 3.5


@pytest_twisted.ensureDeferred
async def test_connection_cap_is_shared(stores: list[RedisStore]) -> None:
    first, second = shapers(stores, max_connections=2)
    held = [await first.acquire("capped"), await first.acquire("capped")]
    waiting = second.acquire("capped")
    await deferLater(reactor, 0.2)
    assert not waiting.called
    held[0].release()
    lease = await waiting
    assert lease.holds_slot
    third = second.acquire("capped")
    await deferLater(reactor, 0.2)
    assert not third.called, "a third slot was granted"
    third.addErrback(lambda f: f.trap(CancelledError))
    third.cancel()
    lease.release()
    held[1].release()


@pytest_twisted.ensureDeferred
async def test_suspension_is_shared(stores: list[RedisStore]) -> None:
    first, second = shapers(stores)
    assert await first.report("busy", "421 4.7.0 Try again later")
    reported = reactor.seconds()
    lease = await second.acquire("busy")
    assert reactor.seconds() - reported >= 0.5 - 0.01
    snapshot = second.snapshot()["busy"]
    assert snapshot["reason"] == "421 4.7.0 Try again later"
    assert snapshot["rate_factor"] == 0.5
    lease.release()


@pytest_twisted.ensureDeferred
async def test_settings_with_redis_make_a_shared_shaper(
    redis_server: redis_peer.RedisPeer,
) -> None:
    address = f"{redis_server.host}:{redis_server.port}"
    settings = parse_shaping({"redis": address, "default": {"message_rate": "20/s"}})
    one, two = settings.shaper(reactor), settings.shaper(reactor)
    try:
        assert isinstance(one.store, RedisStore)
        assert one.store.prefix == DEFAULT_PREFIX
        leases = [await one.acquire("s"), await two.acquire("s")]
        start = reactor.seconds()
        for lease in leases * 2:
            await lease.message()
        # Four tokens at 20/s, the first at once: 0.15 s.
        assert reactor.seconds() - start >= 0.15 - 0.01
        for lease in leases:
            lease.release()
    finally:
        await one.close()
        await two.close()


@pytest_twisted.ensureDeferred
async def test_redis_down_fails_the_acquisition_after_the_timeout() -> None:
    store = RedisStore.connect("127.0.0.1", redis_peer.free_port(), timeout=0.3)
    shaper = Shaper(store=store, clock=reactor)
    start = reactor.seconds()
    try:
        with pytest.raises(TimeoutError):
            await shaper.acquire("s")
        assert 0.3 - 0.01 <= reactor.seconds() - start < 2
    finally:
        await shaper.close()
