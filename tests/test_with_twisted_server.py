"""txcolombe against Twisted's own ESMTP server, in the same reactor, on loopback.

``twisted.mail.smtp.ESMTP`` offers STARTTLS (given a context factory) and
AUTH through twisted.cred (PLAIN and LOGIN challengers). Its limits shape
these tests:

* it advertises AUTH before STARTTLS too, which lets us check that the
  client still upgrades first (and never authenticates in plaintext);
* it advertises neither 8BITMIME nor SIZE nor PIPELINING, so the client runs
  lock-step and must refuse 8-bit bodies itself;
* it gives each recipient its own ``IMessage`` and hands it the body one
  line at a time, dot-unstuffed and without line ends: we store each line
  with CRLF, which is byte-exact for every body that starts with a header
  (for a body without headers the server inserts an empty line first);
* its end-of-data reply names no queue id ("250 Delivery in progress").
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_twisted
import trustme
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.internet import ssl as twisted_ssl
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import deferLater
from twisted.mail.imap4 import LOGINCredentials, PLAINCredentials
from twisted.mail.smtp import (
    ESMTP,
    IMessage,
    IMessageDelivery,
    SMTPBadRcpt,
    SMTPFactory,
    User,
)
from zope.interface import implementer

from tests.conftest import TRICKY_BODIES, on_the_wire
from txcolombe import (
    Authentication,
    AuthenticationFailed,
    EightBitUnsupported,
    MailboxUnavailable,
    Mechanism,
    RecipientsRefused,
    STARTTLSUnavailable,
    Step,
    Timeouts,
    TLSFailure,
    connect,
    sendmail,
    submit,
)

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
    data_end=30.0,
    quit=5.0,
)

MESSAGE = b"From: a@example.org\r\nTo: b@example.org\r\nSubject: hi\r\n\r\n.Hello\r\n.\r\nBye\r\n"


# -- the server ---------------------------------------------------------------


@dataclass
class Stored:
    """One message as Twisted's server delivered it to one recipient."""

    login: str | None
    sender: str
    recipient: str
    data: bytes
    tls: bool


@implementer(IMessage)
class _Message:
    def __init__(self, server: TwistedServer, stored: Stored, *, fail: bool) -> None:
        self._server = server
        self._stored = stored
        self._lines: list[bytes] = []
        self._fail = fail

    def lineReceived(self, line: bytes) -> None:
        self._lines.append(line)

    def eomReceived(self) -> defer.Deferred[None]:
        if self._fail:
            return defer.fail(RuntimeError("this mailbox refuses every message"))
        self._stored.data = b"".join(line + b"\r\n" for line in self._lines)
        self._server.stored.append(self._stored)
        return defer.succeed(None)

    def connectionLost(self) -> None:
        self._server.aborted += 1
        self._lines = []


@implementer(IMessageDelivery)
class _Delivery:
    """Recipients starting "refuse" get 550, "later" 450; "fail" fail at the end."""

    def __init__(self, server: TwistedServer, login: str | None) -> None:
        self._server = server
        self._login = login

    def receivedHeader(self, helo: Any, origin: Any, recipients: Any) -> None:
        return None  # keep the stored message byte-exact

    def validateFrom(self, helo: Any, origin: Any) -> Any:
        return origin

    def validateTo(self, user: User) -> Callable[[], _Message]:
        local = user.dest.local.decode()
        if local.startswith("refuse"):
            raise SMTPBadRcpt(user, code=550, resp="5.1.1 no such user")
        if local.startswith("later"):
            raise SMTPBadRcpt(user, code=450, resp="4.2.1 try again later")
        stored = Stored(
            login=self._login,
            sender=str(user.orig),
            recipient=str(user.dest),
            data=b"",
            tls=bool(user.protocol.startedTLS),
        )
        return lambda: _Message(self._server, stored, fail=local.startswith("fail"))


@implementer(IRealm)
class _Realm:
    def __init__(self, server: TwistedServer) -> None:
        self._server = server

    def requestAvatar(self, avatar_id: Any, mind: Any, *interfaces: Any) -> Any:
        if IMessageDelivery in interfaces:
            login = avatar_id.decode() if isinstance(avatar_id, bytes) else str(avatar_id)
            return IMessageDelivery, _Delivery(self._server, login), lambda: None
        raise NotImplementedError(interfaces)


