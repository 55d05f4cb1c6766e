"""The Shaper on a fake clock: exact timing of throttled acquisitions and
messages, the connection cap, suspension, resumption and lowered rates."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from txcolombe.codec.reply import Reply
from txcolombe.delivery.shaping import (
    BackoffRules,
    Lease,
    LeaseExhausted,
    LeaseReleased,
    Limits,
    Rate,
    Shaper,
    ShapingPolicy,
)


def shaper(clock: Clock, backoff: BackoffRules | None = None, **limits: Any) -> Shaper:
    for name in ("message_rate", "connection_rate"):
        if name in limits:
            limits[name] = Rate.parse(limits[name])
    return Shaper(ShapingPolicy(default=Limits(**limits)), backoff, clock=clock)


def run_until(clock: Clock, until: float) -> None:
    """Advance ``clock`` from one scheduled call to the next, up to ``until``."""
    while True:
        pending = [call.getTime() for call in clock.getDelayedCalls()]
        if not pending or min(pending) > until:
            break
        clock.advance(max(0.0, min(pending) - clock.seconds()))
    clock.advance(max(0.0, until - clock.seconds()))


def times_of(clock: Clock, deferreds: list[Deferred[Any]], until: float) -> list[float]:
    """When each Deferred fired, running ``clock`` up to ``until``."""
    fired: dict[int, float] = {}

    def note(result: Any, i: int) -> Any:
        fired[i] = clock.seconds()
        return result

    for i, d in enumerate(deferreds):
        d.addCallback(note, i)
    run_until(clock, until)
    assert len(fired) == len(deferreds), f"only {len(fired)} of {len(deferreds)} fired"
    return [fired[i] for i in range(len(deferreds))]


def result(d: Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def test_connection_rate_spaces_acquisitions_exactly() -> None:
    clock = Clock()
    s = shaper(clock, connection_rate="4/s")
    leases = [s.acquire("site") for _ in range(5)]
    assert times_of(clock, leases, 1.5) == pytest.approx([0, 0.25, 0.5, 0.75, 1.0])


def test_message_rate_is_shared_by_the_site_leases() -> None:
    clock = Clock()
    s = shaper(clock, message_rate="10/min")
    first, second = result(s.acquire("site")), result(s.acquire("site"))
    waits = [lease.message() for lease in (first, second, first, second)]
    assert times_of(clock, waits, 200) == [0, 6, 12, 18]
    # Another site has its own counters.
    assert result(result(s.acquire("elsewhere")).message()) is None


def test_concurrency_cap_waits_for_a_release() -> None:
    clock = Clock()
    s = shaper(clock, max_connections=2)
    a, b, c = s.acquire("site"), s.acquire("site"), s.acquire("site")
    held = [result(a), result(b)]
    assert not c.called
    assert s.snapshot()["site"]["connections_open"] == 2
    assert s.snapshot()["site"]["waiting"] == 1
    clock.advance(3600)
    assert not c.called
    held[0].release()
    held[0].release()  # idempotent: frees one slot only
    third = result(c)
    assert third.holds_slot
    d = s.acquire("site")
    assert not d.called
    held[1].release()
    assert result(d).site == "site"
    # A domain override changes the cap checked against the site's counters.
    s.policy = ShapingPolicy(s.policy.default, domains={"big.example": Limits(max_connections=4)})
    assert result(s.acquire("site", "big.example")).limits.max_connections == 4
    assert not s.acquire("site").called


def test_never_more_than_the_cap_at_once_under_churn() -> None:
    clock = Clock()
    s = shaper(clock, max_connections=3, connection_rate="20/s")
    open_now, peak, done, finished_at = 0, 0, 0, 0.0

    def use(lease: Lease) -> None:
        nonlocal open_now, peak
        open_now += 1
        peak = max(peak, open_now)
        clock.callLater(0.33, finish, lease)

    def finish(lease: Lease) -> None:
        nonlocal open_now, done, finished_at
        open_now -= 1
        done += 1
        finished_at = clock.seconds()
        lease.release()

    for _ in range(30):
        s.acquire("site").addCallback(use)
    run_until(clock, 60)
    assert done == 30
    assert peak == 3
    # Ten rounds of three 0.33 s connections, the first three opened 0.05 s
    # apart (20/s): the last starts at 9 x 0.33 + 0.1 and ends 0.33 s later.
    assert finished_at == pytest.approx(3.4)


def test_messages_per_connection() -> None:
    clock = Clock()
    s = shaper(clock, messages_per_connection=2)
    lease = result(s.acquire("site"))
    assert lease.remaining == 2
    result(lease.message())
    result(lease.message())
    assert lease.remaining == 0
    with pytest.raises(LeaseExhausted, match="2 messages"):
        result(lease.message())
    lease.release()
    with pytest.raises(LeaseReleased):
        result(lease.message())
    assert s.snapshot()["site"]["messages_total"] == 2


def test_cancelled_acquisition_frees_its_place() -> None:
    clock = Clock()
    s = shaper(clock, max_connections=1, connection_rate="1/s")
    held = result(s.acquire("site"))
    waiting = s.acquire("site")
    waiting.cancel()
    with pytest.raises(CancelledError):
        result(waiting)
    assert s.snapshot()["site"]["waiting"] == 0
    held.release()
    # This one takes the free slot, then waits for the next token (t=1)...
    later = s.acquire("site")
    assert not later.called
    later.addErrback(lambda f: f.trap(CancelledError))
    later.cancel()
    # ...and gives the slot back when cancelled: the next one gets it.
    assert times_of(clock, [s.acquire("site")], 2) == [1.0]
    assert s.snapshot()["site"]["connections_open"] == 1


def test_slow_down_suspends_resumes_and_lowers_the_rate() -> None:
    clock = Clock()
    rules = BackoffRules(suspend=60, rate_factor=0.5, recover=600)
    s = shaper(clock, rules, message_rate="10/s")
    lease = result(s.acquire("site"))
    assert times_of(clock, [lease.message() for _ in range(3)], 0.5) == pytest.approx([0, 0.1, 0.2])
    clock.advance(10 - clock.seconds())
    assert result(s.report("site", Reply.of(250, "2.0.0 ok"))) is False
    assert result(s.report("site", Reply.of(421, "4.7.0 slow down"))) is True
    snap = s.snapshot()["site"]
    assert snap["suspended"] and snap["suspended_for"] == 60
    assert snap["reason"] == "421 4.7.0 slow down" and snap["rate_factor"] == 0.5
    assert snap["slow_downs"] == 1
    # Nothing until t=70, neither messages nor connections; then 5/s.
    waits = [lease.message() for _ in range(3)] + [s.acquire("site")]
    times = times_of(clock, waits, 71)
    assert times == pytest.approx([70, 70.2, 70.4, 70], abs=1e-9)
    # The rate comes back 600 s after the 421.
    clock.advance(610 - clock.seconds())
    assert times_of(clock, [lease.message() for _ in range(2)], 611) == pytest.approx(
        [610, 610.1], abs=1e-9
    )
    assert s.snapshot()["site"]["rate_factor"] == 1.0
    assert s.snapshot()["site"]["reason"] == ""


def test_slow_down_of_one_site_leaves_others() -> None:
    clock = Clock()
    s = shaper(clock)
    result(s.report("a", "421 4.7.0 go away"))
    assert not s.acquire("a").called
    assert result(s.acquire("b")).site == "b"
    assert s.snapshot()["b"]["suspended"] is False
