"""How the protocol sets up its transport: larger sends for the body."""

from __future__ import annotations

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from txcolombe.client.machine import ClientMachine, TLSMode
from txcolombe.client.protocol import SMTPClientProtocol


class TCPLikeTransport(StringTransport):
    """A transport with a TCP transport's per-send limit (Twisted's: 128 KiB)."""

    SEND_LIMIT = 128 * 1024


def connect(transport: StringTransport) -> SMTPClientProtocol:
    protocol = SMTPClientProtocol(
        lambda local, trace: ClientMachine("client.example.com", tls=TLSMode.NONE, trace=trace),
        reactor=Clock(),
    )
    protocol.makeConnection(transport)
    return protocol


def test_a_tcp_transport_sends_up_to_a_mebibyte_at_a_time() -> None:
    transport = TCPLikeTransport()
    connect(transport)
    assert transport.SEND_LIMIT == 1 << 20
    assert TCPLikeTransport.SEND_LIMIT == 128 * 1024  # this connection only


def test_a_transport_without_a_send_limit_is_left_alone() -> None:
    transport = StringTransport()
    connect(transport)
    assert not hasattr(transport, "SEND_LIMIT")


def test_the_ehlo_fallback_is_our_end_as_an_address_literal() -> None:
    seen: list[str] = []

    def new_machine(local: str, trace: object) -> ClientMachine:
        seen.append(local)
        return ClientMachine(local, tls=TLSMode.NONE)

    for host in (IPv4Address("TCP", "127.0.0.9", 2525), IPv6Address("TCP", "::1", 2525)) * 2:
        protocol = SMTPClientProtocol(new_machine, reactor=Clock())
        protocol.makeConnection(StringTransport(hostAddress=host))
    protocol = SMTPClientProtocol(new_machine, reactor=Clock())
    protocol.makeConnection(StringTransport(hostAddress=UNIXAddress("/tmp/s")))
    assert seen == ["[127.0.0.9]", "[IPv6:::1]"] * 2 + ["localhost"]
