"""The sans-I/O shaping rules: rates, GCRA, site names (and their lookup in a
fake zone), policies, back-off."""

from __future__ import annotations

import re
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from txcolombe.codec.errors import NoSuchDomain
from txcolombe.codec.reply import Reply
from txcolombe.delivery.shaping import (
    BackoffRules,
    Limits,
    Rate,
    RateError,
    ShapingPolicy,
    SiteNamer,
    SiteResolver,
    SiteState,
)
from txcolombe.delivery.shaping.backoff import slow_down
from txcolombe.delivery.shaping.throttle import gcra


@pytest.mark.parametrize(
    ("text", "count", "period"),
    [
        ("10/s", 10, 1),
        ("1000/h", 1000, 3600),
        ("50/min", 50, 60),
        ("5/10s", 5, 10),
        (" 2 / day ", 2, 86400),
        ("0.5/s", 0.5, 1),
        ("3/M", 3, 60),
    ],
)
def test_rate_parse(text: str, count: float, period: float) -> None:
    rate = Rate.parse(text)
    assert (rate.count, rate.period) == (count, period)
    assert rate.interval == pytest.approx(period / count)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("10", "expected COUNT/UNIT"),
        ("ten/s", "expected COUNT/UNIT"),
        ("10/fortnight", "unknown unit 'fortnight'"),
        ("0/s", "must be positive"),
        ("10/0s", "must be positive"),
        ("", "expected COUNT/UNIT"),
        ("-1/s", "expected COUNT/UNIT"),
    ],
)
def test_rate_parse_errors(text: str, message: str) -> None:
    with pytest.raises(RateError, match=re.escape(message)):
        Rate.parse(text)


def test_rate_parse_refuses_non_strings() -> None:
    with pytest.raises(RateError, match="not a string"):
        Rate.parse(10)  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["10/s", "1000/h", "50/min", "2/d", "5/10s"])
def test_rate_str_round_trips(text: str) -> None:
    assert str(Rate.parse(text)) == text


def test_gcra_spaces_tokens_by_the_interval() -> None:
    tat = None
    granted = []
    now = 0.0
    while now < 1.0:
        decision = gcra(tat, now, 0.25)
        if decision.granted:
            granted.append(now)
            tat = decision.tat
        else:
            assert decision.tat == tat
            assert decision.wait == pytest.approx(tat - now)
        now = round(now + 0.05, 10)
    assert granted == pytest.approx([0.0, 0.25, 0.5, 0.75])


def test_gcra_after_idleness_does_not_bank_tokens() -> None:
    first = gcra(None, 0.0, 1.0)
    later = gcra(first.tat, 100.0, 1.0)
    assert later.granted and later.tat == 101.0
    assert not gcra(later.tat, 100.5, 1.0).granted


def test_site_names_are_the_sorted_hosts() -> None:
    namer = SiteNamer()
    assert namer.name(["MX2.example.net.", "mx1.example.net", "mx1.example.net"]) == (
        "mx1.example.net,mx2.example.net"
    )
    with pytest.raises(ValueError, match="at least one host"):
        namer.name(["", "."])


def test_site_patterns_group_providers() -> None:
    namer = SiteNamer.of({"google": r"\.google\.com$", "outlook": r"\.outlook\.com$"})
    gmail = ["gmail-smtp-in.l.google.com", "alt1.gmail-smtp-in.l.google.com"]
    workspace = ["aspmx.l.google.com", "alt2.aspmx.l.google.com"]
    assert namer.name(gmail) == namer.name(workspace) == "google"
    assert namer.name(["x.mail.protection.outlook.com"]) == "outlook"
    # Every host must match: a mixed set is its own site.
    assert namer.name(["aspmx.l.google.com", "backup.example.org"]) == (
        "aspmx.l.google.com,backup.example.org"
    )
    with pytest.raises(re.error):
        SiteNamer.of({"bad": "("})


def test_policy_most_specific_wins_field_by_field() -> None:
    policy = ShapingPolicy(
        default=Limits(max_connections=10, message_rate=Rate.parse("100/s")),
        sites={"google": Limits(max_connections=5, connection_rate=Rate.parse("1/s"))},
        domains={"example.com": Limits(max_connections=2)},
    )
    assert policy.limits("other") == Limits(10, None, Rate.parse("100/s"))
    assert policy.limits("google") == Limits(5, None, Rate.parse("100/s"), Rate.parse("1/s"))
    assert policy.limits("google", "Example.COM.") == Limits(
        2, None, Rate.parse("100/s"), Rate.parse("1/s")
    )
    assert policy.limits("other", "example.com").max_connections == 2


