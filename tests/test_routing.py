"""The routing rules of direct delivery, in memory: no DNS, no sockets.

RFC 5321 §5.1 (MX order, implicit MX), RFC 7505 (null MX), Postfix's caps,
what a failed attempt means, and the pure parts of MTA-STS (RFC 8461):
record and policy parsing, mx patterns, the cache file.
"""

from __future__ import annotations

import ipaddress
import json
import random
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from txcolombe.codec.address import Mailbox
from txcolombe.codec.errors import (
    ConnectionLost,
    ConnectionRefused,
    InvalidAddress,
    MailboxUnavailable,
    MTASTSError,
    ProcessingError,
    RecipientsRefused,
    ServiceUnavailable,
    Step,
    TLSFailure,
    TransactionFailed,
    UsageError,
)
from txcolombe.codec.reply import Reply
from txcolombe.delivery.mtasts import (
    CachedPolicy,
    Mode,
    Policy,
    PolicyCache,
    mx_matches,
    parse_policy,
    parse_record,
)
from txcolombe.delivery.routing import (
    MX,
    NULL_MX_REPLY,
    AddressPreference,
    Budget,
    Next,
    Target,
    after_session_error,
    after_transaction_error,
    below_self,
    connected,
    domain_key,
    group_recipients,
    implicit_exchanger,
    is_null_mx,
    literal_address,
    loop_reply,
    order_addresses,
    order_exchangers,
    split_refused,
)
from txcolombe.delivery.tlspolicy import TLSPolicy

V4 = ipaddress.IPv4Address
V6 = ipaddress.IPv6Address


# -- grouping recipients --------------------------------------------------------


def test_group_by_domain_keeps_order_and_folds_domain_case() -> None:
    grouping = group_recipients(
        ["a@Example.ORG", "b@example.net", "c@example.org", Mailbox("d", "example.net")]
    )
    assert [g.domain for g in grouping.domains] == ["example.org", "example.net"]
    org, net = grouping.domains
    assert [key for key, _ in org.recipients] == ["a@Example.ORG", "c@example.org"]
    assert [key for key, _ in net.recipients] == ["b@example.net", "d@example.net"]
    assert grouping.invalid == {}


def test_group_uses_a_labels_for_internationalised_domains() -> None:
    grouping = group_recipients(["jürgen@bücher.example", "anna@BÜCHER.example"])
    [group] = grouping.domains
    assert group.domain == "xn--bcher-kva.example"
    assert len(group.recipients) == 2


def test_group_drops_duplicates_but_keeps_local_part_case() -> None:
    grouping = group_recipients(["bob@x.example", "bob@X.EXAMPLE", "Bob@x.example"])
    [group] = grouping.domains
    assert [key for key, _ in group.recipients] == ["bob@x.example", "Bob@x.example"]


def test_group_address_literals_are_their_own_domain() -> None:
    grouping = group_recipients(["a@[192.0.2.1]", "b@[IPv6:2001:DB8::1]", "c@[192.0.2.1]"])
    assert [g.domain for g in grouping.domains] == ["[192.0.2.1]", "[IPv6:2001:db8::1]"]
    assert len(grouping.domains[0].recipients) == 2


def test_group_reports_unroutable_recipients() -> None:
    grouping = group_recipients(["Postmaster", "not an address", "ok@example.org"])
    assert set(grouping.invalid) == {"Postmaster", "not an address"}
    assert all(isinstance(e, InvalidAddress) for e in grouping.invalid.values())
    assert [g.domain for g in grouping.domains] == ["example.org"]


def test_group_refuses_what_utf8_or_a_reparse_cannot_keep() -> None:
    """A lone surrogate used to escape as a bare UnicodeEncodeError and fail
    deliver() as a whole; U+2028 used to be lost when the relay reparsed."""
    bad = ["\udfff@example.com", "<\u2028bob@example.org>"]
    grouping = group_recipients([*bad, "ok@example.org"])
    assert set(grouping.invalid) == set(bad)
    assert all(isinstance(e, InvalidAddress) for e in grouping.invalid.values())
    assert [g.domain for g in grouping.domains] == ["example.org"]