class _ESMTP(ESMTP):
    """Twisted's ESMTP, noting each AUTH and whether TLS was on at the time."""

    server: TwistedServer

    def ext_AUTH(self, rest: bytes) -> None:
        self.server.auth_attempts.append((rest.split()[0].decode(), bool(self.startedTLS)))
        super().ext_AUTH(rest)

    def connectionLost(self, reason: Any) -> None:
        self.server.connections.discard(self)
        super().connectionLost(reason)


class _Factory(SMTPFactory):
    def __init__(self, server: TwistedServer, portal: Portal) -> None:
        super().__init__(portal)
        self._server = server

    def buildProtocol(self, addr: Any) -> _ESMTP:
        # The SASL challengers live in twisted.mail._cred; imap4 exports them.
        challengers = {b"PLAIN": PLAINCredentials, b"LOGIN": LOGINCredentials}
        protocol = _ESMTP(challengers, self._server.context)
        protocol.factory = self
        protocol.portal = self.portal
        protocol.host = b"localhost"
        protocol.noisy = False
        protocol.server = self._server
        self._server.connections.add(protocol)
        return protocol


@dataclass
class TwistedServer:
    """Twisted's ESMTP server on 127.0.0.1, users alice/s3cret (AUTH required to send)."""

    ca: trustme.CA
    context: twisted_ssl.CertificateOptions | None
    stored: list[Stored] = field(default_factory=list)
    auth_attempts: list[tuple[str, bool]] = field(default_factory=list)
    connections: set[_ESMTP] = field(default_factory=set)
    aborted: int = 0
    port: int = 0
    listening: IListeningPort | None = None

    @property
    def trust_root(self) -> twisted_ssl.Certificate:
        return twisted_ssl.Certificate.loadPEM(self.ca.cert_pem.bytes())

    def start(self) -> TwistedServer:
        checker = InMemoryUsernamePasswordDatabaseDontUse(alice=b"s3cret")
        portal = Portal(_Realm(self), [checker])
        self.listening = reactor.listenTCP(0, _Factory(self, portal), interface="127.0.0.1")
        self.port = self.listening.getHost().port
        return self

    async def disconnected(self, timeout: float = 5.0) -> None:
        """Wait until the server has seen every connection close."""
        for _ in range(int(timeout / 0.01)):
            if not self.connections:
                return
            await deferLater(reactor, 0.01, lambda: None)
        raise AssertionError(f"{len(self.connections)} connection(s) still open")

    async def stop(self) -> None:
        for protocol in list(self.connections):
            protocol.transport.abortConnection()
        if self.listening is not None:
            await self.listening.stopListening()


@pytest_twisted.async_yield_fixture
async def start_twisted_server() -> AsyncIterator[Callable[..., TwistedServer]]:
    """Start Twisted ESMTP servers (``tls=False``: no STARTTLS); all stopped after."""
    servers: list[TwistedServer] = []

    def start(*, tls: bool = True) -> TwistedServer:
        ca = trustme.CA()
        context = None
        if tls:
            leaf = ca.issue_cert("localhost", "127.0.0.1")
            pem = leaf.private_key_and_cert_chain_pem.bytes()
            context = twisted_ssl.PrivateCertificate.loadPEM(pem).options()
        server = TwistedServer(ca, context).start()
        servers.append(server)
        return server

    try:
        yield start
    finally:
        for server in servers:
            await server.stop()


@pytest.fixture
def twisted_server(start_twisted_server: Callable[..., TwistedServer]) -> TwistedServer:
    return start_twisted_server()


# -- the tests ------------------------------------------------------------------


@pytest.mark.parametrize("mechanism", [Mechanism.PLAIN, Mechanism.LOGIN])
@pytest_twisted.ensureDeferred
async def test_starttls_and_auth(twisted_server: TwistedServer, mechanism: Mechanism) -> None:
    receipt = await sendmail(
        "127.0.0.1",
        "a@example.org",
        ["b@example.org"],
        MESSAGE,
        port=twisted_server.port,
        trust_root=twisted_server.trust_root,
        authentication=Authentication("alice", "s3cret", mechanism),
        timeouts=QUICK,
    )
    assert list(receipt.accepted) == ["b@example.org"]
    assert receipt.reply.code == 250
    assert receipt.queue_id is None  # "250 Delivery in progress"
    assert receipt.tls is not None
    assert receipt.tls.implicit is False
    # AUTH was offered before STARTTLS as well; the client waited for TLS.
    assert twisted_server.auth_attempts == [(mechanism.value, True)]
    [stored] = twisted_server.stored
    assert stored == Stored("alice", "a@example.org", "b@example.org", MESSAGE, tls=True)


