"""The relay's MX mode through the shaper, on a fake clock: the shaping flow its
Deliverer runs (txcolombe.delivery.shaping.run.shaped) around a recording MX transport:
deliveries paced per site (domains of one provider together), suspended by a
"slow down" reply, failures of the shaping layer deferred as the relay's own;
the state in the queue tool and the metrics."""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.names import dns

from tests.test_relay_mx import Zone
from txcolombe.codec.address import Mailbox
from txcolombe.codec.reply import Reply
from txcolombe.delivery.outcome import DeliveryStatus as Status
from txcolombe.delivery.outcome import Outcome
from txcolombe.delivery.shaping import (
    BackoffRules,
    Limits,
    MemoryStore,
    Rate,
    Shaper,
    ShapingPolicy,
    SiteResolver,
)
from txcolombe.delivery.shaping.backoff import SiteState
from txcolombe.delivery.shaping.run import shaped as shaped_flow
from txcolombe.relay.control import ControlProtocol, _print_shaping
from txcolombe.relay.metrics import prometheus_text
from txcolombe.relay.transport import shaping_snapshot


class SharedZone(Zone):
    """test_relay_mx's zone, plus a domain hosted on one.test's exchanger."""

    def __init__(self) -> None:
        super().__init__()
        self.records[b"three.test"] = [dns.Record_MX(10, b"mx1.one.test")]


def _outcome(name: str, domain: str, status: Status, text: str = "250 2.0.0 OK") -> Outcome:
    code, _, rest = text.partition(" ")
    return Outcome(name, domain, status, mx=f"mx.{domain}", reply=Reply.of(int(code), rest))


class Inner:
    """An MX transport that records when it was asked, and answers ``reply``."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.calls: list[tuple[float, str, list[str]]] = []
        self.reply: tuple[Status, str] = (Status.DELIVERED, "250 2.0.0 OK")
        self.closed = False
        #: When a list, each send waits on a new Deferred appended to it.
        self.held: list[Deferred[dict[str, Outcome]]] | None = None

    def route(self, recipient: Mailbox) -> str:
        return (recipient.domain or "").lower()

    def send(
        self, destination: str, sender: Mailbox | None, recipients: Sequence[Mailbox], data: bytes
    ) -> Deferred[dict[str, Outcome]]:
        names = [str(r) for r in recipients]
        self.calls.append((self.clock.seconds(), destination, names))
        if self.held is not None:
            self.held.append(Deferred())
            return self.held[-1]
        status, text = self.reply
        return succeed({n: _outcome(n, destination, status, text) for n in names})

    def close(self) -> Deferred[None]:
        self.closed = True
        return succeed(None)


class ShapedTransport:
    """A recording MX transport, each delivery through the shaping flow, and its
    shaper where the relay's MX transport has it (``deliverer.shaper``)."""

    def __init__(self, inner: Inner, shaper: Shaper, sites: SiteResolver) -> None:
        self.inner = inner
        self.sites = sites
        self.deliverer = SimpleNamespace(shaper=shaper)

    def send(
        self, destination: str, sender: Mailbox | None, recipients: Sequence[Mailbox], data: bytes
    ) -> Deferred[dict[str, Outcome]]:
        names = [str(r) for r in recipients]

        def deliver() -> Deferred[dict[str, Outcome]]:
            return self.inner.send(destination, sender, recipients, data)

        shaper = self.deliverer.shaper
        return Deferred.fromCoroutine(shaped_flow(shaper, self.sites, destination, names, deliver))

    def close(self) -> Deferred[None]:
        self.inner.close()
        closing: Deferred[None] = self.deliverer.shaper.close()
        return closing


def shaped(clock: Clock, store: Any = None, **limits: Any) -> tuple[ShapedTransport, Inner, Shaper]:
    inner = Inner(clock)
    rules = BackoffRules(suspend=60, rate_factor=0.5, recover=600)
    shaper = Shaper(ShapingPolicy(default=Limits(**limits)), rules, store=store, clock=clock)
    sites = SiteResolver(SharedZone(), clock=clock)
    return ShapedTransport(inner, shaper, sites), inner, shaper


