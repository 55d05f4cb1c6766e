"""The Deliverer: what deliver() keeps across calls, and Happy Eyeballs.

The integration tests run in the world of tests/test_deliver.py (its DNS
zone, aiosmtpd exchangers and fixtures), plus servers of their own on
loopback addresses of the test zone; the race itself is tested on a fake
clock with endpoints the test controls.
"""

# The fixtures of tests/test_deliver.py are imported, and tests name them as parameters.
# ruff: noqa: F811

from __future__ import annotations

import dataclasses
import time
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, LoopingCall
from twisted.names import dns
from zope.interface import implementer

from tests.test_deliver import (  # noqa: F401 - fixtures
    QUICK,
    World,
    captured_log,
    exchangers,
    greeters,
    only,
    reactor,
    room,
    world,
)
from tests.test_wire_bytes import EHLO, CannedServer
from txcolombe import DSN, Deliverer, Notify, Recipient, TLSLevel, UsageError
from txcolombe.codec.errors import ConnectionFailed, ResponseTimeout
from txcolombe.delivery.eyeballs import RacingEndpoint

# -- the race, on a fake clock ---------------------------------------------------------------


@implementer(IStreamClientEndpoint)
class HeldEndpoint:
    """An endpoint whose connection attempts the test settles by hand."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.attempts: list[Deferred[IProtocol]] = []
        self.cancelled = 0

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        def cancel(_: Deferred[IProtocol]) -> None:
            self.cancelled += 1

        attempt: Deferred[IProtocol] = Deferred(cancel)
        self.attempts.append(attempt)
        return attempt


def race(clock: Clock, *names: str) -> tuple[RacingEndpoint[str], list[HeldEndpoint]]:
    endpoints = [HeldEndpoint(name) for name in names]
    return RacingEndpoint([(e.name, e) for e in endpoints], clock, delay=0.25), endpoints


def test_the_next_attempt_starts_after_the_delay_and_the_first_to_connect_wins() -> None:
    clock = Clock()
    racing, (six, four) = race(clock, "::1", "127.0.0.1")
    result = racing.connect(Factory())
    assert (len(six.attempts), len(four.attempts)) == (1, 0)
    clock.advance(0.24)
    assert len(four.attempts) == 0
    clock.advance(0.01)
    assert len(four.attempts) == 1
    winner = Protocol()
    four.attempts[0].callback(winner)
    assert result.result is winner
    assert racing.winner == "127.0.0.1"
    assert six.cancelled == 1  # the slower attempt is stopped
    assert racing.failures == []


def test_a_quick_first_connection_never_starts_the_second() -> None:
    clock = Clock()
    racing, (six, four) = race(clock, "::1", "127.0.0.1")
    result = racing.connect(Factory())
    six.attempts[0].callback(Protocol())
    clock.advance(10)
    assert racing.winner == "::1" and result.called
    assert four.attempts == [] and clock.getDelayedCalls() == []


def test_a_failure_starts_the_next_attempt_at_once() -> None:
    clock = Clock()
    racing, (six, four) = race(clock, "::1", "127.0.0.1")
    result = racing.connect(Factory())
    six.attempts[0].errback(ConnectionRefusedError())
    assert len(four.attempts) == 1 and clock.getDelayedCalls() == []
    four.attempts[0].callback(Protocol())
    assert racing.winner == "127.0.0.1" and result.called
    [(key, failure)] = racing.failures
    assert key == "::1" and failure.check(ConnectionRefusedError)


def test_when_every_attempt_fails_the_last_failure_is_the_result() -> None:
    clock = Clock()
    racing, (six, four) = race(clock, "::1", "127.0.0.1")
    result = racing.connect(Factory())
    clock.advance(0.25)
    six.attempts[0].errback(ConnectionRefusedError("six"))
    assert not result.called  # the other attempt is still running
    four.attempts[0].errback(ConnectionRefusedError("four"))
    failures: list[Any] = []
    result.addErrback(failures.append)
    assert str(failures[0].value) == "Connection was refused by other side: four."
    assert racing.winner is None
    assert [key for key, _ in racing.failures] == ["::1", "127.0.0.1"]


def test_cancelling_the_race_cancels_every_attempt_and_the_timer() -> None:
    clock = Clock()
    racing, (six, four, other) = race(clock, "::1", "127.0.0.1", "127.0.0.2")
    result = racing.connect(Factory())
    clock.advance(0.25)
    result.cancel()
    assert (six.cancelled, four.cancelled) == (1, 1)
    assert other.attempts == [] and clock.getDelayedCalls() == []
    failures: list[Any] = []
    result.addErrback(failures.append)
    assert failures[0].check(CancelledError)


def test_settings_are_checked() -> None:
    with pytest.raises(UsageError, match="max_per_host"):
        Deliverer(max_per_host=0)
    with pytest.raises(UsageError, match="IPv4"):
        Deliverer(source_ipv4="::1")
    with pytest.raises(UsageError, match="not an IP address"):
        Deliverer(source_ipv6="example.org")
    with pytest.raises(ValueError, match="ipv5"):
        Deliverer(family="ipv5")


# -- deliveries through one Deliverer ---------------------------------------------------


class _Silent(Protocol):
    """Accepts the connection and never says a word."""


class _Recorder(Protocol):
    """Notes the client's address, then refuses the session."""

    def __init__(self, peers: list[str]) -> None:
        self.peers = peers

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.peers.append(self.transport.getPeer().host)  # type: ignore[attr-defined]
        self.transport.write(b"554 5.7.1 no service\r\n")
        self.transport.loseConnection()


