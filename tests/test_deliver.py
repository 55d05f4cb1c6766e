"""deliver() against real servers on loopback, with zones of our own.

The world of these tests:

- a DNS server (twisted.names' authoritative server) on 127.0.0.1, a UDP
  port the system picks, serving the zone ``test.`` below; the resolver
  given to deliver() asks it and nothing else;
- SMTP servers (aiosmtpd) on 127.0.0.2 ... 127.0.0.6 and ::1, all on one
  port (deliver() has one ``port``), each with a certificate from a test
  CA naming its exchanger; Twisted servers on 127.0.0.10/.11 that greet
  with 421 and 554; nothing at all on 127.0.0.9 and 127.0.0.31-36;
- an HTTPS server (twisted.web) on 127.0.0.20 serving MTA-STS policies,
  with a certificate from the same CA.

Every server is stopped by the fixture that started it. Linux routes all of
127/8 to the loopback interface, so no address here leaves the host.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import random
import socket
import ssl
import threading
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from twisted.internet import reactor as _reactor
from twisted.internet import ssl as twisted_ssl
from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.logger import globalLogPublisher
from twisted.names import client, common, dns, server
from twisted.names.authority import FileAuthority
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from txcolombe.client.options import Timeouts
from txcolombe.codec.dsn import DSN
from txcolombe.codec.errors import (
    ConnectionLost,
    ConnectionRefused,
    DNSFailure,
    ExtensionUnavailable,
    InvalidAddress,
    MailboxBusy,
    MailboxUnavailable,
    MailLoop,
    NoMailExchanger,
    NoSuchDomain,
    NullMX,
    PolicyViolation,
    ProcessingError,
    ServiceUnavailable,
    STARTTLSRefused,
    STARTTLSUnavailable,
    TLSFailure,
    TransactionFailed,
    UsageError,
)
from txcolombe.codec.sasl import Authentication
from txcolombe.delivery.deliver import (
    DeliveryResult,
    DeliveryStatus,
    Outcome,
    default_mta_sts,
    deliver,
)
from txcolombe.delivery.mtasts import MTASTS, Mode, PolicyCache
from txcolombe.delivery.tlspolicy import TLSLevel, TLSPolicy

reactor: Any = _reactor

pytestmark = pytest.mark.network

QUICK = Timeouts(
    connect=5.0,
    greeting=10.0,
    command=10.0,
    mail=10.0,
    rcpt=10.0,
    data_start=10.0,
    data_block=10.0,
    data_end=15.0,
    quit=5.0,
)

MESSAGE = b"From: a@client.test\r\nTo: b@pref.test\r\nSubject: direct\r\n\r\nHello, exchanger.\r\n"

# -- the exchangers ---------------------------------------------------------------

#: name -> (listening address, certificate names or None for no STARTTLS, kind)
PEERS: dict[str, tuple[str, list[str] | None, str]] = {
    "a": ("127.0.0.2", ["a.mx.test", "implicit.test", "127.0.0.2"], "smtp"),
    "b": ("127.0.0.3", ["b.mx.test", "127.0.0.3"], "smtp"),
    "plain": ("127.0.0.4", None, "smtp"),
    "broken": ("127.0.0.5", ["broken.mx.test"], "alert-tls"),
    "dropper": ("127.0.0.7", ["dropper.mx.test"], "drop-tls"),
    "refuser": ("127.0.0.8", ["refuser.mx.test"], "refuse-tls"),
    "wrong": ("127.0.0.6", ["somebody-else.example"], "smtp"),
    "v6": ("::1", ["v6.mx.test", "::1"], "smtp"),
}
DEAD = ["127.0.0.9", *(f"127.0.0.{i}" for i in range(31, 37))]
GREETERS = {"busy": ("127.0.0.10", b"421 4.3.2 busy, try another exchanger\r\n"),
            "reject": ("127.0.0.11", b"554 5.7.1 no SMTP service here\r\n")}  # fmt: skip
HTTPS_ADDRESS = "127.0.0.20"


@dataclass(frozen=True)
class Received:
    peer: str
    sender: str
    recipients: list[str]
    data: bytes
    tls: bool


@dataclass
class Mailroom:
    """What every exchanger received, and hooks for the gate test."""

    received: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    gate: threading.Event = field(default_factory=threading.Event)

    def by(self, peer: str) -> list[Received]:
        with self.lock:
            return [r for r in self.received if r.peer == peer]

    def clear(self) -> None:
        with self.lock:
            self.received.clear()
        self.gate.clear()


class _Handler:
    """Recipients' local parts choose the answers:

    ``refuse*`` 550 at RCPT; ``later*`` 450 at RCPT; ``flaky*`` 451 at the
    end of data on exchanger a only; ``rejectdata*`` 554 at the end of data
    everywhere; ``gate*`` on a waits until b has seen a ``gate*`` recipient.
    """

    def __init__(self, name: str, room: Mailroom) -> None:
        self.name = name
        self.room = room

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        local = address.split("@")[0].lower()
        if local.startswith("refuse"):
            return "550 5.1.1 No such user here"
        if local.startswith("later"):
            return "450 4.2.1 Mailbox busy, try later"
        if local.startswith("gate") and self.name == "b":
            self.room.gate.set()
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        locals_ = [r.split("@")[0].lower() for r in envelope.rcpt_tos]
        if any(local.startswith("rejectdata") for local in locals_):
            return "554 5.6.0 Content rejected"
        if self.name == "a" and any(local.startswith("flaky") for local in locals_):
            return "451 4.3.0 Try another exchanger"
        if self.name == "a" and any(local.startswith("gate") for local in locals_):
            loop = asyncio.get_running_loop()
            if not await loop.run_in_executor(None, self.room.gate.wait, 10.0):
                return "451 4.4.0 b never saw its recipient: no concurrency"
        with self.room.lock:
            self.room.received.append(
                Received(
                    peer=self.name,
                    sender=envelope.mail_from or "",
                    recipients=list(envelope.rcpt_tos),
                    data=envelope.original_content or b"",
                    tls=session.ssl is not None,
                )
            )
            number = len(self.room.received)
        return f"250 2.0.0 OK queued as {self.name.upper()}{number:04d}"


class _DroppingSMTP(SMTP):
    """Offers STARTTLS, says 220, and hangs up once the client's hello begins:
    the handshake ends with the connection, not with an alert."""

    async def smtp_STARTTLS(self, arg: str) -> None:
        await self.push("220 2.0.0 Ready to start TLS")
        await self._reader.read(1)  # the ClientHello has begun
        assert self.transport is not None
        self.transport.close()


class _RefusingSMTP(SMTP):
    """Offers STARTTLS and answers it with 454 (RFC 3207 §4)."""

    async def smtp_STARTTLS(self, arg: str) -> None:
        await self.push("454 4.7.0 TLS not available due to temporary reason")


#: A TLS 1.2 record: fatal alert, handshake_failure (RFC 5246 §7.2).
HANDSHAKE_FAILURE_ALERT = bytes([21, 3, 3, 0, 2, 2, 40])


class _AlertingSMTP(SMTP):
    """Offers STARTTLS, says 220, reads the client's hello and answers it with
    a fatal handshake_failure alert. (asyncio's own TLS would hang up without
    sending its alert, which is the dropping case.)"""

    async def smtp_STARTTLS(self, arg: str) -> None:
        await self.push("220 2.0.0 Ready to start TLS")
        await self._reader.read(1)  # the ClientHello has begun
        assert self.transport is not None
        self.transport.write(HANDSHAKE_FAILURE_ALERT)
        self.transport.close()


SMTP_CLASSES: dict[str, type[SMTP]] = {
    "drop-tls": _DroppingSMTP,
    "alert-tls": _AlertingSMTP,
    "refuse-tls": _RefusingSMTP,
}


class _Controller(Controller):
    def __init__(self, handler: _Handler, *, smtp: type[SMTP], **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._smtp = smtp

    def factory(self) -> SMTP:
        return self._smtp(self.handler, **self.SMTP_kwargs)


def _shared_port(addresses: list[str]) -> int:
    """A port number free on every one of ``addresses``."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind((addresses[0], 0))
            port: int = probe.getsockname()[1]
        try:
            for address in addresses:
                family = socket.AF_INET6 if ":" in address else socket.AF_INET
                with socket.socket(family) as sock:
                    sock.bind((address, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no port free on every test address")


@dataclass
class Exchangers:
    port: int
    room: Mailroom
    ca: trustme.CA
    trust_root: twisted_ssl.Certificate


@pytest.fixture(scope="module")
def exchangers() -> Iterator[Exchangers]:
    """The aiosmtpd exchangers, one port for all, stopped at the end of the module."""
    ca = trustme.CA()
    room = Mailroom()
    everyone = [address for address, _, _ in PEERS.values()]
    everyone += DEAD + [address for address, _ in GREETERS.values()] + [HTTPS_ADDRESS]
    port = _shared_port(everyone)
    started: list[Controller] = []
    try:
        for name, (address, names, kind) in PEERS.items():
            options: dict[str, Any] = {"server_hostname": f"{name}.mx.test"}
            if names is not None:
                context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                ca.issue_cert(*names).configure_cert(context)
                options["tls_context"] = context
            controller = _Controller(
                _Handler(name, room),
                smtp=SMTP_CLASSES.get(kind, SMTP),
                hostname=address,
                port=port,
                **options,
            )
            controller.start()
            started.append(controller)
        yield Exchangers(port, room, ca, twisted_ssl.Certificate.loadPEM(ca.cert_pem.bytes()))
    finally:
        for controller in started:
            controller.stop()


@pytest.fixture
def room(exchangers: Exchangers) -> Iterator[Mailroom]:
    exchangers.room.clear()
    yield exchangers.room
    exchangers.room.clear()


class _Greeter(Protocol):
    def __init__(self, greeting: bytes) -> None:
        self.greeting = greeting

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.greeting)
        self.transport.loseConnection()


@pytest_twisted.async_yield_fixture()
async def greeters(exchangers: Exchangers) -> AsyncIterator[None]:
    """Servers that refuse at the greeting, stopped after the test."""
    ports = [
        reactor.listenTCP(
            exchangers.port,
            Factory.forProtocol(lambda greeting=greeting: _Greeter(greeting)),
            interface=address,
        )
        for address, greeting in GREETERS.values()
    ]
    try:
        yield None
    finally:
        for port in ports:
            await port.stopListening()


# -- the zone ----------------------------------------------------------------------------

HOSTS = {
    "a.mx.test": ["127.0.0.2"],
    "b.mx.test": ["127.0.0.3"],
    "plain.mx.test": ["127.0.0.4"],
    "broken.mx.test": ["127.0.0.5"],
    "dropper.mx.test": ["127.0.0.7"],
    "refuser.mx.test": ["127.0.0.8"],
    "wrong.mx.test": ["127.0.0.6"],
    "v6.mx.test": ["::1"],
    "dead.mx.test": ["127.0.0.9"],
    "busy.mx.test": ["127.0.0.10"],
    "reject.mx.test": ["127.0.0.11"],
    "implicit.test": ["127.0.0.2"],
    "dual.mx.test": ["::1", "127.0.0.2"],
    **{f"dead{i}.mx.test": [f"127.0.0.{30 + i}"] for i in range(1, 7)},
}
MXS: dict[str, list[tuple[int, str]]] = {
    "pref.test": [(20, "b.mx.test"), (10, "a.mx.test")],
    "equal.test": [(10, "a.mx.test"), (10, "b.mx.test")],
    "nullmx.test": [(0, "")],
    "deadfirst.test": [(10, "dead.mx.test"), (20, "a.mx.test")],
    "alldead.test": [(10, "dead.mx.test")],
    "busyfirst.test": [(10, "busy.mx.test"), (20, "b.mx.test")],
    "rejectfirst.test": [(10, "reject.mx.test"), (20, "a.mx.test")],
    "sessions.test": [(10, "busy.mx.test"), (20, "reject.mx.test"), (30, "a.mx.test")],
    "many.test": [*((10, f"dead{i}.mx.test") for i in range(1, 7)), (20, "a.mx.test")],
    "v6.test": [(10, "v6.mx.test")],
    "dual.test": [(10, "dual.mx.test")],
    "ghost.test": [(10, "ghost.mx.test"), (20, "a.mx.test")],
    "onlyghost.test": [(10, "ghost.mx.test")],
    "viaalias.test": [(10, "alias.mx.test")],
    "plain.test": [(10, "plain.mx.test")],
    "broken.test": [(10, "broken.mx.test")],
    "dropper.test": [(10, "dropper.mx.test")],
    "refuser.test": [(10, "refuser.mx.test")],
    "wrong.test": [(10, "wrong.mx.test")],
    "wrongfirst.test": [(10, "wrong.mx.test"), (20, "b.mx.test")],
    # MTA-STS domains
    "sts-enforce.test": [(5, "wrong.mx.test"), (10, "a.mx.test")],
    "sts-enforce-bad.test": [(10, "wrong.mx.test")],
    "sts-nomatch.test": [(10, "a.mx.test")],
    "sts-testing.test": [(10, "wrong.mx.test")],
    "sts-none.test": [(10, "plain.mx.test")],
    "sts-big.test": [(10, "plain.mx.test")],
    "sts-bigchunked.test": [(10, "plain.mx.test")],
    "sts-redirect.test": [(10, "plain.mx.test")],
    "sts-html.test": [(10, "plain.mx.test")],
    "sts-slow.test": [(10, "plain.mx.test")],
    "sts-cache.test": [(10, "a.mx.test")],
}
CNAMES = {"alias.test": "pref.test", "alias.mx.test": "a.mx.test"}
SERVFAIL = {"servfail.test"}
SILENT = {"silent.test"}


def _policy(mode: str, *mx: str, max_age: int = 86400) -> bytes:
    lines = ["version: STSv1", f"mode: {mode}", *(f"mx: {m}" for m in mx), f"max_age: {max_age}"]
    return ("\r\n".join(lines) + "\r\n").encode()


#: Over 64 KiB, and a policy that would fail delivery were it used.
BIG_POLICY = _policy("enforce", "nowhere.test", *(f"filler{i:05d}.test" for i in range(4000)))
STS_DOMAINS = [domain for domain in MXS if domain.startswith("sts-")]


class _ServFail(Exception):
    """Makes the DNS server answer SERVFAIL."""


class Zone(FileAuthority):
    """The ``test.`` zone, from the tables above; mutable by tests."""

    def __init__(self) -> None:
        common.ResolverBase.__init__(self)
        self._cache: dict[Any, Any] = {}
        soa = dns.Record_SOA(mname=b"ns.test", rname=b"root.test", serial=1, minimum=60, expire=60)
        self.soa = (b"test", soa)
        self.records: dict[bytes, list[Any]] = {b"test": [soa]}
        for host, addresses in HOSTS.items():
            for address in addresses:
                record = dns.Record_AAAA(address) if ":" in address else dns.Record_A(address)
                self.add(host, record)
        for domain, mxs in MXS.items():
            for preference, exchange in mxs:
                self.add(domain, dns.Record_MX(preference, exchange.encode()))
        for alias, target in CNAMES.items():
            self.add(alias, dns.Record_CNAME(target.encode()))
        for domain in STS_DOMAINS:
            self.add(f"mta-sts.{domain}", dns.Record_A(HTTPS_ADDRESS))
            self.set_sts_id(domain, "1")

    def add(self, name: str, record: Any) -> None:
        self.records.setdefault(name.encode(), []).append(record)

    def set_sts_id(self, domain: str, ident: str | None) -> None:
        name = f"_mta-sts.{domain}".encode()
        self.records.pop(name, None)
        if ident is not None:
            # Two strings, which the client must join.
            self.records[name] = [dns.Record_TXT(b"v=STSv1; ", f"id={ident};".encode())]

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any = None) -> Deferred[Any]:
        key = name.decode().lower()
        if key in SERVFAIL:
            return Deferred.fromCoroutine(_raise(_ServFail(key)))
        if key in SILENT:
            return Deferred()  # never answered: the client times out
        return super()._lookup(name, cls, type, timeout)  # type: ignore[no-any-return]