def send(transport: ShapedTransport, *addresses: str) -> Deferred[dict[str, Outcome]]:
    rcpts = [Mailbox.parse(a) for a in addresses]
    return transport.send(rcpts[0].domain or "", Mailbox.parse("s@relay.test"), rcpts, b"x\r\n")


def result(d: Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "not fired"
    return out[0]


def run(clock: Clock, until: float) -> None:
    while clock.getDelayedCalls():
        at = min(c.getTime() for c in clock.getDelayedCalls())
        if at > until:
            break
        clock.advance(max(0.0, at - clock.seconds()))
    clock.advance(max(0.0, until - clock.seconds()))


def test_domains_of_one_site_share_its_rate() -> None:
    clock = Clock()
    transport, inner, _ = shaped(clock, message_rate=Rate.parse("2/s"))
    sent = [send(transport, f"u{i}@{'one' if i % 2 else 'three'}.test") for i in range(4)]
    sent.append(send(transport, "v@two.test"))  # its own site: not held up
    run(clock, 5)
    assert all(result(d) for d in sent)
    assert [(t, d) for t, d, _ in inner.calls] == [
        (0.0, "three.test"), (0.0, "two.test"), (0.5, "one.test"), (1.0, "three.test"),
        (1.5, "one.test"),
    ]  # fmt: skip
    snapshot = shaping_snapshot(transport)
    assert snapshot["mx1.one.test"]["messages_total"] == 4
    assert snapshot["mx1.one.test"]["connections_open"] == 0
    assert snapshot["mx.two.test"]["messages_total"] == 1


def test_a_slow_down_reply_suspends_the_site() -> None:
    clock = Clock()
    transport, inner, shaper = shaped(clock, message_rate=Rate.parse("10/s"))
    inner.reply = (Status.TEMPORARY, "421 4.7.0 Too many messages, slow down")
    first = result(send(transport, "a@one.test"))
    assert first["a@one.test"].status is Status.TEMPORARY
    snapshot = shaper.snapshot()["mx1.one.test"]
    assert snapshot["suspended"] and snapshot["reason"].startswith("421 4.7.0")
    # Another domain of the site waits out the suspension too.
    inner.reply = (Status.DELIVERED, "250 2.0.0 OK")
    later = send(transport, "b@three.test")
    run(clock, 59.9)
    assert not later.called
    run(clock, 60.0)
    assert result(later)["b@three.test"].status is Status.DELIVERED
    # Resumed at half the rate (5/s) for a while.
    following = send(transport, "c@one.test")
    run(clock, 60.1)
    assert not following.called
    run(clock, 60.2)
    assert following.called
    assert [t for t, _, _ in inner.calls] == pytest.approx([0.0, 60.0, 60.2])


def test_other_failures_do_not_suspend() -> None:
    clock = Clock()
    transport, inner, shaper = shaped(clock)
    inner.reply = (Status.PERMANENT, "550 5.1.1 No such user")
    result(send(transport, "a@one.test"))
    inner.reply = (Status.TEMPORARY, "450 4.2.0 Mailbox busy")
    result(send(transport, "b@one.test"))
    assert shaper.snapshot()["mx1.one.test"]["suspended"] is False
    assert len(inner.calls) == 2


def test_the_connection_cap_holds_deliveries() -> None:
    clock = Clock()
    transport, inner, shaper = shaped(clock, max_connections=1)
    inner.held = []
    first, second = send(transport, "a@one.test"), send(transport, "b@three.test")
    assert len(inner.calls) == 1 and shaper.snapshot()["mx1.one.test"]["waiting"] == 1
    clock.advance(30)
    inner.held[0].callback({"a@one.test": _outcome("a@one.test", "one.test", Status.DELIVERED)})
    assert result(first)["a@one.test"].status is Status.DELIVERED
    # The slot is free: the second delivery starts, and holds it.
    assert [t for t, _, _ in inner.calls] == [0.0, 30.0]
    assert not second.called
    assert shaper.snapshot()["mx1.one.test"]["connections_open"] == 1
    inner.held[1].callback(
        {"b@three.test": _outcome("b@three.test", "three.test", Status.DELIVERED)}
    )
    assert result(second)["b@three.test"].status is Status.DELIVERED
    assert shaper.snapshot()["mx1.one.test"]["connections_open"] == 0


def test_unknown_domains_go_straight_to_deliver() -> None:
    clock = Clock()
    transport, inner, shaper = shaped(clock, max_connections=1)
    result(send(transport, "a@nosuch.test"))
    assert [d for _, d, _ in inner.calls] == ["nosuch.test"]
    assert shaper.snapshot() == {}


class BrokenStore(MemoryStore):
    def state(self, site: str) -> Deferred[SiteState]:
        return fail(ConnectionError("redis is down"))


def test_a_broken_store_defers_as_the_relays_own_failure() -> None:
    clock = Clock()
    transport, inner, _ = shaped(clock, store=BrokenStore())
    out = result(send(transport, "a@one.test"))["a@one.test"]
    assert out.status is Status.TEMPORARY and out.local == "software"
    assert out.text == "traffic shaping unavailable: ConnectionError: redis is down"
    assert inner.calls == []


def test_cancelled_while_waiting_is_a_shutdown_and_frees_the_slot() -> None:
    clock = Clock()
    transport, inner, shaper = shaped(clock, max_connections=1, message_rate=Rate.parse("1/min"))
    result(send(transport, "a@one.test"))
    waiting = send(transport, "b@one.test")
    assert not waiting.called
    waiting.cancel()
    out = result(waiting)["b@one.test"]
    assert out.status is Status.TEMPORARY and out.local == "shutdown"
    assert shaper.snapshot()["mx1.one.test"]["connections_open"] == 0
    result(transport.close())
    assert inner.closed


def test_queue_tool_and_metrics_show_the_sites(capsys: pytest.CaptureFixture[str]) -> None:
    clock = Clock()
    transport, inner, shaper = shaped(clock)
    inner.reply = (Status.TEMPORARY, '421 4.7.28 "rate" limited')
    result(send(transport, "a@one.test"))

    class Queue:
        def __init__(self) -> None:
            self.transport = transport

        def stats(self) -> dict[str, int]:
            return {"received": 1}

    queue: Any = Queue()
    snapshot = ControlProtocol(queue).handle("shaping", "")
    assert snapshot == shaper.snapshot()
    assert snapshot["mx1.one.test"]["suspended_for"] == 60
    _print_shaping(snapshot)
    assert capsys.readouterr().out == (
        "mx1.one.test: 0 open, 0 waiting, 1 messages, 1 slow-downs; suspended 60s more "
        '(421 4.7.28 "rate" limited); rate x0.5 for 600s\n'
    )
    text = prometheus_text(queue).decode()
    assert 'smtprelay_shaping_suspended{site="mx1.one.test"} 1' in text
    assert 'smtprelay_shaping_rate_factor{site="mx1.one.test"} 0.5' in text
    assert 'smtprelay_shaping_slow_downs_total{site="mx1.one.test"} 1' in text
    assert "# TYPE smtprelay_shaping_messages_total counter" in text
    # Unshaped (smarthost mode): nothing.
    queue.transport = inner
    assert ControlProtocol(queue).handle("shaping", "") == {}
    assert "shaping" not in prometheus_text(queue).decode()


def test_cancel_is_not_swallowed_before_a_lease() -> None:
    clock = Clock()
    transport, _, shaper = shaped(clock)
    result(shaper.report("mx1.one.test", "421 busy"))
    waiting = send(transport, "a@one.test")
    waiting.cancel()
    assert result(waiting)["a@one.test"].local == "shutdown"
    assert shaper.snapshot()["mx1.one.test"]["waiting"] == 0