def _listen(world: World, address: str, protocol: Any) -> Any:
    return reactor.listenTCP(
        world.exchangers.port, Factory.forProtocol(protocol), interface=address
    )


def _mx(world: World, domain: str, *exchangers: tuple[int, str]) -> None:
    for preference, host in exchangers:
        world.zone.add(domain, dns.Record_MX(preference, host.encode()))


def _through(deliverer: Deliverer, world: World, recipients: list[str], **kwargs: Any) -> Any:
    kwargs.setdefault("timeouts", QUICK)
    return world.deliver(recipients, deliverer=deliverer, **kwargs)


@pytest_twisted.ensureDeferred
async def test_an_exchanger_that_timed_out_is_skipped_for_a_while(world: World) -> None:
    world.zone.add("silent.mx.test", dns.Record_A("127.0.0.40"))
    _mx(world, "silentfirst.test", (10, "silent.mx.test"), (20, "a.mx.test"))
    port = _listen(world, "127.0.0.40", _Silent)
    quick = dataclasses.replace(QUICK, greeting=0.4)
    deliverer = Deliverer(dead_host_time=1.5)
    try:
        first = only(await _through(deliverer, world, ["bob@silentfirst.test"], timeouts=quick))
        assert first.delivered and first.mx == "a.mx.test"
        assert isinstance(first.attempts[0].error, ResponseTimeout)

        started = time.monotonic()
        second = only(await _through(deliverer, world, ["bob@silentfirst.test"], timeouts=quick))
        assert time.monotonic() - started < 0.4  # no second greeting timeout
        assert second.delivered and second.mx == "a.mx.test"
        skipped = second.attempts[0].error
        assert isinstance(skipped, ConnectionFailed) and "timed out recently" in str(skipped)

        # Another Deliverer knows nothing of it.
        fresh = only(await _through(Deliverer(), world, ["bob@silentfirst.test"], timeouts=quick))
        assert isinstance(fresh.attempts[0].error, ResponseTimeout)

        await _sleep(1.6)  # the memory ends
        third = only(await _through(deliverer, world, ["bob@silentfirst.test"], timeouts=quick))
        assert isinstance(third.attempts[0].error, ResponseTimeout)
    finally:
        await port.stopListening()


async def _sleep(seconds: float) -> None:
    from twisted.internet.task import deferLater

    await deferLater(reactor, seconds, lambda: None)


@pytest_twisted.ensureDeferred
async def test_only_the_chosen_address_family_is_used(world: World) -> None:
    # dual.mx.test has ::1 and 127.0.0.2; IPv6 is preferred by default.
    four = only(await _through(Deliverer(family="ipv4"), world, ["bob@dual.test"]))
    assert four.delivered and four.address == "127.0.0.2"
    assert [a.address for a in four.attempts] == ["127.0.0.2"]
    six = only(
        await _through(
            Deliverer(family="ipv6"), world, ["bob@dual.test"], address_preference="ipv4"
        )
    )
    assert six.delivered and six.address == "::1"
    none = only(await _through(Deliverer(family="ipv6"), world, ["bob@pref.test"]))
    assert not none.delivered and none.attempts == ()


@pytest_twisted.ensureDeferred
async def test_connections_come_from_the_source_address(world: World) -> None:
    world.zone.add("recorder.mx.test", dns.Record_A("127.0.0.41"))
    _mx(world, "recorded.test", (10, "recorder.mx.test"))
    peers: list[str] = []
    port = _listen(world, "127.0.0.41", lambda: _Recorder(peers))
    try:
        await _through(Deliverer(source_ipv4="127.0.0.7"), world, ["bob@recorded.test"])
        await _through(Deliverer(), world, ["bob@recorded.test"])
    finally:
        await port.stopListening()
    assert peers == ["127.0.0.7", "127.0.0.1"]