def test_below_self() -> None:
    records = [MX(10, "a.test"), MX(20, "me.test"), MX(20, "b.test"), MX(30, "c.test")]
    me = frozenset({"me.test"})
    assert below_self(records, me) == [MX(10, "a.test")]
    assert below_self(records, frozenset()) == records
    assert below_self([MX(10, "me.test"), MX(20, "b.test")], me) is None
    assert loop_reply("d.test").enhanced_status == (5, 4, 6)


def test_domain_key() -> None:
    assert domain_key("MX.Example.org.") == "mx.example.org"
    assert domain_key("[IPv6:0:0::1]") == "[IPv6:::1]"
    with pytest.raises(InvalidAddress):
        domain_key("bad_domain!")


def test_literal_address() -> None:
    assert literal_address("[192.0.2.1]") == V4("192.0.2.1")
    assert literal_address("[IPv6:::1]") == V6("::1")
    assert literal_address("example.org") is None
    assert literal_address("[not-an-ip]") is None


# -- MX records -------------------------------------------------------------------------


def test_mx_normalises_names() -> None:
    assert MX.of(10, "MX1.Example.ORG.") == MX(10, "mx1.example.org")
    assert MX.of(0, ".").null
    assert MX.of(0, "").null


def test_null_mx() -> None:
    assert is_null_mx([MX.of(0, ".")])
    # RFC 7505 only defines the lone null MX; beside real exchangers the
    # null record is just skipped.
    assert not is_null_mx([MX.of(0, "."), MX.of(10, "mx.example.org")])
    assert not is_null_mx([])
    assert order_exchangers([MX.of(0, "."), MX.of(10, "mx.example.org")]) == ["mx.example.org"]


def test_exchangers_by_preference() -> None:
    records = [MX.of(30, "c.example"), MX.of(10, "a.example"), MX.of(20, "b.example")]
    assert order_exchangers(records, random.Random(1)) == ["a.example", "b.example", "c.example"]


def test_equal_preferences_are_shuffled_over_runs() -> None:
    records = [MX.of(10, f"mx{i}.example") for i in range(3)] + [MX.of(20, "backup.example")]
    firsts: Counter[str] = Counter()
    orders = set()
    rng = random.Random(20240601)
    for _ in range(300):
        order = order_exchangers(records, rng)
        assert order[-1] == "backup.example"  # never shuffled above the better ones
        assert sorted(order[:3]) == ["mx0.example", "mx1.example", "mx2.example"]
        firsts[order[0]] += 1
        orders.add(tuple(order))
    assert len(orders) == 6  # every permutation of the three equals came up
    # Each of the three comes first about a third of the time.
    assert all(60 < firsts[f"mx{i}.example"] < 140 for i in range(3)), firsts


def test_shuffle_depends_only_on_rng_not_on_dns_order() -> None:
    records = [MX.of(10, "a.example"), MX.of(10, "b.example"), MX.of(10, "c.example")]
    one = order_exchangers(records, random.Random(7))
    other = order_exchangers(list(reversed(records)), random.Random(7))
    assert one == other


def test_duplicate_exchanger_tried_once_at_best_preference() -> None:
    records = [MX.of(20, "a.example"), MX.of(10, "a.example"), MX.of(15, "b.example")]
    assert order_exchangers(records) == ["a.example", "b.example"]


@given(st.lists(st.tuples(st.integers(0, 65535), st.sampled_from("abcdefgh")), max_size=12))
def test_order_is_a_preference_sorted_selection(pairs: list[tuple[int, str]]) -> None:
    records = [MX.of(pref, f"{name}.example") for pref, name in pairs]
    order = order_exchangers(records, random.Random(0))
    assert sorted(set(order)) == sorted({r.exchange for r in records})
    best = {name: min(r.preference for r in records if r.exchange == name) for name in order}
    assert [best[name] for name in order] == sorted(best[name] for name in order)


def test_implicit_mx_is_the_domain() -> None:
    assert implicit_exchanger("example.org") == ["example.org"]


# -- addresses and caps ------------------------------------------------------------------


def test_addresses_alternate_families_from_the_preferred() -> None:
    v6 = [V6("2001:db8::1"), V6("2001:db8::2")]
    v4 = [V4("192.0.2.1"), V4("192.0.2.2"), V4("192.0.2.3")]
    assert order_addresses(v6, v4) == [v6[0], v4[0], v6[1], v4[1], v4[2]]
    assert order_addresses(v6, v4, AddressPreference.IPV4) == [v4[0], v6[0], v4[1], v6[1], v4[2]]
    assert order_addresses([], v4) == v4


