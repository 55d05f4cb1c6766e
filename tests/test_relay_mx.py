"""The relay in MX mode: each recipient's domain to its own exchangers.

A DNS server (twisted.names, authoritative for ``test.``) answers on
127.0.0.1; aiosmtpd exchangers listen on 127.0.0.2 and 127.0.0.3 (one port
for both, given to the relay with ``--mx-port``; the DNS server with
``--dns-server``). Clients send with smtplib; what the exchangers receive is
compared byte for byte.
"""

from __future__ import annotations

import smtplib
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.names import common, dns, server
from twisted.names.authority import FileAuthority

from tests.conftest import on_the_wire
from tests.test_relay_e2e import split_received
from tools.peers.aiosmtpd_peer import free_port
from tools.peers.relay_process import RelayProcess

EXCHANGERS = ("127.0.0.2", "127.0.0.3")
HOSTS = {"mx1.one.test": "127.0.0.2", "mx.two.test": "127.0.0.3"}
MXS = {
    "one.test": [(10, "mx1.one.test")],
    "two.test": [(5, "mx.two.test")],
    "nullmx.test": [(0, "")],
}


@dataclass(frozen=True)
class Got:
    exchanger: str
    sender: str
    recipients: list[str]
    data: bytes
    mail_options: tuple[str, ...] = ()


class Room:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.got: list[Got] = []

    def all(self) -> list[Got]:
        with self.lock:
            return list(self.got)


class _Handler:
    def __init__(self, address: str, room: Room) -> None:
        self.address = address
        self.room = room

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if address.split("@")[0].startswith("refuse"):
            return "550 5.1.1 No such user here"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        got = Got(
            self.address,
            envelope.mail_from or "",
            list(envelope.rcpt_tos),
            envelope.original_content or b"",
            tuple(envelope.mail_options),
        )
        with self.room.lock:
            self.room.got.append(got)
        return "250 2.0.0 Accepted"