async def _most_connections(deliverer: Deliverer, world: World, count: int) -> int:
    for i in range(count):
        _mx(world, f"many{i}.test", (10, "a.mx.test"))
    most = 0

    def sample() -> None:
        nonlocal most
        most = max(most, deliverer.connections("a.mx.test"))

    sampler = LoopingCall(sample)
    sampler.start(0.001)
    try:
        result = await _through(deliverer, world, [f"bob@many{i}.test" for i in range(count)])
    finally:
        sampler.stop()
    assert all(outcome.delivered for outcome in result.values())
    return most


@pytest_twisted.ensureDeferred
async def test_connections_to_one_exchanger_are_limited(world: World) -> None:
    assert await _most_connections(Deliverer(max_per_host=2), world, 6) == 2
    # Without the limit the same deliveries do overlap: the sampling sees it.
    assert await _most_connections(Deliverer(max_per_host=20), world, 6) > 2


@pytest_twisted.ensureDeferred
async def test_dns_answers_are_cached_across_deliveries(world: World) -> None:
    asked: list[tuple[bytes, int]] = []
    inner = world.resolver

    class Counting:
        def query(self, query: dns.Query, timeout: Any = None) -> Deferred[Any]:
            asked.append((query.name.name, query.type))
            return inner.query(query, timeout)

    deliverer = Deliverer(resolver=Counting())  # type: ignore[arg-type]
    for _ in range(3):
        outcome = only(
            await _through(deliverer, world, ["bob@pref.test"], resolver=None, mta_sts=False)
        )
        assert outcome.delivered
    assert asked.count((b"pref.test", dns.MX)) == 1
    assert asked.count((b"a.mx.test", dns.A)) == 1
    # An empty answer carries no TTL to keep it by: asked each time.
    assert asked.count((b"a.mx.test", dns.AAAA)) == 3


def test_deliver_through_a_deliverer_checks_arguments_first() -> None:
    failed = Deliverer().deliver("alice@example.com", [], b"x", reactor=Clock())
    errors: list[Any] = []
    failed.addErrback(errors.append)
    assert errors and errors[0].check(UsageError)


@pytest_twisted.ensureDeferred
async def test_a_kept_session_serves_the_next_domain_of_the_same_exchanger(
    world: World,
) -> None:
    _mx(world, "alsoa.test", (10, "a.mx.test"))
    deliverer = Deliverer(reuse_time=30)
    try:
        with captured_log() as lines:
            first = only(await _through(deliverer, world, ["bob@pref.test"]))
            assert deliverer.idle("a.mx.test") == 1
            second = only(await _through(deliverer, world, ["carol@alsoa.test"]))
        assert first.delivered and second.delivered
        assert (second.mx, second.address) == ("a.mx.test", "127.0.0.2")
        assert second.tls is not None and second.tls.level is TLSLevel.VERIFIED
        assert deliverer.idle("a.mx.test") == 1
        assert any("reusing the session to a.mx.test" in line for line in lines)
        assert [r.recipients for r in world.room.by("a")] == [
            ["bob@pref.test"],
            ["carol@alsoa.test"],
        ]
        # Under another TLS policy the kept session does not fit: a new one is opened.
        third = only(await _through(deliverer, world, ["dave@alsoa.test"], tls_policy="encrypt"))
        assert third.delivered and deliverer.idle("a.mx.test") == 2
    finally:
        await deliverer.close()
    assert deliverer.idle("a.mx.test") == 0


@pytest_twisted.ensureDeferred
async def test_kept_sessions_expire_and_none_are_kept_by_default(world: World) -> None:
    brief = Deliverer(reuse_time=0.3)
    assert only(await _through(brief, world, ["bob@pref.test"])).delivered
    assert brief.idle("a.mx.test") == 1
    await _sleep(0.5)
    assert brief.idle("a.mx.test") == 0
    default = Deliverer()
    assert only(await _through(default, world, ["bob@pref.test"])).delivered
    assert default.idle("a.mx.test") == 0


@pytest_twisted.ensureDeferred
async def test_a_kept_session_that_died_is_replaced(world: World) -> None:
    deliverer = Deliverer(reuse_time=30)
    try:
        assert only(await _through(deliverer, world, ["bob@pref.test"])).delivered
        [[idle]] = [kept for memory in deliverer._clocked.values() for kept in memory.idle.values()]
        idle.session.abort()
        await _sleep(0.05)
        again = only(await _through(deliverer, world, ["carol@pref.test"]))
        assert again.delivered and [a.error for a in again.attempts] == [None]
    finally:
        await deliverer.close()