def test_budget_caps_addresses() -> None:
    budget = Budget(max_addresses=3, max_sessions=10)
    taken = [budget.take(Target("mx.example", V4(f"192.0.2.{i}"))) for i in range(1, 6)]
    assert taken == [True, True, True, False, False]
    assert budget.exhausted


def test_budget_caps_sessions() -> None:
    budget = Budget(max_addresses=10, max_sessions=2)
    assert budget.take(Target("a", V4("192.0.2.1")))
    budget.session()
    assert budget.take(Target("b", V4("192.0.2.2")))
    budget.session()
    assert not budget.take(Target("c", V4("192.0.2.3")))


def test_budget_skips_an_address_seen_under_another_name() -> None:
    budget = Budget()
    assert budget.take(Target("a.example", V4("192.0.2.1")))
    assert not budget.take(Target("b.example", V4("192.0.2.1")))
    assert budget.addresses == 1


def test_budget_defaults_are_postfix_s() -> None:
    budget = Budget()
    assert (budget.max_addresses, budget.max_sessions) == (5, 2)
    with pytest.raises(UsageError):
        Budget(max_addresses=0)


# -- what a failure means ------------------------------------------------------------------


def test_no_session_when_the_connection_failed() -> None:
    assert not connected(ConnectionRefused("refused", step=Step.CONNECT))
    assert connected(ServiceUnavailable("busy", reply=Reply.of(421, "busy"), step=Step.GREETING))
    assert connected(ConnectionLost("lost", step=Step.EHLO))


@pytest.mark.parametrize(
    "error",
    [
        ConnectionRefused("refused", step=Step.CONNECT),
        ServiceUnavailable("421", reply=Reply.of(421, "4.3.2 busy"), step=Step.GREETING),
        TransactionFailed("554", reply=Reply.of(554, "no service"), step=Step.GREETING),
        TLSFailure("bad certificate", step=Step.TLS),
    ],
)
def test_session_failures_move_to_the_next_address(error: Exception) -> None:
    assert after_session_error(error) is Next.NEXT_ADDRESS  # type: ignore[arg-type]


def test_a_usage_error_stops() -> None:
    assert after_session_error(UsageError("no")) is Next.STOP
    assert after_transaction_error(UsageError("no")) is Next.STOP


def test_transaction_5xx_stops_4xx_moves_on() -> None:
    permanent = MailboxUnavailable("no", reply=Reply.of(550, "5.7.1 no"), step=Step.MAIL)
    temporary = ProcessingError("later", reply=Reply.of(451, "4.3.0 later"), step=Step.DATA_END)
    assert after_transaction_error(permanent) is Next.STOP
    assert after_transaction_error(temporary) is Next.NEXT_ADDRESS


def test_loss_after_the_final_dot_stops() -> None:
    before = ConnectionLost("lost", step=Step.BODY)
    after = ConnectionLost("lost", step=Step.DATA_END)
    after.maybe_delivered = True
    assert after_transaction_error(before) is Next.NEXT_ADDRESS
    assert after_transaction_error(after) is Next.STOP


def test_refused_recipients() -> None:
    busy, unknown = Reply.of(450, "4.2.1 busy"), Reply.of(550, "5.1.1 unknown")
    mixed = RecipientsRefused("none", {"a@x": busy, "b@x": unknown})
    only_permanent = RecipientsRefused("none", {"b@x": unknown})
    assert after_transaction_error(mixed) is Next.NEXT_ADDRESS
    assert after_transaction_error(only_permanent) is Next.STOP
    assert split_refused({"a@x": busy, "b@x": unknown}) == ({"a@x": busy}, {"b@x": unknown})


def test_null_mx_reply() -> None:
    assert NULL_MX_REPLY.code == 556
    assert NULL_MX_REPLY.enhanced_status == (5, 1, 10)


# -- TLS policy names ------------------------------------------------------------------------


def test_tls_policy_parse() -> None:
    assert TLSPolicy.parse("May") is TLSPolicy.MAY
    assert TLSPolicy.parse(TLSPolicy.VERIFY) is TLSPolicy.VERIFY
    with pytest.raises(UsageError, match="none, may, encrypt, verify"):
        TLSPolicy.parse("dane")


# -- MTA-STS, the pure parts ------------------------------------------------------------------


