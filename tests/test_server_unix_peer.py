"""A client on a UNIX socket has no address: it must never pass for 127.0.0.1.

A relay trusts loopback clients by default (``--relay-network`` 127.0.0.0/8
and ::1); a UNIX-socket peer called 127.0.0.1 would relay without AUTH.
"""

from __future__ import annotations

import ipaddress
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint, UNIXServerEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread

from txcolombe.relay.queue import QueueManager
from txcolombe.relay.service import RelayHandler
from txcolombe.server.machine import ServerConfig
from txcolombe.server.protocol import UNIX_CLIENT, SMTPServerFactory, SMTPServerProtocol
from txcolombe.server.received import received_header

CONFIG = ServerConfig(hostname="relay.test", local_domains=frozenset({"relay.test"}))
LOOPBACK = [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")]
RELAY_ATTEMPT = [b"EHLO client.test", b"MAIL FROM:<a@client.test>", b"RCPT TO:<b@elsewhere.test>"]


def relay_handler() -> RelayHandler:
    """The relay's own intake handler with its default trusted networks; no spool
    (a refused RCPT never reaches it, only the rejection counter)."""
    queue = cast(QueueManager, SimpleNamespace(counters=SimpleNamespace(rejected=0)))
    return RelayHandler(queue, LOOPBACK, users={})


class PeerTransport(StringTransport):
    def __init__(self, peer: object) -> None:
        super().__init__(peerAddress=peer)


def run(peer: object, lines: list[bytes]) -> tuple[SMTPServerProtocol, list[bytes]]:
    protocol = SMTPServerProtocol(CONFIG, relay_handler(), reactor=Clock())
    transport = PeerTransport(peer)
    protocol.makeConnection(transport)
    for line in lines:
        protocol.dataReceived(line + b"\r\n")
    replies = [r for r in transport.value().split(b"\r\n") if r[3:4] == b" "]
    return protocol, replies


@pytest.mark.parametrize("name", [None, b"/run/relay.sock", b""])
def test_a_unix_peer_is_not_loopback_and_may_not_relay(name: bytes | None) -> None:
    protocol, replies = run(UNIXAddress(name), RELAY_ATTEMPT)
    assert protocol.client_address == UNIX_CLIENT
    assert replies[-1].startswith(b"554 5.7.1 Relay access denied")


def test_a_loopback_peer_may_relay() -> None:
    # The same attempt from 127.0.0.1: the refusal above is for the UNIX peer alone.
    protocol, replies = run(IPv4Address("TCP", "127.0.0.1", 40000), RELAY_ATTEMPT)
    assert protocol.client_address == "127.0.0.1"
    assert replies[-1].startswith(b"250")


def test_no_network_trusts_a_unix_peer() -> None:
    handler = RelayHandler(cast(QueueManager, None), [ipaddress.ip_network("0.0.0.0/0")], users={})
    assert not handler.relay_allowed(UNIX_CLIENT)
    assert handler.relay_allowed("127.0.0.1")


def test_the_received_header_of_a_unix_peer_names_no_address() -> None:
    protocol, _ = run(UNIXAddress(None), [b"EHLO client.test"])
    assert protocol.machine is not None
    envelope = SimpleNamespace(
        helo="client.test",
        client_address=protocol.machine.client_address,
        tls_details=None,
        protocol="ESMTP",
        recipients=[],
        smtputf8=False,
    )
    header = received_header(envelope, "relay.test", "Q1", 0.0)
    assert header.startswith(b"Received: from client.test\r\n\tby relay.test")
    assert b"[" not in header
    envelope.client_address = "192.0.2.1"
    assert received_header(envelope, "relay.test", "Q1", 0.0).startswith(
        b"Received: from client.test ([192.0.2.1])\r\n"
    )


# -- over real sockets -----------------------------------------------------------------------


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    # AF_UNIX paths are short (108 octets): not under pytest's long tmp_path.
    with tempfile.TemporaryDirectory(prefix="txc") as name:
        yield Path(name)


def converse(family: int, address: object, lines: list[bytes]) -> list[bytes]:
    """Blocking: send each line after the previous reply, return the last reply lines."""
    with socket.socket(family, socket.SOCK_STREAM) as client:
        client.settimeout(10)
        client.connect(address)
        stream = client.makefile("rb")
        replies = [stream.readline()]
        for line in lines:
            client.sendall(line + b"\r\n")
            while True:
                reply = stream.readline()
                if reply[3:4] != b"-":
                    break
            replies.append(reply)
        client.sendall(b"QUIT\r\n")
        stream.readline()
        return replies


@pytest_twisted.ensureDeferred
async def test_over_a_unix_socket_the_relay_refuses_to_relay(socket_dir: Path) -> None:
    factory = SMTPServerFactory(CONFIG, relay_handler())
    path = str(socket_dir / "smtp.sock")
    unix_port = await UNIXServerEndpoint(reactor, path).listen(factory)
    tcp_port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    try:
        over_unix: Deferred[list[bytes]] = deferToThread(
            converse, socket.AF_UNIX, path, RELAY_ATTEMPT
        )
        replies = await over_unix
        assert replies[0].startswith(b"220 relay.test")
        assert replies[-1].startswith(b"554 5.7.1 Relay access denied")
        address = ("127.0.0.1", tcp_port.getHost().port)
        over_tcp: Deferred[list[bytes]] = deferToThread(
            converse, socket.AF_INET, address, RELAY_ATTEMPT
        )
        assert (await over_tcp)[-1].startswith(b"250")
    finally:
        await unix_port.stopListening()
        await tcp_port.stopListening()