async def _raise(error: Exception) -> Any:
    raise error


class LoopbackResolver(client.Resolver):
    """A client resolver whose query sockets are bound to 127.0.0.1 only."""

    def _connectedProtocol(self, interface: str = "") -> Any:
        return super()._connectedProtocol(interface="127.0.0.1")


# -- the MTA-STS server ------------------------------------------------------------------


class PolicyServer(Resource):
    """Serves ``/.well-known/mta-sts.txt`` by host name, counting requests."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.hits: Counter[str] = Counter()
        self.answers: dict[str, tuple[str, Any]] = {
            "mta-sts.sts-enforce.test": ("policy", _policy("enforce", "a.mx.test")),
            "mta-sts.sts-enforce-bad.test": ("policy", _policy("enforce", "*.mx.test")),
            "mta-sts.sts-nomatch.test": ("policy", _policy("enforce", "mail.elsewhere.test")),
            "mta-sts.sts-testing.test": ("policy", _policy("testing", "a.mx.test")),
            "mta-sts.sts-none.test": ("policy", _policy("none")),
            "mta-sts.sts-big.test": ("policy", BIG_POLICY),
            "mta-sts.sts-bigchunked.test": ("chunked", BIG_POLICY),
            "mta-sts.sts-redirect.test": (
                "redirect",
                b"https://mta-sts.sts-nomatch.test/.well-known/mta-sts.txt",
            ),
            "mta-sts.sts-cache.test": ("policy", _policy("enforce", "a.mx.test", max_age=100)),
            "mta-sts.sts-html.test": ("html", _policy("enforce", "mail.elsewhere.test")),
            "mta-sts.sts-slow.test": ("never", None),
        }

    def render_GET(self, request: Any) -> Any:
        host = request.getRequestHostname().decode()
        self.hits[host] += 1
        kind, value = self.answers.get(host, ("status", 404))
        if request.path != b"/.well-known/mta-sts.txt" or kind == "status":
            request.setResponseCode(404 if kind != "status" else value)
            return b"not found\n"
        if kind == "redirect":
            request.setResponseCode(302)
            request.setHeader(b"location", value)
            return b""
        if kind == "never":
            return NOT_DONE_YET  # the client gives up first
        request.setHeader(b"content-type", b"text/html" if kind == "html" else b"text/plain")
        if kind == "chunked":
            for start in range(0, len(value), 4096):
                request.write(value[start : start + 4096])
            request.finish()
            return NOT_DONE_YET
        return value


@dataclass
class World:
    resolver: client.Resolver
    zone: Zone
    policies: PolicyServer
    https_port: int
    exchangers: Exchangers
    room: Mailroom

    def mta_sts(self, **kwargs: Any) -> MTASTS:
        return MTASTS(https_port=self.https_port, **kwargs)

    def deliver(
        self, recipients: Any, body: Any = MESSAGE, **kwargs: Any
    ) -> Deferred[DeliveryResult]:
        options: dict[str, Any] = {
            "domain": "client.test",
            "port": self.exchangers.port,
            "resolver": self.resolver,
            "reactor": reactor,
            "timeouts": QUICK,
            "trust_root": self.exchangers.trust_root,
            "mta_sts_trust_root": self.exchangers.trust_root,
            "rng": random.Random(0),
        }
        options.update(kwargs)
        if "mta_sts" not in options:
            options["mta_sts"] = self.mta_sts()
        return deliver("alice@client.test", recipients, body, **options)


@pytest_twisted.async_yield_fixture()
async def world(exchangers: Exchangers, room: Mailroom, greeters: None) -> AsyncIterator[World]:
    zone = Zone()
    dns_port = reactor.listenUDP(
        0,
        dns.DNSDatagramProtocol(controller=server.DNSServerFactory(authorities=[zone])),
        interface="127.0.0.1",
    )
    policies = PolicyServer()
    leaf = exchangers.ca.issue_cert(*(f"mta-sts.{domain}" for domain in STS_DOMAINS))
    tls = twisted_ssl.PrivateCertificate.loadPEM(leaf.private_key_and_cert_chain_pem.bytes())
    site = Site(policies)
    site.noisy = False
    https = reactor.listenSSL(0, site, tls.options(), interface=HTTPS_ADDRESS)
    resolver = LoopbackResolver(servers=[("127.0.0.1", dns_port.getHost().port)], reactor=reactor)
    try:
        yield World(resolver, zone, policies, https.getHost().port, exchangers, room)
    finally:
        await https.stopListening()
        await dns_port.stopListening()


def only(result: DeliveryResult) -> Outcome:
    [outcome] = result.values()
    return outcome


@contextlib.contextmanager
def captured_log() -> Iterator[list[str]]:
    from twisted.logger import formatEvent

    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if str(event.get("log_namespace", "")).startswith("txcolombe"):
            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    try:
        yield lines
    finally:
        globalLogPublisher.removeObserver(observe)


# -- routing ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_lowest_preference_first(world: World) -> None:
    result = await world.deliver(["bob@pref.test"])
    outcome = result["bob@pref.test"]
    assert outcome.status is DeliveryStatus.DELIVERED
    assert (outcome.mx, outcome.address) == ("a.mx.test", "127.0.0.2")
    assert outcome.reply is not None and outcome.reply.code == 250
    assert outcome.queue_id is not None and outcome.queue_id.startswith("A")
    assert [a.host for a in outcome.attempts] == ["a.mx.test"]
    [received] = world.room.by("a")
    assert received.recipients == ["bob@pref.test"]
    assert received.data == MESSAGE
    assert received.sender == "alice@client.test"
    assert world.room.by("b") == []
    assert result.complete and result.delivered == ["bob@pref.test"]


@pytest_twisted.ensureDeferred
async def test_equal_preferences_spread_over_runs(world: World) -> None:
    rng = random.Random(5)
    chosen: Counter[str] = Counter()
    for _ in range(16):
        outcome = only(await world.deliver(["bob@equal.test"], rng=rng))
        assert outcome.delivered
        assert outcome.mx is not None
        chosen[outcome.mx] += 1
    assert set(chosen) == {"a.mx.test", "b.mx.test"}, chosen
    assert len(world.room.by("a")) == chosen["a.mx.test"]
    assert len(world.room.by("b")) == chosen["b.mx.test"]


@pytest_twisted.ensureDeferred
async def test_implicit_mx(world: World) -> None:
    outcome = only(await world.deliver(["bob@implicit.test"], tls_policy="verify"))
    assert outcome.delivered
    assert (outcome.mx, outcome.address) == ("implicit.test", "127.0.0.2")
    # The certificate must name the implicit exchanger: the domain itself.
    assert outcome.tls is not None and outcome.tls.level is TLSLevel.VERIFIED


@pytest_twisted.ensureDeferred
async def test_cname_of_the_domain_is_followed(world: World) -> None:
    outcome = only(await world.deliver(["bob@alias.test"]))
    assert outcome.delivered
    assert outcome.mx == "a.mx.test"
    assert outcome.domain == "alias.test"


@pytest_twisted.ensureDeferred
async def test_cname_of_an_exchanger_is_followed(world: World) -> None:
    outcome = only(await world.deliver(["bob@viaalias.test"]))
    assert outcome.delivered
    assert (outcome.mx, outcome.address) == ("alias.mx.test", "127.0.0.2")


@pytest.mark.parametrize(
    ("options", "extension"),
    [({"dsn": DSN(envid="q1", orcpt=True)}, "DSN"), ({"requiretls": True}, "REQUIRETLS")],
)
@pytest_twisted.ensureDeferred
async def test_dsn_and_requiretls_reach_the_exchanger(
    world: World, options: dict[str, Any], extension: str
) -> None:
    """deliver() passes dsn= and requiretls= to the transaction: the
    exchangers (aiosmtpd) offer neither, so the message is not sent, rather
    than sent without what was asked."""
    outcome = only(await world.deliver(["bob@pref.test"], **options))
    assert not outcome.delivered
    assert isinstance(outcome.error, ExtensionUnavailable)
    assert extension in str(outcome.error)
    assert world.room.received == []


@pytest.mark.parametrize(
    ("domain", "identities"),
    [
        ("pref.test", ["client.test", "A.MX.test."]),  # our name is the best MX
        ("pref.test", ["127.0.0.2"]),  # the best MX's address is ours
        ("implicit.test", ["implicit.test"]),  # no MX: the domain names us
        ("[127.0.0.2]", ["[127.0.0.2]"]),
    ],
)
@pytest_twisted.ensureDeferred
async def test_mail_for_ourselves_is_a_loop(
    world: World, domain: str, identities: list[str]
) -> None:
    outcome = only(await world.deliver([f"bob@{domain}"], local_identities=identities))
    assert outcome.permanent
    assert isinstance(outcome.error, MailLoop)
    assert f"mail for {domain} loops back to myself" in str(outcome.error)
    assert outcome.enhanced_status == (5, 4, 6)
    assert outcome.attempts == ()
    assert world.room.received == []


@pytest_twisted.ensureDeferred
async def test_backup_mx_drops_itself_and_those_below(world: World) -> None:
    """As the preference-20 MX of deadfirst.test, we only try the better one
    (dead): the message is deferred, never handed to ourselves."""
    outcome = only(await world.deliver(["bob@deadfirst.test"], local_identities=["a.mx.test"]))
    assert outcome.temporary
    assert [a.host for a in outcome.attempts] == ["dead.mx.test"]
    assert world.room.received == []


@pytest_twisted.ensureDeferred
async def test_nxdomain_is_permanent(world: World) -> None:
    outcome = only(await world.deliver(["bob@nowhere.test"]))
    assert outcome.status is DeliveryStatus.PERMANENT
    assert isinstance(outcome.error, NoSuchDomain)
    assert outcome.enhanced_status == (5, 1, 2)
    assert outcome.attempts == ()


@pytest_twisted.ensureDeferred
async def test_servfail_is_temporary(world: World) -> None:
    outcome = only(await world.deliver(["bob@servfail.test"]))
    assert outcome.status is DeliveryStatus.TEMPORARY
    assert isinstance(outcome.error, DNSFailure)
    assert outcome.enhanced_status == (4, 4, 3)
    assert "server failure" in str(outcome.error)


@pytest_twisted.ensureDeferred
async def test_dns_timeout_is_temporary(world: World) -> None:
    outcome = only(await world.deliver(["bob@silent.test"], dns_timeout=(0.2, 0.2)))
    assert outcome.status is DeliveryStatus.TEMPORARY
    assert isinstance(outcome.error, DNSFailure)
    assert "timeout" in str(outcome.error)


@pytest_twisted.ensureDeferred
async def test_cancel(world: World) -> None:
    delivery = world.deliver(["bob@silent.test", "carol@pref.test"], dns_timeout=(2.0,))
    delivery.cancel()
    with pytest.raises(CancelledError):
        await delivery


@pytest_twisted.ensureDeferred
async def test_null_mx_fails_at_once(world: World) -> None:
    outcome = only(await world.deliver(["bob@nullmx.test"]))
    assert outcome.status is DeliveryStatus.PERMANENT
    assert isinstance(outcome.error, NullMX)
    assert outcome.error.code == 556
    assert outcome.error.enhanced_status == (5, 1, 10)
    assert outcome.attempts == ()
    assert world.room.received == []


@pytest_twisted.ensureDeferred
async def test_dead_first_exchanger_is_skipped(world: World) -> None:
    outcome = only(await world.deliver(["bob@deadfirst.test"]))
    assert outcome.delivered
    assert outcome.mx == "a.mx.test"
    dead, used = outcome.attempts
    assert (dead.host, dead.address) == ("dead.mx.test", "127.0.0.9")
    assert isinstance(dead.error, ConnectionRefused)
    assert used.error is None


@pytest_twisted.ensureDeferred
async def test_every_exchanger_dead_is_temporary(world: World) -> None:
    outcome = only(await world.deliver(["bob@alldead.test"]))
    assert outcome.status is DeliveryStatus.TEMPORARY
    assert isinstance(outcome.error, ConnectionRefused)


@pytest_twisted.ensureDeferred
async def test_4xx_greeting_moves_on(world: World) -> None:
    outcome = only(await world.deliver(["bob@busyfirst.test"]))
    assert outcome.delivered
    assert outcome.mx == "b.mx.test"
    busy = outcome.attempts[0]
    assert isinstance(busy.error, ServiceUnavailable)
    assert busy.error.code == 421


@pytest_twisted.ensureDeferred
async def test_5xx_greeting_moves_on(world: World) -> None:
    outcome = only(await world.deliver(["bob@rejectfirst.test"]))
    assert outcome.delivered
    assert outcome.mx == "a.mx.test"
    assert isinstance(outcome.attempts[0].error, TransactionFailed)
    assert outcome.attempts[0].error.code == 554


@pytest_twisted.ensureDeferred
async def test_session_cap(world: World) -> None:
    # Two servers answered (and refused): Postfix's cap of 2 sessions stops
    # there, and refusals at the greeting only ever defer.
    capped = only(await world.deliver(["bob@sessions.test"]))
    assert capped.status is DeliveryStatus.TEMPORARY
    assert [a.host for a in capped.attempts] == ["busy.mx.test", "reject.mx.test"]
    assert world.room.received == []
    more = only(await world.deliver(["bob@sessions.test"], max_sessions=3))
    assert more.delivered and more.mx == "a.mx.test"


@pytest_twisted.ensureDeferred
async def test_address_cap(world: World) -> None:
    capped = only(await world.deliver(["bob@many.test"]))
    assert capped.status is DeliveryStatus.TEMPORARY
    assert len(capped.attempts) == 5
    assert all(isinstance(a.error, ConnectionRefused) for a in capped.attempts)
    more = only(await world.deliver(["bob@many.test"], max_addresses=7))
    assert more.delivered and more.mx == "a.mx.test"
    assert len(more.attempts) == 7


@pytest_twisted.ensureDeferred
async def test_exchanger_without_address_is_skipped(world: World) -> None:
    outcome = only(await world.deliver(["bob@ghost.test"]))
    assert outcome.delivered
    assert [a.host for a in outcome.attempts] == ["a.mx.test"]


@pytest_twisted.ensureDeferred
async def test_no_usable_exchanger(world: World) -> None:
    outcome = only(await world.deliver(["bob@onlyghost.test"]))
    assert outcome.status is DeliveryStatus.PERMANENT
    assert isinstance(outcome.error, NoMailExchanger)
    assert outcome.enhanced_status == (5, 4, 4)
    assert "ghost.mx.test" in str(outcome.error)


@pytest_twisted.ensureDeferred
async def test_ipv6_exchanger(world: World) -> None:
    outcome = only(await world.deliver(["bob@v6.test"], tls_policy="verify"))
    assert outcome.delivered
    assert (outcome.mx, outcome.address) == ("v6.mx.test", "::1")
    assert len(world.room.by("v6")) == 1


@pytest_twisted.ensureDeferred
async def test_address_family_preference(world: World) -> None:
    # dual.mx.test has ::1 (the v6 exchanger) and 127.0.0.2 (exchanger a).
    six = only(await world.deliver(["bob@dual.test"]))
    assert six.delivered and six.address == "::1"
    four = only(await world.deliver(["bob@dual.test"], address_preference="ipv4"))
    assert four.delivered and four.address == "127.0.0.2"
    assert len(world.room.by("v6")) == 1 and len(world.room.by("a")) == 1


@pytest_twisted.ensureDeferred
async def test_address_literals(world: World) -> None:
    result = await world.deliver(["bob@[127.0.0.3]", "carol@[IPv6:::1]"], tls_policy="verify")
    four, six = result["bob@[127.0.0.3]"], result["carol@[IPv6:::1]"]
    assert four.delivered and four.address == "127.0.0.3"
    assert six.delivered and six.address == "::1"
    # The certificate is checked against the address itself.
    assert four.tls is not None and four.tls.level is TLSLevel.VERIFIED
    assert [r.recipients for r in world.room.by("b")] == [["bob@[127.0.0.3]"]]
    assert [r.recipients for r in world.room.by("v6")] == [["carol@[IPv6:::1]"]]


# -- transactions --------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_per_recipient_outcomes(world: World) -> None:
    result = await world.deliver(["ok@pref.test", "refuse@pref.test", "later@pref.test"])
    ok, refused, later = (
        result[r] for r in ("ok@pref.test", "refuse@pref.test", "later@pref.test")
    )
    assert ok.delivered and ok.mx == "a.mx.test"
    assert refused.status is DeliveryStatus.PERMANENT
    assert isinstance(refused.error, MailboxUnavailable)
    assert refused.reply is not None and refused.reply.code == 550
    # 450 at a: tried again at b, which also says 450.
    assert later.status is DeliveryStatus.TEMPORARY
    assert isinstance(later.error, MailboxBusy)
    assert [a.host for a in later.attempts] == ["a.mx.test", "b.mx.test"]
    assert [r.recipients for r in world.room.by("a")] == [["ok@pref.test"]]
    assert world.room.by("b") == []
    assert result.permanent == ["refuse@pref.test"]
    assert result.temporary == ["later@pref.test"]


@pytest_twisted.ensureDeferred
async def test_4xx_to_the_transaction_tries_the_next_exchanger(world: World) -> None:
    outcome = only(await world.deliver(["flaky@pref.test"]))
    assert outcome.delivered
    assert outcome.mx == "b.mx.test"
    first = outcome.attempts[0]
    assert isinstance(first.error, ProcessingError)
    assert first.error.code == 451
    assert world.room.by("b")[0].data == MESSAGE


@pytest_twisted.ensureDeferred
async def test_5xx_to_the_transaction_is_final(world: World) -> None:
    outcome = only(await world.deliver(["rejectdata@pref.test"]))
    assert outcome.status is DeliveryStatus.PERMANENT
    assert outcome.error is not None and outcome.error.code == 554
    assert [a.host for a in outcome.attempts] == ["a.mx.test"]  # b never tried


@pytest_twisted.ensureDeferred
async def test_domains_in_parallel_one_transaction_each(world: World) -> None:
    recipients = [
        "x@pref.test",
        "y@pref.test",
        "z@v6.test",
        "w@[127.0.0.3]",
        "n@nullmx.test",
        "q@nowhere.test",
        "not an address",
    ]
    result = await world.deliver(recipients)
    assert list(result) == recipients
    assert result.delivered == ["x@pref.test", "y@pref.test", "z@v6.test", "w@[127.0.0.3]"]
    assert result.permanent == ["n@nullmx.test", "q@nowhere.test", "not an address"]
    assert isinstance(result["not an address"].error, InvalidAddress)
    [to_a] = world.room.by("a")
    assert to_a.recipients == ["x@pref.test", "y@pref.test"]  # one transaction
    assert len(world.room.by("v6")) == 1 and len(world.room.by("b")) == 1


@pytest_twisted.ensureDeferred
async def test_domains_really_run_at_the_same_time(world: World) -> None:
    # a holds its DATA until b has seen its recipient: only concurrent
    # deliveries get both through (else a answers 451 after 10 s).
    result = await world.deliver(["gate@pref.test", "gate@[127.0.0.3]"], max_concurrency=2)
    assert result.complete, result
    assert result["gate@pref.test"].mx == "a.mx.test"


def _chunks() -> Iterator[bytes]:
    yield b"Subject: streamed\r\n\r\n"
    for i in range(2000):
        yield b"line %05d of a body that is sent more than once\r\n" % i


@pytest.mark.parametrize("kind", ["iterator", "file", "bytesio"])
@pytest_twisted.ensureDeferred
async def test_bodies_are_replayed(world: World, tmp_path: Path, kind: str) -> None:
    expected = b"".join(_chunks())
    body: Any
    if kind == "iterator":
        body = _chunks()
    elif kind == "file":
        path = tmp_path / "body.eml"
        path.write_bytes(b"junk before the start" + expected)
        body = path.open("rb")
        body.seek(len(b"junk before the start"))
    else:
        body = io.BytesIO(expected)
    try:
        # Three domains, and a retry at b after a's 451: four sends.
        result = await world.deliver(
            ["flaky@pref.test", "v@v6.test", "w@[127.0.0.2]"], body, max_concurrency=3
        )
    finally:
        if kind == "file":
            body.close()
    assert result.complete, result
    datas = [r.data for r in world.room.received]
    assert len(datas) == 3
    assert all(data == expected for data in datas)


# -- TLS policy levels -------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_policy_none(world: World) -> None:
    outcome = only(await world.deliver(["bob@pref.test"], tls_policy="none"))
    assert outcome.delivered
    assert outcome.tls is not None
    assert outcome.tls.level is TLSLevel.NONE
    assert outcome.tls.policy is TLSPolicy.NONE
    assert "not attempted" in outcome.tls.reason
    assert world.room.by("a")[0].tls is False


@pytest_twisted.ensureDeferred
async def test_policy_may_verified_when_it_can_be(world: World) -> None:
    outcome = only(await world.deliver(["bob@pref.test"]))
    assert outcome.tls is not None
    assert outcome.tls.level is TLSLevel.VERIFIED
    assert outcome.tls.policy is TLSPolicy.MAY
    assert outcome.tls.session is not None
    assert outcome.tls.session.version in ("TLSv1.2", "TLSv1.3")
    assert world.room.by("a")[0].tls is True


@pytest_twisted.ensureDeferred
async def test_policy_may_accepts_unverified_certificates(world: World) -> None:
    wrong = only(await world.deliver(["bob@wrong.test"]))
    assert wrong.delivered
    assert wrong.tls is not None and wrong.tls.level is TLSLevel.ENCRYPTED
    assert "does not name wrong.mx.test" in wrong.tls.reason
    untrusted = only(await world.deliver(["bob@pref.test"], trust_root=None))
    assert untrusted.delivered
    assert untrusted.tls is not None and untrusted.tls.level is TLSLevel.ENCRYPTED
    assert "not trusted" in untrusted.tls.reason
    assert all(r.tls for r in world.room.received)


@pytest_twisted.ensureDeferred
async def test_policy_may_without_starttls(world: World) -> None:
    outcome = only(await world.deliver(["bob@plain.test"]))
    assert outcome.delivered
    assert outcome.tls is not None and outcome.tls.level is TLSLevel.NONE
    assert "does not offer STARTTLS" in outcome.tls.reason


@pytest.mark.parametrize(
    ("peer", "error"),
    [("broken", TLSFailure), ("dropper", ConnectionLost), ("refuser", STARTTLSRefused)],
)
@pytest_twisted.ensureDeferred
async def test_policy_may_retries_a_failed_handshake_in_plaintext(
    world: World, peer: str, error: type[Exception]
) -> None:
    outcome = only(await world.deliver([f"bob@{peer}.test"]))
    assert outcome.delivered
    assert outcome.tls is not None and outcome.tls.level is TLSLevel.NONE
    assert "retried in plaintext" in outcome.tls.reason
    failed, plain = outcome.attempts
    address = PEERS[peer][0]
    assert (failed.address, plain.address) == (address, address)
    assert isinstance(failed.error, error)
    assert plain.error is None
    assert world.room.by(peer)[0].tls is False


@pytest_twisted.ensureDeferred
async def test_policy_may_never_retries_in_plaintext_with_authentication(world: World) -> None:
    outcome = only(
        await world.deliver(["bob@broken.test"], authentication=Authentication("u", "p"))
    )
    assert outcome.status is DeliveryStatus.TEMPORARY
    assert isinstance(outcome.error, TLSFailure)
    assert len(outcome.attempts) == 1
    assert world.room.by("broken") == []


@pytest_twisted.ensureDeferred
async def test_policy_encrypt(world: World) -> None:
    wrong = only(await world.deliver(["bob@wrong.test"], tls_policy="encrypt"))
    assert wrong.delivered
    assert wrong.tls is not None and wrong.tls.level is TLSLevel.ENCRYPTED
    plain = only(await world.deliver(["bob@plain.test"], tls_policy="encrypt"))
    assert plain.status is DeliveryStatus.TEMPORARY
    assert isinstance(plain.error, STARTTLSUnavailable)
    broken = only(await world.deliver(["bob@broken.test"], tls_policy=TLSPolicy.ENCRYPT))
    assert broken.status is DeliveryStatus.TEMPORARY
    assert isinstance(broken.error, TLSFailure)
    assert len(broken.attempts) == 1  # no plaintext retry
    refused = only(await world.deliver(["bob@refuser.test"], tls_policy="encrypt"))
    assert refused.status is DeliveryStatus.TEMPORARY
    assert isinstance(refused.error, STARTTLSRefused)
    assert [r.peer for r in world.room.received] == ["wrong"]


@pytest_twisted.ensureDeferred
async def test_policy_verify(world: World) -> None:
    good = only(await world.deliver(["bob@pref.test"], tls_policy="verify"))
    assert good.tls is not None and good.tls.level is TLSLevel.VERIFIED
    assert "certificate verified for a.mx.test" in good.tls.reason
    wrong = only(await world.deliver(["bob@wrong.test"], tls_policy="verify"))
    assert wrong.status is DeliveryStatus.TEMPORARY
    assert isinstance(wrong.error, TLSFailure)
    assert world.room.by("wrong") == []
    # A certificate that does not verify moves on to the next exchanger.
    fallback = only(await world.deliver(["bob@wrongfirst.test"], tls_policy="verify"))
    assert fallback.delivered and fallback.mx == "b.mx.test"
    assert isinstance(fallback.attempts[0].error, TLSFailure)


@pytest_twisted.ensureDeferred
async def test_usage_errors(world: World) -> None:
    with pytest.raises(UsageError):
        await world.deliver([])
    with pytest.raises(UsageError):
        await world.deliver(["bob@pref.test"], tls_policy="sometimes")
    with pytest.raises(UsageError):
        await world.deliver(["bob@pref.test"], max_concurrency=0)
    with pytest.raises(UsageError):
        await world.deliver(["bob@pref.test"], "a str body")
    assert world.room.received == []


# -- MTA-STS -------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_sts_enforce_uses_only_matching_exchangers_with_verified_tls(world: World) -> None:
    outcome = only(await world.deliver(["bob@sts-enforce.test"], tls_policy="none"))
    assert outcome.delivered
    # wrong.mx.test (preference 5) is not in the policy: never tried.
    assert [a.host for a in outcome.attempts] == ["a.mx.test"]
    assert outcome.tls is not None
    assert outcome.tls.level is TLSLevel.VERIFIED
    assert outcome.tls.policy is TLSPolicy.VERIFY
    assert outcome.tls.mta_sts is Mode.ENFORCE
    assert outcome.tls.reason.startswith("MTA-STS enforce")
    assert world.policies.hits["mta-sts.sts-enforce.test"] == 1


@pytest_twisted.ensureDeferred
async def test_sts_enforce_certificate_failure_is_temporary(world: World) -> None:
    outcome = only(await world.deliver(["bob@sts-enforce-bad.test"]))
    assert outcome.status is DeliveryStatus.TEMPORARY
    assert isinstance(outcome.error, TLSFailure)
    assert world.room.received == []


@pytest_twisted.ensureDeferred
async def test_sts_enforce_without_a_matching_exchanger(world: World) -> None:
    outcome = only(await world.deliver(["bob@sts-nomatch.test"]))
    assert outcome.status is DeliveryStatus.TEMPORARY
    assert isinstance(outcome.error, PolicyViolation)
    assert outcome.enhanced_status == (4, 7, 5)
    assert outcome.attempts == ()
    assert world.room.received == []


@pytest_twisted.ensureDeferred
async def test_sts_testing_delivers_and_logs(world: World) -> None:
    with captured_log() as lines:
        outcome = only(await world.deliver(["bob@sts-testing.test"]))
    assert outcome.delivered
    assert outcome.tls is not None
    assert outcome.tls.mta_sts is Mode.TESTING
    assert outcome.tls.level is TLSLevel.ENCRYPTED
    assert any("matches no mx" in line and "wrong.mx.test" in line for line in lines), lines
    assert any("would fail under enforce" in line for line in lines), lines


@pytest_twisted.ensureDeferred
async def test_sts_none(world: World) -> None:
    outcome = only(await world.deliver(["bob@sts-none.test"]))
    assert outcome.delivered
    assert outcome.tls is not None
    assert outcome.tls.mta_sts is Mode.NONE
    assert outcome.tls.level is TLSLevel.NONE


@pytest.mark.parametrize(
    ("domain", "why"),
    [
        ("sts-big.test", "cap"),
        ("sts-bigchunked.test", "cap"),
        ("sts-redirect.test", "302"),
        ("sts-html.test", "not text/plain"),
        ("sts-slow.test", "within 0.5s"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_sts_unusable_policy_is_no_policy(world: World, domain: str, why: str) -> None:
    mta_sts = world.mta_sts(timeout=0.5)
    with captured_log() as lines:
        outcome = only(await world.deliver([f"bob@{domain}"], mta_sts=mta_sts))
    # Each of these policies, had it been used, would have refused plain.mx.test.
    assert outcome.delivered
    assert outcome.tls is not None and outcome.tls.mta_sts is None
    assert mta_sts.cache.get(domain) is None
    assert world.policies.hits[f"mta-sts.{domain}"] == 1
    assert world.policies.hits["mta-sts.sts-nomatch.test"] == 0  # no redirect followed
    assert any("not used" in line and why in line for line in lines), lines


@pytest_twisted.ensureDeferred
async def test_sts_silent_policy_host_costs_one_timeout_for_five_messages(world: World) -> None:
    """mta-sts.sts-slow.test accepts and never answers: the failed fetch is
    remembered (with a backoff), so the next messages wait for nothing."""
    mta_sts = world.mta_sts(timeout=0.5)
    started = reactor.seconds()
    for _ in range(5):
        assert only(await world.deliver(["bob@sts-slow.test"], mta_sts=mta_sts)).delivered
    elapsed = reactor.seconds() - started
    assert world.policies.hits["mta-sts.sts-slow.test"] == 1
    assert elapsed < 0.5 + 0.4, elapsed  # one timeout, plus five quick deliveries


@pytest_twisted.ensureDeferred
async def test_sts_concurrent_lookups_share_one_fetch(world: World) -> None:
    mta_sts = world.mta_sts(timeout=0.5)
    started = reactor.seconds()
    results = await DeferredList(
        [world.deliver(["bob@sts-slow.test"], mta_sts=mta_sts) for _ in range(5)],
        fireOnOneErrback=True,
    )
    assert all(ok and only(result).delivered for ok, result in results)
    assert world.policies.hits["mta-sts.sts-slow.test"] == 1
    assert reactor.seconds() - started < 0.5 + 0.4


@pytest_twisted.ensureDeferred
async def test_sts_failed_fetch_is_retried_after_the_backoff(world: World) -> None:
    clock = Clock()
    mta_sts = world.mta_sts(timeout=0.5, clock=clock, retry_after=60)
    for _ in range(2):
        await world.deliver(["bob@sts-slow.test"], mta_sts=mta_sts)
    assert world.policies.hits["mta-sts.sts-slow.test"] == 1
    clock.advance(61)
    await world.deliver(["bob@sts-slow.test"], mta_sts=mta_sts)
    assert world.policies.hits["mta-sts.sts-slow.test"] == 2
    clock.advance(61)  # the backoff doubled to 120 s
    await world.deliver(["bob@sts-slow.test"], mta_sts=mta_sts)
    assert world.policies.hits["mta-sts.sts-slow.test"] == 2


@pytest_twisted.ensureDeferred
async def test_sts_policy_is_refreshed_before_it_expires(world: World) -> None:
    clock = Clock()
    mta_sts = world.mta_sts(clock=clock)
    host = "mta-sts.sts-cache.test"

    async def lookup() -> Any:
        return await mta_sts.lookup(
            "sts-cache.test",
            resolver=world.resolver,
            reactor=reactor,
            trust_root=world.exchangers.trust_root,
        )

    first = await lookup()
    assert first is not None and world.policies.hits[host] == 1
    clock.advance(80)  # max_age 100: in its last quarter
    assert await lookup() == first  # answered from the cache at once...
    for _ in range(50):  # ...while a fresh copy is fetched in the background
        if world.policies.hits[host] == 2 and mta_sts.cache.get("sts-cache.test") != first:
            break
        await deferLater(reactor, 0.02)
    refreshed = mta_sts.cache.get("sts-cache.test")
    assert refreshed is not None and refreshed.fetched == clock.seconds()
    clock.advance(30)  # the first copy would have expired by now
    assert await lookup() == refreshed
    assert world.policies.hits[host] == 2


@pytest_twisted.ensureDeferred
async def test_sts_trust_is_not_the_exchangers_trust_root(world: World) -> None:
    """A private trust_root for the exchangers no longer stands in for the
    policy hosts' roots: the test CA is given only as mta_sts_trust_root."""
    enforced = only(
        await world.deliver(["bob@sts-nomatch.test"], mta_sts=world.mta_sts(), trust_root=None)
    )
    assert enforced.permanent or enforced.temporary  # the policy was fetched and enforced
    assert enforced.tls is None or enforced.tls.mta_sts is Mode.ENFORCE
    ignored = only(
        await world.deliver(
            ["bob@sts-nomatch.test"], mta_sts=world.mta_sts(), mta_sts_trust_root=None
        )
    )
    assert ignored.delivered


