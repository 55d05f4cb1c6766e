"""The relay in MX mode with a ``[shaping]`` section, for real: 200 messages
to one site limited to ``10/s`` and 3 connections take at least 19 s, and
the exchanger, slow enough that four would overlap, never sees more than 3
connections at once; the queue tool shows the site. Two relays sharing one
``10/s`` budget in a private redis-server stay within it together.

A DNS server (twisted.names, test_relay_mx's zone) answers on 127.0.0.1;
an aiosmtpd exchanger on 127.0.0.2 counts its open connections.
"""

from __future__ import annotations

import asyncio
import json
import smtplib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from twisted.internet import reactor
from twisted.internet.defer import DeferredList
from twisted.internet.threads import deferToThread
from twisted.names import dns, server

from tests.test_relay_mx import Zone, until
from tools.peers.aiosmtpd_peer import free_port
from tools.peers.relay_process import ROOT, RelayProcess

MESSAGES = 200
#: Seconds the exchanger takes to answer the final dot.
DATA_DELAY = 0.4


class Counter:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.open = 0
        self.peak = 0
        self.arrivals: list[float] = []


class _CountingSMTP(SMTP):
    counter: Counter

    def connection_made(self, transport: Any) -> None:
        with self.counter.lock:
            self.counter.open += 1
            self.counter.peak = max(self.counter.peak, self.counter.open)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        with self.counter.lock:
            self.counter.open -= 1
        super().connection_lost(error)


class _Handler:
    def __init__(self, counter: Counter) -> None:
        self.counter = counter

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        with self.counter.lock:
            self.counter.arrivals.append(time.monotonic())
        # A slow exchanger: at 10/s, four deliveries would overlap uncapped.
        await asyncio.sleep(DATA_DELAY)
        return "250 2.0.0 OK"


class _Controller(Controller):
    def __init__(self, counter: Counter, **kwargs: Any) -> None:
        super().__init__(_Handler(counter), **kwargs)
        self.counter = counter

    def factory(self) -> SMTP:
        smtp = _CountingSMTP(self.handler, **self.SMTP_kwargs)
        smtp.counter = self.counter
        return smtp


@pytest.fixture
def exchanger() -> Iterator[tuple[int, Counter]]:
    counter = Counter()
    port = free_port()
    controller = _Controller(counter, hostname="127.0.0.2", port=port)
    controller.start()
    try:
        yield port, counter
    finally:
        controller.stop()


@pytest.fixture
def dns_port() -> Iterator[int]:
    factory = server.DNSServerFactory(authorities=[Zone()])
    port = reactor.listenUDP(  # type: ignore[attr-defined]
        0, dns.DNSDatagramProtocol(controller=factory), interface="127.0.0.1"
    )
    try:
        yield port.getHost().port
    finally:
        port.stopListening()


def _send_all(port: int, count: int = MESSAGES) -> None:
    with smtplib.SMTP("127.0.0.1", port, "client.test", timeout=30) as client:
        for i in range(count):
            body = f"Subject: {i}\r\n\r\nmessage {i}\r\n".encode()
            client.sendmail("a@relay.test", [f"r{i}@one.test"], body)


def _queue_tool(spool: Path, *args: str) -> str:
    command = [sys.executable, "-m", "txcolombe.relay.control", "-s", str(spool), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.network
@pytest_twisted.ensureDeferred
async def test_200_messages_at_10_per_second_and_3_connections(
    tmp_path: Path, exchanger: tuple[int, Counter], dns_port: int
) -> None:
    mx_port, counter = exchanger
    config = tmp_path / "relay.toml"
    config.write_text('[shaping.site."mx1.one.test"]\nmessage_rate = "10/s"\nmax_connections = 3\n')
    args = [
        f"--config={config}", f"--dns-server=127.0.0.1:{dns_port}", f"--mx-port={mx_port}",
        "--min-backoff=1",
    ]  # fmt: skip
    with RelayProcess(tmp_path, free_port(), args) as relay:
        await deferToThread(_send_all, relay.port)
        await until(lambda: len(counter.arrivals) >= 5, 30, "the first deliveries")
        sites = json.loads(await deferToThread(_queue_tool, relay.spool, "--json", "shaping"))
        assert sites["mx1.one.test"]["messages_total"] >= 5
        assert sites["mx1.one.test"]["connections_open"] <= 3
        await until(lambda: len(counter.arrivals) >= MESSAGES, 90, "every delivery")
        await until(lambda: counter.open == 0, 10, "the last connection's end")
        expected = f"mx1.one.test: 0 open, 0 waiting, {MESSAGES} messages, 0 slow-downs"
        for _ in range(50):  # the relay frees the lease just after the close
            human = await deferToThread(_queue_tool, relay.spool, "shaping")
            if human.startswith(expected):
                break
    span = counter.arrivals[-1] - counter.arrivals[0]
    print(f"{MESSAGES} messages in {span:.2f} s, at most {counter.peak} connections at once")
    assert len(counter.arrivals) == MESSAGES
    # 200 tokens at 10/s, the first at once: 19.9 s between the first and the
    # last; 3 connections of 0.4 s would allow 7.5/s, so about 26.5 s.
    assert span >= 19.0
    assert span < 45
    assert counter.peak == 3
    assert human.startswith(expected), human


PER_RELAY = 40


@pytest.mark.network
@pytest_twisted.ensureDeferred
async def test_two_relays_share_one_10_per_second_budget_in_redis(
    tmp_path: Path, exchanger: tuple[int, Counter], dns_port: int, redis_server: Any
) -> None:
    mx_port, counter = exchanger
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[shaping]\nredis = "{redis_server.host}:{redis_server.port}"\n'
        '[shaping.default]\nmessage_rate = "10/s"\n'
    )
    args = [
        f"--config={config}", f"--dns-server=127.0.0.1:{dns_port}", f"--mx-port={mx_port}",
        "--min-backoff=1",
    ]  # fmt: skip
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with (
        RelayProcess(tmp_path / "a", free_port(), args) as first,
        RelayProcess(tmp_path / "b", free_port(), args) as second,
    ):
        await DeferredList(
            [deferToThread(_send_all, relay.port, PER_RELAY) for relay in (first, second)],
            fireOnOneErrback=True,
        )
        total = 2 * PER_RELAY
        await until(lambda: len(counter.arrivals) >= total, 60, "every delivery")
        reports = [
            json.loads(await deferToThread(_queue_tool, relay.spool, "--json", "shaping"))
            for relay in (first, second)
        ]
    times = sorted(counter.arrivals)
    span = times[-1] - times[0]
    busiest = max(sum(1 for u in times if t <= u < t + 1.0) for t in times)
    print(f"{total} messages from two relays in {span:.2f} s, at most {busiest} in a second")
    # Each relay alone would send its 40 in 3.9 s; together, 80 tokens: 7.9 s.
    assert span >= 7.9 * 0.95
    # 10 in a second (11 on a closed window), one more for the network's jitter.
    assert busiest <= 12
    assert sum(r["mx1.one.test"]["messages_total"] for r in reports) == total
    assert all(r["mx1.one.test"]["messages_total"] >= PER_RELAY for r in reports)
