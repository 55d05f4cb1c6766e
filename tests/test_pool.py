"""The session pool, in memory: reuse, caps, idle timeout, retry after a dropped connection."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred

from tests.helpers import result_of as result
from txcolombe import Pool, Receipt, TLSMode, UsageError
from txcolombe.testing import MemorySMTP, MemorySMTPServer

MESSAGE = b"Subject: pooled\r\n\r\nhello\r\n"


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