@pytest_twisted.ensureDeferred
async def test_sts_fetch_needs_a_trusted_certificate(world: World) -> None:
    mta_sts = world.mta_sts()
    outcome = only(
        await world.deliver(["bob@sts-nomatch.test"], mta_sts=mta_sts, mta_sts_trust_root=None)
    )
    # The policy host's certificate is from the test CA, not trusted here:
    # no policy, so the exchanger is used (with opportunistic TLS).
    assert outcome.delivered
    assert mta_sts.cache.get("sts-nomatch.test") is None


@pytest_twisted.ensureDeferred
async def test_sts_cache_by_max_age_and_id(world: World) -> None:
    clock = Clock()
    clock.advance(1_000_000)
    mta_sts = world.mta_sts(clock=clock)
    host = "mta-sts.sts-cache.test"

    async def lookup() -> Any:
        return await mta_sts.lookup(
            "sts-cache.test",
            resolver=world.resolver,
            reactor=reactor,
            trust_root=world.exchangers.trust_root,
        )

    first = await lookup()
    assert first is not None and first.id == "1" and first.policy.mx == ("a.mx.test",)
    assert world.policies.hits[host] == 1
    # Same id, within max_age: from the cache.
    clock.advance(50)
    assert await lookup() == first
    assert world.policies.hits[host] == 1
    # A new id: fetched again, at once.
    world.zone.set_sts_id("sts-cache.test", "2")
    world.policies.answers[host] = ("policy", _policy("enforce", "b.mx.test", max_age=100))
    second = await lookup()
    assert second is not None and second.id == "2" and second.policy.mx == ("b.mx.test",)
    assert world.policies.hits[host] == 2
    # Past max_age: fetched again even with the same id.
    clock.advance(101)
    third = await lookup()
    assert third is not None and third.fetched == clock.seconds()
    assert world.policies.hits[host] == 3
    # A new id whose policy cannot be fetched: the valid cached one stays.
    world.zone.set_sts_id("sts-cache.test", "3")
    world.policies.answers[host] = ("status", 500)
    assert await lookup() == third
    assert world.policies.hits[host] == 4
    # No record any more: the cached policy holds until it expires...
    world.zone.set_sts_id("sts-cache.test", None)
    assert await lookup() == third
    clock.advance(101)
    # ...and then there is none.
    assert await lookup() is None
    assert world.policies.hits[host] == 4