class _DSNServer(CannedServer):
    """Offers DSN, notes each command line."""

    def __init__(self, lines: list[bytes]) -> None:
        super().__init__({"EHLO": ["|".join([*EHLO[:-1], "250 HELP"])]})
        self.lines = lines

    def dataReceived(self, data: bytes) -> None:
        if not self.in_data:
            self.lines.extend(line for line in data.split(b"\r\n") if line[:4].isalpha())
        super().dataReceived(data)


@pytest_twisted.ensureDeferred
async def test_each_recipient_may_carry_its_own_dsn_options(world: World) -> None:
    world.zone.add("dsn.mx.test", dns.Record_A("127.0.0.42"))
    _mx(world, "dsn.test", (10, "dsn.mx.test"))
    lines: list[bytes] = []
    port = _listen(world, "127.0.0.42", lambda: _DSNServer(lines))
    try:
        result = await _through(
            Deliverer(),
            world,
            [
                Recipient("bob@dsn.test", notify={Notify.FAILURE}, orcpt="bob@old.test"),
                "carol@dsn.test",
            ],
            dsn=DSN(notify={Notify.SUCCESS}),
            tls_policy="none",
        )
    finally:
        await port.stopListening()
    assert list(result) == ["bob@dsn.test", "carol@dsn.test"]
    assert all(outcome.delivered for outcome in result.values())
    rcpts = [line for line in lines if line.startswith(b"RCPT")]
    assert rcpts == [
        b"RCPT TO:<bob@dsn.test> NOTIFY=FAILURE ORCPT=rfc822;bob@old.test",
        b"RCPT TO:<carol@dsn.test> NOTIFY=SUCCESS",
    ]


# -- traffic shaping (docs/shaping.md), in the Deliverer -----------------------------------


def _shaping(**limits: Any) -> Any:
    from txcolombe.delivery.shaping import Limits, ShapingPolicy
    from txcolombe.delivery.shaping.config import ShapingSettings

    return ShapingSettings(policy=ShapingPolicy(default=Limits(**limits)))


@pytest_twisted.ensureDeferred
async def test_domains_of_one_site_share_its_message_rate(world: World) -> None:
    from txcolombe.delivery.shaping import Rate

    for i in range(4):
        _mx(world, f"site{i}.test", (10, "a.mx.test"))
    deliverer = Deliverer(shaping=_shaping(message_rate=Rate.parse("10/s")))
    started = time.monotonic()
    result = await _through(deliverer, world, [f"bob@site{i}.test" for i in range(4)])
    elapsed = time.monotonic() - started
    assert all(outcome.delivered for outcome in result.values())
    # One site (a.mx.test): four messages at 10/s need three gaps of 100 ms.
    assert elapsed >= 0.3
    [(site, info)] = deliverer.shaper.snapshot().items()
    assert site == "a.mx.test" and info["messages_total"] == 4


@pytest_twisted.ensureDeferred
async def test_a_slow_down_from_the_first_exchanger_suspends_the_site_though_the_second_delivered(
    world: World,
) -> None:
    deliverer = Deliverer(shaping=_shaping())
    outcome = only(await _through(deliverer, world, ["bob@busyfirst.test"]))
    assert outcome.delivered and outcome.mx == "b.mx.test"  # the 421 greeting was the first's
    [(site, info)] = deliverer.shaper.snapshot().items()
    assert site == "b.mx.test,busy.mx.test"
    assert info["slow_downs"] == 1 and info["suspended"]


@pytest_twisted.ensureDeferred
async def test_without_shaping_nothing_waits_or_is_counted(world: World) -> None:
    deliverer = Deliverer()
    assert only(await _through(deliverer, world, ["bob@pref.test"])).delivered
    assert deliverer.shaper is None


@pytest_twisted.ensureDeferred
async def test_a_kept_session_ends_at_its_sites_messages_per_connection(world: World) -> None:
    deliverer = Deliverer(reuse_time=30, shaping=_shaping(messages_per_connection=2))
    try:
        kept = []
        for _ in range(3):
            assert only(await _through(deliverer, world, ["bob@pref.test"])).delivered
            kept.append(deliverer.idle("a.mx.test"))
        # 1st: kept; 2nd: the same session's second message, its last: closed;
        # 3rd: a new connection, kept again.
        assert kept == [1, 0, 1]
    finally:
        await deliverer.close()
