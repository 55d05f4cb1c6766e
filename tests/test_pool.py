"""The session pool, in memory: reuse, caps, idle timeout, retry after a dropped connection."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.ssl import Certificate

from tests.helpers import result_of as result
from txcolombe import (
    DSN,
    ConnectionFailed,
    ConnectOptions,
    InvalidArgument,
    MessageOptions,
    Pool,
    Receipt,
    Return,
    TLSMode,
    UsageError,
)
from txcolombe.testing import DEFAULT_EXTENSIONS, MemorySMTP, MemorySMTPServer

MESSAGE = b"Subject: pooled\r\n\r\nhello\r\n"


@pytest.fixture
def fake() -> MemorySMTP:
    return MemorySMTP(MemorySMTPServer())


def make() -> tuple[MemorySMTP, Pool]:
    fake = MemorySMTP(MemorySMTPServer())
    pool = Pool(max_per_destination=1, idle_timeout=30.0, max_messages=3, reactor=fake.reactor)
    return fake, pool


ENDPOINTS: dict[int, Any] = {}


def send(fake: MemorySMTP, pool: Pool, rcpt: str = "b@example.org") -> Deferred[Receipt]:
    # One endpoint object per fake server: the pool keys sessions by it.
    endpoint = ENDPOINTS.setdefault(id(fake), fake.endpoint())
    return pool.send(
        "mx.example.org",
        "a@example.com",
        [rcpt],
        MESSAGE,
        domain="client.example.com",
        tls_mode=TLSMode.NONE,
        endpoint=endpoint,
    )


def test_second_message_reuses_the_connection_with_a_pipelined_rset() -> None:
    fake, pool = make()
    first = send(fake, pool)
    fake.flush()
    assert isinstance(result(first), Receipt)
    second = send(fake, pool, "c@example.org")
    fake.flush()
    assert isinstance(result(second), Receipt)
    assert len(fake.server.connections) == 1
    assert [t.recipients for t in fake.server.transactions] == [
        ("b@example.org",),
        ("c@example.org",),
    ]
    commands = [c.split(":")[0].split()[0] for c in fake.server.commands]
    assert commands == ["EHLO", "MAIL", "RCPT", "DATA", "RSET", "MAIL", "RCPT", "DATA"]
    assert pool.idle_sessions == 1


def test_cap_per_destination_queues_messages() -> None:
    fake, pool = make()
    sends = [send(fake, pool, f"r{i}@example.org") for i in range(3)]
    fake.flush()
    assert all(isinstance(result(d), Receipt) for d in sends)
    assert len(fake.server.connections) == 1
    assert len(fake.server.transactions) == 3


def test_max_messages_per_connection() -> None:
    fake, pool = make()
    for i in range(4):
        d = send(fake, pool, f"r{i}@example.org")
        fake.flush()
        result(d)
    # max_messages=3: the fourth message needs a new connection.
    assert len(fake.server.connections) == 2
    assert "QUIT" in fake.server.commands


def test_idle_timeout_quits() -> None:
    fake, pool = make()
    d = send(fake, pool)
    fake.flush()
    result(d)
    assert pool.idle_sessions == 1
    fake.advance(31)
    assert pool.idle_sessions == 0
    assert fake.server.commands[-1] == "QUIT"
    assert fake.reactor.getDelayedCalls() == []


def test_dropped_idle_connection_is_retried_on_a_new_one() -> None:
    fake, pool = make()
    d = send(fake, pool)
    fake.flush()
    result(d)
    # The server has silently dropped the idle connection: the pipelined RSET
    # meets a dead socket before anything of the message is at stake.
    fake.server.script("RSET", None, abort=True)
    again = send(fake, pool, "c@example.org")
    fake.flush()
    receipt = result(again)
    assert list(receipt.accepted) == ["c@example.org"]
    assert len(fake.server.connections) == 2
    assert [t.recipients for t in fake.server.transactions] == [
        ("b@example.org",),
        ("c@example.org",),
    ]


def test_close_quits_idle_sessions_and_refuses_more() -> None:
    fake, pool = make()
    d = send(fake, pool)
    fake.flush()
    result(d)
    closing = Deferred.fromCoroutine(pool.close())
    fake.flush()
    result(closing)
    assert fake.server.commands[-1] == "QUIT"
    with pytest.raises(UsageError):
        later = send(fake, pool)
        fake.flush()
        result(later)


# -- options as the key, the pipelining window, least loaded, idle close -------------------


def test_equal_connect_options_share_a_session_and_different_ones_do_not() -> None:
    fake, pool = make()
    endpoint = fake.endpoint()
    first = ConnectOptions(domain="client.example.com", tls_mode=TLSMode.NONE, endpoint=endpoint)
    twin = ConnectOptions(domain="client.example.com", tls_mode=TLSMode.NONE, endpoint=endpoint)
    other = ConnectOptions(domain="other.example.com", tls_mode=TLSMode.NONE, endpoint=endpoint)
    assert first == twin and hash(first) == hash(twin) and first is not twin
    for options in (first, twin, other):
        d = pool.send("mx.example.org", "a@example.com", ["b@x.org"], MESSAGE, options=options)
        fake.flush()
        result(d)
    assert len(fake.server.connections) == 2
    assert [c.split()[0] for c in fake.server.commands].count("EHLO") == 2
    assert pool.idle_sessions == 2


def test_options_with_an_unhashable_trust_root_still_key_by_value(fake: MemorySMTP) -> None:
    # twisted's Certificate compares by value but has no hash.
    one = ConnectOptions(trust_root=fake.trust_root)
    two = ConnectOptions(trust_root=Certificate.loadPEM(fake.trust_root.dumpPEM()))
    assert one == two and hash(one) == hash(two)
    assert len({one, two, ConnectOptions()}) == 2


def test_options_object_and_keywords_are_not_mixed() -> None:
    fake, pool = make()
    d = pool.send(
        "mx.example.org", "a@example.com", ["b@example.org"], MESSAGE,
        port=2525, options=ConnectOptions(),
    )  # fmt: skip
    with pytest.raises(InvalidArgument, match="not both"):
        result(d)
    assert fake.server.connections == []


def pipelined(fake: MemorySMTP, window: int, sessions: int = 1) -> tuple[Pool, list[int]]:
    """A pool with a ``window`` and a record of the messages in flight at each command."""
    pool = Pool(
        max_per_destination=sessions, pipeline=window, idle_timeout=30.0, reactor=fake.reactor
    )
    seen: list[int] = []

    def count(command: str, argument: str) -> None:
        seen.append(pool.in_flight)

    fake.server.add_responder(count)
    return pool, seen


def test_the_pipelining_window_holds_n_messages_in_flight_never_more(fake: MemorySMTP) -> None:
    pool, seen = pipelined(fake, window=3)
    sends = [send(fake, pool, f"r{i}@example.org") for i in range(7)]
    assert pool.in_flight == 3  # the other four wait for room
    fake.flush()
    assert all(isinstance(result(d), Receipt) for d in sends)
    assert max(seen) == 3 and pool.in_flight == 0
    assert len(fake.server.connections) == 1
    assert [t.recipients for t in fake.server.transactions] == [
        (f"r{i}@example.org",) for i in range(7)
    ]
    # Pipelined behind one another: no RSET between messages in flight.
    assert "RSET" not in fake.server.commands


def test_a_second_session_opens_only_when_the_first_is_full(fake: MemorySMTP) -> None:
    pool, _ = pipelined(fake, window=2, sessions=2)
    sends = [send(fake, pool, f"r{i}@example.org") for i in range(2)]
    fake.flush()
    assert len(fake.server.connections) == 1
    sends += [send(fake, pool, f"r{i}@example.org") for i in range(2, 7)]
    assert pool.in_flight == 4  # two sessions, two each; one message waits
    fake.flush()
    assert all(isinstance(result(d), Receipt) for d in sends)
    assert len(fake.server.connections) == 2
    assert len(fake.server.transactions) == 7


def test_a_pipelining_pool_closes_idle_sessions_on_the_clock(fake: MemorySMTP) -> None:
    pool, _ = pipelined(fake, window=4)
    sends = [send(fake, pool, f"r{i}@example.org") for i in range(3)]
    fake.flush()
    assert all(isinstance(result(d), Receipt) for d in sends)
    fake.advance(29)
    assert pool.idle_sessions == 1 and "QUIT" not in fake.server.commands
    fake.advance(2)
    assert pool.idle_sessions == 0 and fake.server.commands[-1] == "QUIT"
    assert fake.reactor.getDelayedCalls() == []


def test_close_with_abort_drops_busy_sessions(fake: MemorySMTP) -> None:
    pool, _ = pipelined(fake, window=2)
    fake.server.script("DATA", None)  # the server hangs at DATA
    busy = send(fake, pool)
    fake.flush()
    assert not busy.called
    closing = Deferred.fromCoroutine(pool.close(abort=True))
    fake.flush()
    result(closing)
    with pytest.raises(ConnectionFailed):
        result(busy)
    assert fake.server.connections[0].closed


def test_message_options_as_one_object_send_what_the_keywords_send() -> None:
    sent: list[list[str]] = []
    for as_object in (False, True):
        fake = MemorySMTP(MemorySMTPServer(extensions=(*DEFAULT_EXTENSIONS, "DSN")))
        pool = Pool(reactor=fake.reactor)
        wishes = {"dsn": DSN(ret=Return.HDRS, envid="e1")}
        extra: dict[str, Any] = {"message": MessageOptions(**wishes)} if as_object else wishes
        d = pool.send(
            "mx.example.org", "a@example.com", ["b@example.org"], MESSAGE,
            domain="client.example.com", tls_mode=TLSMode.NONE, endpoint=fake.endpoint(),
            **extra,
        )  # fmt: skip
        fake.flush()
        result(d)
        sent.append(fake.server.commands)
    assert sent[0] == sent[1]
    assert any(c.startswith("MAIL") and "RET=HDRS" in c and "ENVID=e1" in c for c in sent[0])


def test_a_server_mailmax_opens_a_new_connection_for_the_next_messages() -> None:
    server = MemorySMTPServer(extensions=(*DEFAULT_EXTENSIONS, "LIMITS MAILMAX=2"))
    smtp = MemorySMTP(server)
    pool = Pool(reactor=smtp.reactor, pipeline=4)
    sends = [
        pool.send(
            "mx.example.org", "a@example.com", [f"r{i}@example.org"], MESSAGE,
            endpoint=smtp.endpoint(), trust_root=smtp.trust_root,
        )
        for i in range(5)
    ]  # fmt: skip
    smtp.flush()
    assert all(isinstance(result(d), Receipt) for d in sends)
    assert len(server.transactions) == 5
    assert len(smtp.connections) == 3  # 2 + 2 + 1 transactions
    smtp.run(pool.close())