@pytest.mark.parametrize("field", ["max_connections", "messages_per_connection"])
@pytest.mark.parametrize("value", [0, -3, True])
def test_limits_refuse_counts_below_one(field: str, value: int) -> None:
    with pytest.raises(ValueError, match=field):
        Limits(**{field: value})


@pytest.mark.parametrize(
    "reply",
    [
        Reply.of(421, "4.7.0 Too many connections, try later"),
        Reply.of(451, "4.7.1 Please slow down"),
        Reply.of(450, "4.7.28 Our system has detected an unusual rate of mail"),
        Reply.of(
            452,
            "4.2.1 The user you are trying to contact is receiving mail at a rate"
            " that prevents additional messages",
            "rate limit exceeded",
        ),
        "421 service shutting down",
    ],
)
def test_default_patterns_mean_slow_down(reply: Reply | str) -> None:
    reason = BackoffRules().reason(reply)
    assert reason is not None and reason.startswith(str(reply)[:3])


@pytest.mark.parametrize(
    "reply",
    [
        Reply.of(250, "2.0.0 OK"),
        Reply.of(450, "4.2.0 mailbox busy"),
        Reply.of(451, "4.3.0 temporary local problem"),
        Reply.of(550, "5.1.1 no such user"),
        Reply.of(554, "5.7.1 relay denied, 421 is not our code here"),
    ],
)
def test_other_replies_do_not(reply: Reply) -> None:
    assert BackoffRules().reason(reply) is None


def test_patterns_are_configurable() -> None:
    rules = BackoffRules.of([r"^550 5\.7\.1 .*throttled"])
    assert rules.reason(Reply.of(550, "5.7.1 you are throttled")) is not None
    assert rules.reason(Reply.of(421, "4.7.0 busy")) is None
    with pytest.raises(re.error):
        BackoffRules.of(["[unclosed"])


def test_rules_refuse_inconsistent_factors() -> None:
    with pytest.raises(ValueError, match="min_rate_factor"):
        BackoffRules(rate_factor=0.5, min_rate_factor=0.8)
    with pytest.raises(ValueError, match="negative"):
        BackoffRules(suspend=-1)


def test_slow_down_lowers_once_per_suspension_and_recovers() -> None:
    rules = BackoffRules(suspend=60, rate_factor=0.5, min_rate_factor=0.2, recover=600)
    state = slow_down(SiteState(), 100.0, "421 a", rules)
    assert state == SiteState(160.0, "421 a", 0.5, 700.0)
    # Another connection's 421 while suspended: longer, not slower.
    state = slow_down(state, 130.0, "421 b", rules)
    assert state == SiteState(190.0, "421 b", 0.5, 730.0)
    # After the suspension, a new one lowers again, down to the floor.
    state = slow_down(state, 200.0, "421 c", rules)
    assert state.factor == 0.25
    state = slow_down(state, 300.0, "421 d", rules)
    assert state.factor == 0.2
    assert state.at(899.0).factor == 0.2
    assert state.at(900.0) == SiteState()
    assert state.snapshot(350.0) == {
        "suspended": True,
        "suspended_for": 10.0,
        "reason": "421 d",
        "rate_factor": 0.2,
        "lowered_for": 550.0,
    }


class CountingZone:
    """An IResolver stand-in: test_relay_mx's zone, counting the queries."""

    def __init__(self) -> None:
        from tests.test_relay_mx import Zone

        self.zone = Zone()
        self.queries: list[bytes] = []

    def query(self, query: Any, timeout: Any = None) -> Any:
        self.queries.append(query.name.name)
        return self.zone.query(query, timeout)


def test_site_resolver_names_and_caches() -> None:
    clock = Clock()
    zone = CountingZone()
    sites = SiteResolver(zone, clock=clock, ttl=300)  # type: ignore[arg-type]

    def site(domain: str) -> str:
        out: list[Any] = []
        Deferred.fromCoroutine(sites.site(domain)).addBoth(out.append)
        if isinstance(out[0], Failure):
            out[0].raiseException()
        return str(out[0])

    assert site("One.Test.") == "mx1.one.test"
    assert site("one.test") == "mx1.one.test"
    assert zone.queries == [b"one.test"]
    clock.advance(300)
    assert site("one.test") == "mx1.one.test"
    assert zone.queries == [b"one.test"] * 2
    # A domain with only a null MX, or none: the domain itself.
    assert site("nullmx.test") == "nullmx.test"
    assert site("mx1.one.test") == "mx1.one.test"
    with pytest.raises(NoSuchDomain):
        site("nosuch.test")