@pytest_twisted.ensureDeferred
async def test_submit_requiring_starttls(twisted_server: TwistedServer) -> None:
    receipt = await submit(
        "127.0.0.1",
        "a@example.org",
        ["b@example.org"],
        MESSAGE,
        port=twisted_server.port,
        starttls=True,
        trust_root=twisted_server.trust_root,
        authentication=Authentication("alice", "s3cret"),
        timeouts=QUICK,
    )
    assert receipt.tls is not None
    assert [s.tls for s in twisted_server.stored] == [True]


@pytest_twisted.ensureDeferred
async def test_wrong_password(twisted_server: TwistedServer) -> None:
    with pytest.raises(AuthenticationFailed) as info:
        await sendmail(
            "127.0.0.1",
            "a@example.org",
            ["b@example.org"],
            MESSAGE,
            port=twisted_server.port,
            trust_root=twisted_server.trust_root,
            authentication=Authentication("alice", "wrong", Mechanism.LOGIN),
            timeouts=QUICK,
        )
    assert info.value.code == 535
    assert info.value.step is Step.AUTH
    assert twisted_server.stored == []


@pytest_twisted.ensureDeferred
async def test_unauthenticated_sender_refused(twisted_server: TwistedServer) -> None:
    # Anonymous cred logins are not allowed: MAIL gets 550.
    with pytest.raises(MailboxUnavailable) as info:
        await sendmail(
            "127.0.0.1",
            "a@example.org",
            ["b@example.org"],
            MESSAGE,
            port=twisted_server.port,
            trust_root=twisted_server.trust_root,
            timeouts=QUICK,
        )
    assert info.value.code == 550
    assert info.value.step is Step.MAIL
    assert twisted_server.auth_attempts == []
    assert twisted_server.stored == []


@pytest_twisted.ensureDeferred
async def test_untrusted_certificate(twisted_server: TwistedServer) -> None:
    with pytest.raises(TLSFailure):
        await sendmail(
            "127.0.0.1",
            "a@example.org",
            ["b@example.org"],
            MESSAGE,
            port=twisted_server.port,
            authentication=Authentication("alice", "s3cret"),
            timeouts=QUICK,
        )
    assert twisted_server.auth_attempts == []
    assert twisted_server.stored == []


@pytest_twisted.ensureDeferred
async def test_auth_offered_without_starttls(
    start_twisted_server: Callable[..., TwistedServer],
) -> None:
    server = start_twisted_server(tls=False)
    with pytest.raises(STARTTLSUnavailable):
        await sendmail(
            "127.0.0.1",
            "a@example.org",
            ["b@example.org"],
            MESSAGE,
            port=server.port,
            authentication=Authentication("alice", "s3cret"),
            timeouts=QUICK,
        )
    assert server.auth_attempts == []  # AUTH was offered, never used in plaintext
    assert server.stored == []


@pytest_twisted.ensureDeferred
async def test_recipients_refused(twisted_server: TwistedServer) -> None:
    receipt = await sendmail(
        "127.0.0.1",
        "a@example.org",
        ["refuse@example.org", "one@example.org", "later@example.org", "two@example.org"],
        MESSAGE,
        port=twisted_server.port,
        trust_root=twisted_server.trust_root,
        authentication=Authentication("alice", "s3cret"),
        timeouts=QUICK,
    )
    assert sorted(receipt.accepted) == ["one@example.org", "two@example.org"]
    assert {r: reply.code for r, reply in receipt.refused.items()} == {
        "refuse@example.org": 550,
        "later@example.org": 450,
    }
    assert receipt.refused["refuse@example.org"].enhanced_status == (5, 1, 1)
    assert sorted(s.recipient for s in twisted_server.stored) == [
        "one@example.org",
        "two@example.org",
    ]
    assert all(s.data == MESSAGE for s in twisted_server.stored)