@pytest_twisted.ensureDeferred
async def test_sts_cache_persists_across_restarts(world: World, tmp_path: Path) -> None:
    path = tmp_path / "mta-sts.json"
    host = "mta-sts.sts-enforce.test"
    first = world.mta_sts(cache=PolicyCache(path))
    outcome = only(await world.deliver(["bob@sts-enforce.test"], mta_sts=first))
    assert outcome.tls is not None and outcome.tls.mta_sts is Mode.ENFORCE
    assert path.exists()
    assert world.policies.hits[host] == 1
    restarted = world.mta_sts(cache=PolicyCache(path))
    again = only(await world.deliver(["bob@sts-enforce.test"], mta_sts=restarted))
    assert again.tls is not None and again.tls.mta_sts is Mode.ENFORCE
    assert world.policies.hits[host] == 1  # not fetched again


@pytest_twisted.ensureDeferred
async def test_sts_on_by_default(world: World) -> None:
    outcome = only(await world.deliver(["bob@pref.test"], mta_sts=True))
    assert outcome.delivered
    assert outcome.tls is not None and outcome.tls.mta_sts is None  # pref.test has none
    assert default_mta_sts() is default_mta_sts()


@pytest_twisted.ensureDeferred
async def test_sts_off(world: World) -> None:
    outcome = only(await world.deliver(["bob@sts-nomatch.test"], mta_sts=False))
    assert outcome.delivered
    assert world.policies.hits["mta-sts.sts-nomatch.test"] == 0
