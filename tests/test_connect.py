"""Reaching a server: TLS client options (made once per server name and trust
root, then reused), addresses reached without an endpoint, this host's name."""

from __future__ import annotations

import importlib

import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionRefusedError, NoRouteError, TimeoutError
from twisted.internet.interfaces import IConnector
from twisted.internet.protocol import ClientFactory
from twisted.internet.ssl import optionsForClientTLS, trustRootFromCertificates
from twisted.internet.testing import MemoryReactorClock

import txcolombe
from tests.helpers import failure_of, result_of
from txcolombe import Receipt, Timeouts, TLSMode
from txcolombe.client.body import body_producer
from txcolombe.client.connect import Host, connect_tcp, default_domain, tls_options
from txcolombe.client.protocol import SMTPClientProtocol
from txcolombe.codec.errors import (
    ConnectionFailed,
    ConnectionRefused,
    ConnectTimeout,
    InvalidAddress,
    Step,
)
from txcolombe.testing import MemorySMTP

CONNECT = importlib.import_module("txcolombe.client.connect")


def test_verified_options_are_reused_for_the_same_name_and_trust_root() -> None:
    host = Host.parse("mx.example.org")
    first = tls_options(host)
    assert tls_options(Host.parse("mx.example.org")) is first
    assert tls_options(Host.parse("mx2.example.org")) is not first


def test_each_trust_root_has_its_own_options() -> None:
    host = Host.parse("mx.example.org")
    root = trustRootFromCertificates([])
    with_root = tls_options(host, trust_root=root)
    assert with_root is not tls_options(host)
    assert tls_options(host, trust_root=root) is with_root
    assert tls_options(host, trust_root=trustRootFromCertificates([])) is not with_root


def test_given_options_are_used_as_they_are() -> None:
    given = optionsForClientTLS("other.example.org")
    assert tls_options(Host.parse("mx.example.org"), tls=given) is given


# -- an address: the reactor's connectTCP, no endpoint between -----------------------------

MESSAGE = b"From: a@example.com\r\nTo: b@example.org\r\nSubject: test\r\n\r\nHello.\r\n"


def sendmail(fake: MemorySMTP, destination: str) -> Deferred[Receipt]:
    return txcolombe.sendmail(
        destination,
        "a@example.com",
        ["b@example.org"],
        body_producer(MESSAGE, cooperator=fake.cooperator),
        starttls=False,
        domain="client.example.com",
        reactor=fake.reactor,
    )


@pytest.mark.parametrize(
    ("destination", "address"),
    [("192.0.2.25", "192.0.2.25"), ("[IPv6:2001:db8::25]", "2001:db8::25")],
)
def test_an_address_is_reached_with_connect_tcp(destination: str, address: str) -> None:
    fake = MemorySMTP()
    d = sendmail(fake, destination)
    [(host, port, _, timeout, _)] = fake.reactor.tcpClients
    assert (host, port, timeout) == (address, 25, Timeouts().connect)
    fake.flush()
    assert list(result_of(d).accepted) == ["b@example.org"]
    # The transport's protocol is the session's own: no wrapping protocol.
    protocol = fake.connections[0].client.protocol
    assert isinstance(protocol, SMTPClientProtocol) and protocol.transport is not None
    assert fake.connections[0].closed and fake.reactor.getDelayedCalls() == []


@pytest.mark.parametrize(
    ("error", "kind", "text"),
    [
        (ConnectionRefusedError(), ConnectionRefused, "192.0.2.25 port 25 refused the connection"),
        (TimeoutError(), ConnectTimeout, "no connection to 192.0.2.25 port 25 in time"),
        (NoRouteError(), ConnectionFailed, "cannot connect to 192.0.2.25 port 25: "),
    ],
)
def test_a_failed_connect_tcp_is_named(
    error: Exception, kind: type[ConnectionFailed], text: str
) -> None:
    fake = MemorySMTP()
    fake.connect_error = error
    d = sendmail(fake, "192.0.2.25")
    fake.flush()
    failure = failure_of(d, kind)
    assert str(failure).startswith(text) and failure.step is Step.CONNECT
    assert failure.__cause__ is error and fake.connections == []


def test_cancel_while_connect_tcp_is_under_way() -> None:
    fake = MemorySMTP()
    d = sendmail(fake, "192.0.2.25")
    d.cancel()
    failure_of(d, CancelledError)
    [connector] = [attempt.connector for attempt in fake._pending]
    assert connector.stoppedConnecting
    fake.flush()
    assert fake.connections == []


def test_a_raising_connect_tcp_fails_the_attempt() -> None:
    class Broken(MemoryReactorClock):
        def connectTCP(self, *args: object, **kwargs: object) -> IConnector:
            raise OSError("no sockets left")

    d = txcolombe.connect("192.0.2.25", tls_mode=TLSMode.NONE, reactor=Broken())
    assert "no sockets left" in str(failure_of(d, ConnectionFailed))


def test_connect_tcp_takes_addresses_only() -> None:
    with pytest.raises(InvalidAddress):
        connect_tcp(MemoryReactorClock(), Host.parse("mx.example.org"), 25, ClientFactory())


# -- this host's name ------------------------------------------------------------------------


def test_the_fqdn_is_looked_up_once_a_minute(monkeypatch: pytest.MonkeyPatch) -> None:
    names = iter(["mail.example.com", "renamed.example.com"])
    lookups: list[str] = []

    def getfqdn() -> str:
        lookups.append(name := next(names))
        return name

    now = [1000.0]
    monkeypatch.setattr(CONNECT, "_fqdn", None)
    monkeypatch.setattr(CONNECT.socket, "getfqdn", getfqdn)
    monkeypatch.setattr(CONNECT.time, "monotonic", lambda: now[0])
    assert default_domain() == default_domain() == "mail.example.com"
    now[0] += CONNECT.FQDN_LIFETIME - 1
    assert default_domain() == "mail.example.com" and len(lookups) == 1
    now[0] += 1
    assert default_domain() == "renamed.example.com" and len(lookups) == 2


@pytest.mark.parametrize("fqdn", ["localhost", "bad_name.example.com"])
def test_an_fqdn_that_is_no_domain_name_gives_none(
    monkeypatch: pytest.MonkeyPatch, fqdn: str
) -> None:
    monkeypatch.setattr(CONNECT, "_fqdn", None)
    monkeypatch.setattr(CONNECT.socket, "getfqdn", lambda: fqdn)
    assert default_domain() is None