@pytest_twisted.ensureDeferred
async def test_all_recipients_refused(twisted_server: TwistedServer) -> None:
    with pytest.raises(RecipientsRefused) as info:
        await sendmail(
            "127.0.0.1",
            "a@example.org",
            ["refuse@example.org", "refuse2@example.org"],
            MESSAGE,
            port=twisted_server.port,
            trust_root=twisted_server.trust_root,
            authentication=Authentication("alice", "s3cret"),
            timeouts=QUICK,
        )
    assert sorted(info.value.refused) == ["refuse2@example.org", "refuse@example.org"]
    assert twisted_server.stored == []


@pytest_twisted.ensureDeferred
async def test_refused_at_end_of_data(twisted_server: TwistedServer) -> None:
    # The message's eomReceived fails: Twisted answers the final dot with 550.
    with pytest.raises(MailboxUnavailable) as info:
        await sendmail(
            "127.0.0.1",
            "a@example.org",
            ["fail@example.org"],
            MESSAGE,
            port=twisted_server.port,
            trust_root=twisted_server.trust_root,
            authentication=Authentication("alice", "s3cret"),
            timeouts=QUICK,
        )
    assert info.value.step is Step.DATA_END
    assert info.value.code == 550
    assert twisted_server.stored == []


HEADED_BODIES = {k: v for k, v in TRICKY_BODIES.items() if b":" in v.split(b"\n")[0]}


@pytest.mark.parametrize("body", HEADED_BODIES.values(), ids=HEADED_BODIES.keys())
@pytest_twisted.ensureDeferred
async def test_body_byte_exact(twisted_server: TwistedServer, body: bytes) -> None:
    await sendmail(
        "127.0.0.1",
        "a@example.org",
        ["b@example.org"],
        body,
        port=twisted_server.port,
        trust_root=twisted_server.trust_root,
        authentication=Authentication("alice", "s3cret"),
        timeouts=QUICK,
    )
    [stored] = twisted_server.stored
    assert stored.data == on_the_wire(body)


@pytest_twisted.ensureDeferred
async def test_large_body_from_pull_stream(twisted_server: TwistedServer) -> None:
    lines = [(b"." if i % 3 == 0 else b"") + b"line %06d of the body" % i for i in range(60_000)]
    body = b"Subject: pulled\r\n\r\n" + b"\r\n".join(lines) + b"\r\n"
    view = memoryview(body)
    position = 0

    def pull() -> defer.Deferred[bytes | None]:
        # The seed's pull stream: a Deferred of the next chunk, None at the end.
        nonlocal position
        if position >= len(view):
            return defer.succeed(None)
        chunk = bytes(view[position : position + 40_000 + 1])
        position += len(chunk)
        return defer.succeed(chunk)

    await sendmail(
        "127.0.0.1",
        "a@example.org",
        ["b@example.org"],
        pull,
        port=twisted_server.port,
        trust_root=twisted_server.trust_root,
        authentication=Authentication("alice", "s3cret"),
        timeouts=QUICK,
    )
    [stored] = twisted_server.stored
    assert stored.data == body


@pytest_twisted.ensureDeferred
async def test_8bit_body_refused_by_client(twisted_server: TwistedServer) -> None:
    # No 8BITMIME from Twisted: the client must not send the body, nor its end.
    body = "Subject: 8bit\r\n\r\nnaïve\r\n".encode()
    with pytest.raises(EightBitUnsupported):
        await sendmail(
            "127.0.0.1",
            "a@example.org",
            ["b@example.org"],
            body,
            port=twisted_server.port,
            trust_root=twisted_server.trust_root,
            authentication=Authentication("alice", "s3cret"),
            timeouts=QUICK,
        )
    await twisted_server.disconnected()
    assert twisted_server.stored == []
    assert twisted_server.aborted == 1  # the transaction was cut, not ended


@pytest_twisted.ensureDeferred
async def test_session_several_messages(twisted_server: TwistedServer) -> None:
    async with await connect(
        "127.0.0.1",
        port=twisted_server.port,
        trust_root=twisted_server.trust_root,
        authentication=Authentication("alice", "s3cret", Mechanism.LOGIN),
        timeouts=QUICK,
    ) as session:
        assert "8BITMIME" not in session.extensions
        assert "PIPELINING" not in session.extensions
        for i in range(3):
            await session.send("a@example.org", [f"r{i}@example.org"], MESSAGE)
        assert len(twisted_server.connections) == 1
    await session.closed
    assert [s.recipient for s in twisted_server.stored] == [f"r{i}@example.org" for i in range(3)]
    assert twisted_server.auth_attempts == [("LOGIN", True)]