def test_record_id() -> None:
    assert parse_record([b"v=STSv1; id=20240601T000000;"]) == "20240601T000000"
    assert parse_record([b"v=spf1 -all", b"v=STSv1;id=abc"]) == "abc"
    assert parse_record([b"v=STSv1; id=abc; ext=1"]) == "abc"


@pytest.mark.parametrize(
    "records",
    [
        [],
        [b"v=spf1 -all"],
        [b"v=STSv1; id=one;", b"v=STSv1; id=two;"],  # two records: no policy
        [b"v=STSv1;"],  # no id
        [b"v=STSv1; id=has-dash"],  # id is alphanumeric only
        [b"v=STSv1; id=" + b"a" * 33],  # at most 32
        [b"x=1; v=STSv1; id=abc"],  # v must come first
    ],
)
def test_record_without_a_valid_id(records: list[bytes]) -> None:
    assert parse_record(records) is None


POLICY = (
    b"version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.example.net\r\n"
    b"max_age: 86400\r\n"
)


def test_parse_policy() -> None:
    policy = parse_policy(POLICY)
    assert policy == Policy(Mode.ENFORCE, ("mail.example.com", "*.example.net"), 86400)
    assert policy.matches("MAIL.example.com.")
    assert policy.matches("mx1.example.net")
    assert not policy.matches("example.net")


def test_parse_policy_lf_unknown_fields_and_first_wins() -> None:
    policy = parse_policy(
        b"version: STSv1\nmode: testing\nmode: enforce\nfuture: x\nmx: a.example\nmax_age:5\n"
    )
    assert (policy.mode, policy.mx, policy.max_age) == (Mode.TESTING, ("a.example",), 5)


def test_parse_policy_caps_max_age() -> None:
    policy = parse_policy(b"version: STSv1\nmode: none\nmax_age: 99999999\n")
    assert policy.max_age == 31_557_600
    assert policy.mx == ()


@pytest.mark.parametrize(
    "body",
    [
        b"version: STSv2\nmode: enforce\nmx: a\nmax_age: 1\n",
        b"version: STSv1\nmode: strict\nmx: a\nmax_age: 1\n",
        b"version: STSv1\nmode: enforce\nmx: a\nmax_age: soon\n",
        b"version: STSv1\nmode: enforce\nmax_age: 1\n",  # enforce without mx
        b"version: STSv1\nmode: enforce\nmx: a\n",  # no max_age
        b"<html>not a policy</html>",
        b"\xff\xfe",
    ],
)
def test_invalid_policies(body: bytes) -> None:
    with pytest.raises(MTASTSError):
        parse_policy(body)


@pytest.mark.parametrize(
    ("pattern", "host", "matches"),
    [
        ("mail.example.com", "mail.example.com", True),
        ("mail.example.com", "Mail.Example.Com.", True),
        ("*.example.com", "mx1.example.com", True),
        ("*.example.com", "example.com", False),
        ("*.example.com", "a.b.example.com", False),
        ("*.example.com", "mx1.example.org", False),
        ("mail.example.com", "other.example.com", False),
    ],
)
def test_mx_patterns(pattern: str, host: str, matches: bool) -> None:
    assert mx_matches(pattern, host) is matches


def test_cached_policy_validity() -> None:
    entry = CachedPolicy(Policy(Mode.ENFORCE, ("a",), 100), "id1", fetched=1000.0)
    assert entry.valid(1099.0)
    assert not entry.valid(1100.0)


def test_policy_cache_persists(tmp_path: Path) -> None:
    path = tmp_path / "sts.json"
    cache = PolicyCache(path)
    entry = CachedPolicy(Policy(Mode.TESTING, ("*.example.net",), 3600), "abc", 12.5)
    cache.put("Example.NET", entry)
    assert json.loads(path.read_text())["policies"]["example.net"]["id"] == "abc"
    again = PolicyCache(path)
    assert again.get("example.net") == entry
    again.forget("example.net")
    assert PolicyCache(path).get("example.net") is None


def test_policy_cache_ignores_a_broken_file(tmp_path: Path) -> None:
    path = tmp_path / "sts.json"
    path.write_text("{not json")
    cache = PolicyCache(path)
    assert len(cache) == 0
    path.write_text(json.dumps({"policies": {"x.example": {"id": "1"}}}))
    assert PolicyCache(path).get("x.example") is None