def _shared_port() -> int:
    """A port free on every exchanger address."""
    for _ in range(50):
        port = free_port()
        try:
            for address in EXCHANGERS:
                with socket.socket() as probe:
                    probe.bind((address, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no port free on every exchanger address")


@pytest.fixture
def exchangers() -> Iterator[tuple[int, Room]]:
    room = Room()
    port = _shared_port()
    controllers = [
        Controller(_Handler(address, room), hostname=address, port=port) for address in EXCHANGERS
    ]
    started = []
    try:
        for controller in controllers:
            controller.start()
            started.append(controller)
        yield port, room
    finally:
        for controller in started:
            controller.stop()


class Zone(FileAuthority):
    """The ``test.`` zone of :data:`HOSTS` and :data:`MXS`."""

    def __init__(self) -> None:
        common.ResolverBase.__init__(self)
        self._cache: dict[Any, Any] = {}
        soa = dns.Record_SOA(mname=b"ns.test", rname=b"root.test", serial=1, minimum=60, expire=60)
        self.soa = (b"test", soa)
        self.records: dict[bytes, list[Any]] = {b"test": [soa]}
        for host, address in HOSTS.items():
            self.records.setdefault(host.encode(), []).append(dns.Record_A(address))
        for domain, mxs in MXS.items():
            for preference, exchange in mxs:
                record = dns.Record_MX(preference, exchange.encode())
                self.records.setdefault(domain.encode(), []).append(record)


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


@pytest.fixture
def relay(tmp_path: Path, exchangers: tuple[int, Room], dns_port: int) -> Iterator[RelayProcess]:
    mx_port, _ = exchangers
    args = [f"--dns-server=127.0.0.1:{dns_port}", f"--mx-port={mx_port}", "--min-backoff=1"]
    running = RelayProcess(tmp_path, free_port(), args).start()
    try:
        yield running
    finally:
        running.stop()


async def until(condition: Any, timeout: float, what: str) -> None:
    """Poll without blocking the reactor (the DNS server runs in it)."""
    for _ in range(int(timeout / 0.05)):
        if condition():
            return
        await deferLater(reactor, 0.05, lambda: None)
    raise AssertionError(f"timed out waiting for {what}")


BODY = (
    b"From: a@one.test\r\nTo: b@one.test, c@two.test\r\nSubject: mx\r\n\r\n"
    b".dot\r\n\xc3\xa9\r\nend\r\n"
)


def _send(port: int, sender: str, recipients: list[str], body: bytes) -> dict[str, Any]:
    with smtplib.SMTP("127.0.0.1", port, "client.test", timeout=10) as client:
        return client.sendmail(sender, recipients, body)


@pytest_twisted.ensureDeferred
async def test_each_domain_to_its_exchanger_byte_exact(
    relay: RelayProcess, exchangers: tuple[int, Room]
) -> None:
    _, room = exchangers
    refused = await deferToThread(
        _send, relay.port, "a@one.test", ["b@one.test", "c@two.test"], BODY
    )
    assert refused == {}
    await until(lambda: len(room.all()) == 2, 20, "both exchangers")
    by_host = {got.exchanger: got for got in room.all()}
    assert by_host["127.0.0.2"].recipients == ["b@one.test"]
    assert by_host["127.0.0.3"].recipients == ["c@two.test"]
    for got in by_host.values():
        assert got.sender == "a@one.test"
        received, body = split_received(got.data)
        assert received.startswith(
            b"Received: from client.test ([127.0.0.1])\r\n"
            b"\tby relay.test (txcolombe) with ESMTP id "
        )
        assert b"for <" not in received  # two recipients: neither named
        assert body == on_the_wire(BODY)
        assert got.data.count(b"Received:") == 1


@pytest_twisted.ensureDeferred
async def test_null_mx_and_refusal_bounce_through_the_senders_exchanger(
    relay: RelayProcess, exchangers: tuple[int, Room]
) -> None:
    _, room = exchangers
    recipients = ["x@nullmx.test", "refuse-me@two.test"]
    refused = await deferToThread(_send, relay.port, "a@one.test", recipients, BODY)
    assert refused == {}
    # both fail for good: one DSN, from <>, to a@one.test at one.test's exchanger
    await until(lambda: len(room.all()) == 1, 20, "the bounce")
    (bounce,) = room.all()
    assert bounce.exchanger == "127.0.0.2" and bounce.sender in ("", "<>")
    assert bounce.recipients == ["a@one.test"]
    for line in (
        b"Final-Recipient: rfc822; x@nullmx.test",
        b"Final-Recipient: rfc822; refuse-me@two.test",
        b"Diagnostic-Code: smtp; 550 5.1.1 No such user here",
        b"Action: failed",
        b"Reporting-MTA: dns; relay.test",
    ):
        assert line in bounce.data, line

    def empty() -> bool:
        return "Mail queue is empty" in relay.control("list").stdout

    await until(empty, 20, "an empty queue")


@pytest_twisted.ensureDeferred
async def test_body_and_smtputf8_pass_through_to_the_exchanger(
    relay: RelayProcess, exchangers: tuple[int, Room]
) -> None:
    """In MX mode too, MAIL's BODY goes on as the client gave it (none stays
    none, though the exchanger offers 8BITMIME), and SMTPUTF8 with it."""
    _, room = exchangers

    def send_three() -> None:
        with smtplib.SMTP("127.0.0.1", relay.port, "client.test", timeout=10) as client:
            for subject, options in (("none", []), ("8bit", ["BODY=8BITMIME"]),
                                     ("utf8", ["SMTPUTF8"])):  # fmt: skip
                data = f"Subject: {subject}\r\n\r\nx\r\n".encode()
                assert client.sendmail("a@one.test", ["b@one.test"], data, options) == {}

    await deferToThread(send_three)
    await until(lambda: len(room.all()) == 3, 20, "three messages")
    got = {
        g.data.split(b"Subject: ")[1].split(b"\r\n")[0]: [
            o for o in g.mail_options if not o.startswith("SIZE")
        ]
        for g in room.all()
    }
    assert got == {b"none": [], b"8bit": ["BODY=8BITMIME"], b"utf8": ["SMTPUTF8"]}
