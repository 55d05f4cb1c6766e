"""txcolombe against aiosmtpd, a server nobody here wrote, on loopback.

The shared peer (``aiosmtpd_peer``) offers STARTTLS on one port and implicit
TLS on another, with AUTH PLAIN/LOGIN under TLS only. The tests that need
something else (no STARTTLS at all, IPv6, one server seeing the connections)
start their own aiosmtpd ``Controller`` with :func:`recording_server`.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword
from twisted.internet import reactor as _reactor
from twisted.internet import ssl as twisted_ssl
from twisted.internet.defer import DeferredList
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import deferLater

from tests.conftest import TRICKY_BODIES, on_the_wire
from tools.peers.aiosmtpd_peer import AiosmtpdPeer, free_port
from txcolombe import (
    Authentication,
    AuthenticationFailed,
    ConnectionRefused,
    Mechanism,
    NameResolutionFailed,
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

#: Short enough that a broken test fails instead of hanging the run.
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

ALICE = Authentication("alice", "s3cret")
MESSAGE = b"From: a@example.org\r\nTo: b@example.org\r\nSubject: hello\r\n\r\nHello, world.\r\n"


# -- a server of our own when the shared peer will not do ------------------------


@dataclass
class Seen:
    """One message a :class:`Recorder` accepted."""

    peer: Any
    sender: str
    recipients: list[str]
    data: bytes
    tls: bool
    login: str | None


@dataclass
class Recorder:
    """An aiosmtpd handler (and command log) for :func:`recording_server`.

    Like the shared peer, it refuses local parts starting with "refuse" (550).
    With ``max_recipients``, it answers ``too_many`` to the recipients over
    that number in a transaction, as Postfix's ``smtpd_recipient_limit`` does.
    """

    messages: list[Seen] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    max_recipients: int | None = None
    too_many: str = "452 4.5.3 Error: too many recipients"

    async def handle_RCPT(
        self, server: SMTP, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if address.lower().startswith("refuse"):
            return "550 5.1.1 No such user here"
        if self.max_recipients is not None and len(envelope.rcpt_tos) >= self.max_recipients:
            return self.too_many
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Any, envelope: Any) -> str:
        login = session.auth_data
        self.messages.append(
            Seen(
                peer=session.peer,
                sender=envelope.mail_from,
                recipients=list(envelope.rcpt_tos),
                data=envelope.original_content,
                tls=session.ssl is not None,
                login=login.decode() if isinstance(login, bytes) else login,
            )
        )
        return f"250 2.0.0 OK queued as REC{len(self.messages):03d}"


class _RecordingSMTP(SMTP):
    """aiosmtpd's SMTP, noting which sensitive commands it was sent."""

    def __init__(self, *args: Any, recorder: Recorder, **kwargs: Any) -> None:
        self._recorder = recorder
        super().__init__(*args, **kwargs)

    async def smtp_AUTH(self, arg: str) -> None:
        self._recorder.commands.append(f"AUTH {arg}")
        await super().smtp_AUTH(arg)

    async def smtp_STARTTLS(self, arg: str) -> None:
        self._recorder.commands.append("STARTTLS")
        await super().smtp_STARTTLS(arg)


class _RecordingController(Controller):
    def __init__(self, recorder: Recorder, **kwargs: Any) -> None:
        super().__init__(recorder, **kwargs)
        self.recorder = recorder

    def factory(self) -> SMTP:
        return _RecordingSMTP(self.handler, recorder=self.recorder, **self.SMTP_kwargs)


def _authenticate(
    server: SMTP, session: Any, envelope: Any, mechanism: str, data: Any
) -> AuthResult:
    if isinstance(data, LoginPassword) and (data.login, data.password) == (b"alice", b"s3cret"):
        return AuthResult(success=True, auth_data="alice")
    return AuthResult(success=False, handled=False)


StartServer = Callable[..., tuple[Recorder, int]]


@pytest.fixture
def recording_server() -> Iterator[StartServer]:
    """Start aiosmtpd controllers with a :class:`Recorder`; all stopped at the end.

    Call with aiosmtpd's ``Controller`` keywords; returns ``(recorder, port)``.
    """
    started: list[Controller] = []

    def start(
        *, hostname: str = "127.0.0.1", recorder: Recorder | None = None, **kwargs: Any
    ) -> tuple[Recorder, int]:
        family = socket.AF_INET6 if ":" in hostname else socket.AF_INET
        with socket.socket(family) as sock:
            sock.bind((hostname, 0))
            port: int = sock.getsockname()[1]
        recorder = recorder if recorder is not None else Recorder()
        options: dict[str, Any] = {"authenticator": _authenticate, **kwargs}
        controller = _RecordingController(recorder, hostname=hostname, port=port, **options)
        controller.start()
        started.append(controller)
        return recorder, port

    try:
        yield start
    finally:
        for controller in started:
            controller.stop()


def _ipv6_loopback() -> str | None:
    """None if ::1 can be listened on, else why not."""
    if not socket.has_ipv6:
        return "Python was built without IPv6"
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError as error:
        return f"cannot bind ::1: {error}"
    return None


def big_body(size: int, newline: bytes = b"\r\n") -> bytes:
    """About ``size`` octets of numbered lines, every fifth one starting with a dot."""
    count = size // 74 + 1  # each line is at least 74 octets and a line break
    lines = [
        (b"." if i % 5 == 0 else b"") + b"%08d " % i + b"0123456789abcdefghij" * 3 + b" tail"
        for i in range(count)
    ]
    return b"Subject: big\r\n\r\n" + newline.join(lines) + newline


# -- TLS, authentication and the receipt -------------------------------------------


@pytest.mark.parametrize("mechanism", [Mechanism.PLAIN, Mechanism.LOGIN])
@pytest_twisted.ensureDeferred
async def test_sendmail_starttls_with_auth(
    aiosmtpd_peer: AiosmtpdPeer, aiosmtpd_ca: twisted_ssl.Certificate, mechanism: Mechanism
) -> None:
    receipt = await sendmail(
        "127.0.0.1",
        "a@example.org",
        ["b@example.org"],
        MESSAGE,
        port=aiosmtpd_peer.starttls_port,
        trust_root=aiosmtpd_ca,
        authentication=Authentication("alice", "s3cret", mechanism),
        timeouts=QUICK,
    )
    assert list(receipt.accepted) == ["b@example.org"]
    assert receipt.accepted["b@example.org"].code == 250
    assert receipt.refused == {}
    assert receipt.reply.code == 250
    assert receipt.queue_id == "AIO00001"
    assert receipt.tls is not None
    assert receipt.tls.version in ("TLSv1.2", "TLSv1.3")
    assert receipt.tls.cipher
    assert receipt.tls.implicit is False
    assert {"PLAIN", "LOGIN"} <= receipt.extensions.auth_mechanisms
    assert "STARTTLS" not in receipt.extensions  # the EHLO after STARTTLS
    [received] = aiosmtpd_peer.received
    assert received.sender == "a@example.org"
    assert received.recipients == ["b@example.org"]
    assert received.tls is True
    assert received.login == "alice"
    assert received.data == MESSAGE


@pytest_twisted.ensureDeferred
async def test_submit_implicit_tls(
    aiosmtpd_peer: AiosmtpdPeer, aiosmtpd_ca: twisted_ssl.Certificate
) -> None:
    receipt = await submit(
        "127.0.0.1",
        "a@example.org",
        ["b@example.org"],
        MESSAGE,
        port=aiosmtpd_peer.tls_port,
        trust_root=aiosmtpd_ca,
        authentication=ALICE,
        timeouts=QUICK,
    )
    assert receipt.tls is not None
    assert receipt.tls.implicit is True
    assert receipt.queue_id == "AIO00001"
    [received] = aiosmtpd_peer.received
    assert (received.tls, received.login, received.data) == (True, "alice", MESSAGE)


@pytest_twisted.ensureDeferred
async def test_submit_starttls_required(
    aiosmtpd_peer: AiosmtpdPeer, aiosmtpd_ca: twisted_ssl.Certificate
) -> None:
    receipt = await submit(
        "127.0.0.1",
        "a@example.org",
        ["b@example.org"],
        MESSAGE,
        port=aiosmtpd_peer.starttls_port,
        starttls=True,
        trust_root=aiosmtpd_ca,
        authentication=Authentication("alice", "s3cret", Mechanism.LOGIN),
        timeouts=QUICK,
    )
    assert receipt.tls is not None
    assert receipt.tls.implicit is False
    [received] = aiosmtpd_peer.received
    assert (received.tls, received.login, received.data) == (True, "alice", MESSAGE)


@pytest.mark.parametrize("mechanism", [Mechanism.PLAIN, Mechanism.LOGIN])
@pytest_twisted.ensureDeferred
async def test_wrong_password(
    aiosmtpd_peer: AiosmtpdPeer, aiosmtpd_ca: twisted_ssl.Certificate, mechanism: Mechanism
) -> None:
    with pytest.raises(AuthenticationFailed) as info:
        await sendmail(
            "127.0.0.1",
            "a@example.org",
            ["b@example.org"],
            MESSAGE,
            port=aiosmtpd_peer.starttls_port,
            trust_root=aiosmtpd_ca,
            authentication=Authentication("alice", "wrong", mechanism),
            timeouts=QUICK,
        )
    assert info.value.code == 535
    assert info.value.enhanced_status == (5, 7, 8)
    assert info.value.step is Step.AUTH
    assert info.value.temporary is False
    assert aiosmtpd_peer.received == []


@pytest_twisted.ensureDeferred
async def test_untrusted_certificate(aiosmtpd_peer: AiosmtpdPeer) -> None:
    # No trust_root: the platform's store, which does not know trustme's CA.
    # Opportunistic STARTTLS must fail, not fall back to plaintext.
    with pytest.raises(TLSFailure):
        await sendmail(
            "127.0.0.1",
            "a@example.org",
            ["b@example.org"],
            MESSAGE,
            port=aiosmtpd_peer.starttls_port,
            timeouts=QUICK,
        )
    with pytest.raises(TLSFailure):
        await submit(
            "127.0.0.1",
            "a@example.org",
            ["b@example.org"],
            MESSAGE,
            port=aiosmtpd_peer.tls_port,
            authentication=ALICE,
            timeouts=QUICK,
        )
    assert aiosmtpd_peer.received == []


@pytest_twisted.ensureDeferred
async def test_tls_failure_step(aiosmtpd_peer: AiosmtpdPeer) -> None:
    # A failed handshake is reported at the TLS step, not at the EHLO or
    # greeting the machine would wait for next.
    steps = []
    for port, send in ((aiosmtpd_peer.starttls_port, sendmail), (aiosmtpd_peer.tls_port, submit)):
        with pytest.raises(TLSFailure) as info:
            await send(
                "127.0.0.1", "a@example.org", ["b@example.org"], MESSAGE, port=port, timeouts=QUICK
            )
        steps.append(info.value.step)
    assert steps == [Step.TLS, Step.TLS]


@pytest_twisted.ensureDeferred
async def test_hostname_mismatch_with_tls_options(
    aiosmtpd_peer: AiosmtpdPeer, aiosmtpd_ca: twisted_ssl.Certificate
) -> None:
    # The certificate names localhost, 127.0.0.1 and ::1, not mx.example.net.
    options = twisted_ssl.optionsForClientTLS("mx.example.net", trustRoot=aiosmtpd_ca)
    with pytest.raises(TLSFailure) as info:
        await sendmail(
            "127.0.0.1",
            "a@example.org",
            ["b@example.org"],
            MESSAGE,
            port=aiosmtpd_peer.starttls_port,
            tls=options,
            timeouts=QUICK,
        )
    assert info.value.step is Step.TLS
    assert aiosmtpd_peer.received == []


@pytest_twisted.ensureDeferred
async def test_hostname_mismatch_with_destination_name(
    aiosmtpd_peer: AiosmtpdPeer, aiosmtpd_ca: twisted_ssl.Certificate
) -> None:
    # Reach 127.0.0.1 but call the server mx.example.net: the library must
    # check the certificate against the name it was given.
    for port, send in ((aiosmtpd_peer.starttls_port, sendmail), (aiosmtpd_peer.tls_port, submit)):
        with pytest.raises(TLSFailure) as info:
            await send(
                "mx.example.net",
                "a@example.org",
                ["b@example.org"],
                MESSAGE,
                port=port,
                trust_root=aiosmtpd_ca,
                endpoint=TCP4ClientEndpoint(reactor, "127.0.0.1", port),
                timeouts=QUICK,
            )
        assert info.value.step is Step.TLS
    assert aiosmtpd_peer.received == []


@pytest_twisted.ensureDeferred
async def test_certificate_name_localhost(
    aiosmtpd_peer: AiosmtpdPeer, aiosmtpd_ca: twisted_ssl.Certificate
) -> None:
    # The positive control of the mismatch tests: a name the certificate holds.
    receipt = await sendmail(
        "localhost",
        "a@example.org",
        ["b@example.org"],
        MESSAGE,
        port=aiosmtpd_peer.starttls_port,
        trust_root=aiosmtpd_ca,
        endpoint=TCP4ClientEndpoint(reactor, "127.0.0.1", aiosmtpd_peer.starttls_port),
        timeouts=QUICK,
    )
    assert receipt.tls is not None
    assert len(aiosmtpd_peer.received) == 1


# -- the message arrives as it was given ------------------------------------------------


@pytest.mark.parametrize("body", TRICKY_BODIES.values(), ids=TRICKY_BODIES.keys())
@pytest_twisted.ensureDeferred
async def test_body_byte_exact(
    aiosmtpd_peer: AiosmtpdPeer, aiosmtpd_ca: twisted_ssl.Certificate, body: bytes
) -> None:
    await sendmail(
        "127.0.0.1",
        "a@example.org",
        ["b@example.org"],
        body,
        port=aiosmtpd_peer.starttls_port,
        trust_root=aiosmtpd_ca,
        timeouts=QUICK,
    )
    [received] = aiosmtpd_peer.received
    assert received.data == on_the_wire(body)


@pytest_twisted.ensureDeferred
async def test_large_body_from_file(
    aiosmtpd_peer: AiosmtpdPeer, aiosmtpd_ca: twisted_ssl.Certificate, tmp_path: Path
) -> None:
    body = big_body(5 * 1024 * 1024, newline=b"\n")  # bare LF on disk
    message = tmp_path / "big.eml"
    message.write_bytes(body)
    with message.open("rb") as file:
        receipt = await submit(
            "127.0.0.1",
            "a@example.org",
            ["b@example.org"],
            file,
            port=aiosmtpd_peer.tls_port,
            trust_root=aiosmtpd_ca,
            authentication=ALICE,
            timeouts=QUICK,
        )
    assert receipt.queue_id == "AIO00001"
    [received] = aiosmtpd_peer.received
    assert len(received.data) > 5 * 1024 * 1024
    assert received.data == on_the_wire(body)


@pytest_twisted.ensureDeferred
async def test_large_body_from_async_generator(
    aiosmtpd_peer: AiosmtpdPeer, aiosmtpd_ca: twisted_ssl.Certificate
) -> None:
    body = big_body(5 * 1024 * 1024)
    # An odd chunk size splits CRLFs and dot-led lines across chunks.
    step = 65536 + 7

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), step):
            if start % (8 * step) == 0:
                await deferLater(reactor, 0, lambda: None)
            yield body[start : start + step]

    await sendmail(
        "127.0.0.1",
        "a@example.org",
        ["b@example.org"],
        chunks(),
        port=aiosmtpd_peer.starttls_port,
        trust_root=aiosmtpd_ca,
        timeouts=QUICK,
    )
    [received] = aiosmtpd_peer.received
    assert received.data == on_the_wire(body)


@pytest_twisted.ensureDeferred
async def test_8bit_body(aiosmtpd_peer: AiosmtpdPeer, aiosmtpd_ca: twisted_ssl.Certificate) -> None:
    body = "Subject: café\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nnaïve — ünïcödé ✓\r\n"
    receipt = await sendmail(
        "127.0.0.1",
        "a@example.org",
        ["b@example.org"],
        body.encode("utf-8"),
        port=aiosmtpd_peer.starttls_port,
        trust_root=aiosmtpd_ca,
        timeouts=QUICK,
    )
    assert "8BITMIME" in receipt.extensions
    [received] = aiosmtpd_peer.received
    assert "BODY=8BITMIME" in received.mail_options
    assert received.data == body.encode("utf-8")


# -- envelopes and per-recipient results ----------------------------------------------


@pytest_twisted.ensureDeferred
async def test_null_sender(
    aiosmtpd_peer: AiosmtpdPeer, aiosmtpd_ca: twisted_ssl.Certificate
) -> None:
    await sendmail(
        "127.0.0.1",
        None,
        ["b@example.org"],
        MESSAGE,
        port=aiosmtpd_peer.starttls_port,
        trust_root=aiosmtpd_ca,
        timeouts=QUICK,
    )
    [received] = aiosmtpd_peer.received
    assert received.sender == "<>"  # aiosmtpd keeps the null path as written


@pytest_twisted.ensureDeferred
async def test_postmaster_recipient(
    aiosmtpd_peer: AiosmtpdPeer, aiosmtpd_ca: twisted_ssl.Certificate
) -> None:
    receipt = await sendmail(
        "127.0.0.1",
        "a@example.org",
        ["postmaster"],
        MESSAGE,
        port=aiosmtpd_peer.starttls_port,
        trust_root=aiosmtpd_ca,
        timeouts=QUICK,
    )
    assert list(receipt.accepted) == ["Postmaster"]
    [received] = aiosmtpd_peer.received
    assert received.recipients == ["Postmaster"]


@pytest_twisted.ensureDeferred
async def test_some_recipients_refused(
    aiosmtpd_peer: AiosmtpdPeer, aiosmtpd_ca: twisted_ssl.Certificate
) -> None:
    receipt = await sendmail(
        "127.0.0.1",
        "a@example.org",
        ["one@example.org", "refuse@example.org", "later@example.org", "two@example.org"],
        MESSAGE,
        port=aiosmtpd_peer.starttls_port,
        trust_root=aiosmtpd_ca,
        timeouts=QUICK,
    )
    assert sorted(receipt.accepted) == ["one@example.org", "two@example.org"]
    assert sorted(receipt.refused) == ["later@example.org", "refuse@example.org"]
    assert receipt.refused["refuse@example.org"].code == 550
    assert receipt.refused["refuse@example.org"].enhanced_status == (5, 1, 1)
    assert receipt.refused["later@example.org"].code == 450
    [received] = aiosmtpd_peer.received
    assert received.recipients == ["one@example.org", "two@example.org"]


@pytest_twisted.ensureDeferred
async def test_all_recipients_refused(
    aiosmtpd_peer: AiosmtpdPeer, aiosmtpd_ca: twisted_ssl.Certificate
) -> None:
    with pytest.raises(RecipientsRefused) as info:
        await sendmail(
            "127.0.0.1",
            "a@example.org",
            ["refuse1@example.org", "later@example.org"],
            MESSAGE,
            port=aiosmtpd_peer.starttls_port,
            trust_root=aiosmtpd_ca,
            timeouts=QUICK,
        )
    assert {r: reply.code for r, reply in info.value.refused.items()} == {
        "refuse1@example.org": 550,
        "later@example.org": 450,
    }
    assert info.value.temporary is False  # one refusal is permanent
    assert info.value.step is Step.RCPT

    with pytest.raises(RecipientsRefused) as info:
        await sendmail(
            "127.0.0.1",
            "a@example.org",
            ["later1@example.org", "later2@example.org"],
            MESSAGE,
            port=aiosmtpd_peer.starttls_port,
            trust_root=aiosmtpd_ca,
            timeouts=QUICK,
        )
    assert info.value.temporary is True  # every refusal is 4xx
    assert aiosmtpd_peer.received == []


@pytest_twisted.ensureDeferred
async def test_all_or_nothing(
    aiosmtpd_peer: AiosmtpdPeer, aiosmtpd_ca: twisted_ssl.Certificate
) -> None:
    with pytest.raises(RecipientsRefused) as info:
        await sendmail(
            "127.0.0.1",
            "a@example.org",
            ["one@example.org", "refuse@example.org"],
            MESSAGE,
            port=aiosmtpd_peer.starttls_port,
            trust_root=aiosmtpd_ca,
            all_or_nothing=True,
            timeouts=QUICK,
        )
    assert list(info.value.refused) == ["refuse@example.org"]
    assert aiosmtpd_peer.received == []

    receipt = await sendmail(
        "127.0.0.1",
        "a@example.org",
        ["one@example.org", "two@example.org"],
        MESSAGE,
        port=aiosmtpd_peer.starttls_port,
        trust_root=aiosmtpd_ca,
        all_or_nothing=True,
        timeouts=QUICK,
    )
    assert sorted(receipt.accepted) == ["one@example.org", "two@example.org"]
    [received] = aiosmtpd_peer.received
    assert received.recipients == ["one@example.org", "two@example.org"]


# -- a server without STARTTLS ------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_no_starttls_refuses_to_authenticate(recording_server: StartServer) -> None:
    # AUTH offered in plaintext (auth_require_tls=False) and no STARTTLS.
    recorder, port = recording_server(auth_require_tls=False)
    with pytest.raises(STARTTLSUnavailable) as info:
        await sendmail(
            "127.0.0.1",
            "a@example.org",
            ["b@example.org"],
            MESSAGE,
            port=port,
            authentication=ALICE,
            timeouts=QUICK,
        )
    assert info.value.step is Step.STARTTLS
    assert recorder.commands == []  # neither AUTH nor STARTTLS reached the server
    assert recorder.messages == []

    with pytest.raises(STARTTLSUnavailable):
        await submit(
            "127.0.0.1",
            "a@example.org",
            ["b@example.org"],
            MESSAGE,
            port=port,
            starttls=True,
            timeouts=QUICK,
        )
    assert recorder.messages == []


@pytest_twisted.ensureDeferred
async def test_no_starttls_plaintext(recording_server: StartServer) -> None:
    recorder, port = recording_server(auth_require_tls=False)
    receipt = await sendmail(
        "127.0.0.1", "a@example.org", ["b@example.org"], MESSAGE, port=port, timeouts=QUICK
    )
    assert receipt.tls is None
    assert receipt.queue_id == "REC001"
    [seen] = recorder.messages
    assert (seen.tls, seen.login, seen.data) == (False, None, MESSAGE)
    assert recorder.commands == []


@pytest_twisted.ensureDeferred
async def test_starttls_false_stays_plaintext(
    aiosmtpd_peer: AiosmtpdPeer, aiosmtpd_ca: twisted_ssl.Certificate
) -> None:
    receipt = await sendmail(
        "127.0.0.1",
        "a@example.org",
        ["b@example.org"],
        MESSAGE,
        port=aiosmtpd_peer.starttls_port,
        starttls=False,
        timeouts=QUICK,
    )
    assert receipt.tls is None
    assert "STARTTLS" in receipt.extensions
    [received] = aiosmtpd_peer.received
    assert received.tls is False


# -- reaching the server -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_connection_refused() -> None:
    port = free_port()  # nobody listens there
    with pytest.raises(ConnectionRefused) as info:
        await sendmail(
            "127.0.0.1", "a@example.org", ["b@example.org"], MESSAGE, port=port, timeouts=QUICK
        )
    assert info.value.step is Step.CONNECT
    assert info.value.temporary is True


@pytest_twisted.ensureDeferred
async def test_name_resolution_failed() -> None:
    with pytest.raises(NameResolutionFailed) as info:
        await sendmail(
            "nonexistent.invalid",
            "a@example.org",
            ["b@example.org"],
            MESSAGE,
            port=free_port(),
            timeouts=QUICK,
        )
    assert info.value.step is Step.CONNECT


@pytest_twisted.ensureDeferred
async def test_ip_address_object_destination(
    aiosmtpd_peer: AiosmtpdPeer, aiosmtpd_ca: twisted_ssl.Certificate
) -> None:
    receipt = await sendmail(
        ipaddress.IPv4Address("127.0.0.1"),
        "a@example.org",
        ["b@example.org"],
        MESSAGE,
        port=aiosmtpd_peer.starttls_port,
        trust_root=aiosmtpd_ca,
        timeouts=QUICK,
    )
    assert receipt.tls is not None  # verified against the certificate's IP entry
    assert len(aiosmtpd_peer.received) == 1


@pytest.mark.parametrize("destination", ["::1", "[IPv6:::1]", ipaddress.IPv6Address("::1")])
@pytest_twisted.ensureDeferred
async def test_ipv6_loopback(
    recording_server: StartServer,
    aiosmtpd_peer: AiosmtpdPeer,
    aiosmtpd_ca: twisted_ssl.Certificate,
    destination: Any,
) -> None:
    reason = _ipv6_loopback()
    if reason is not None:
        pytest.skip(f"no IPv6 loopback: {reason}")
    # The peer's certificate also names ::1; reuse its server context.
    recorder, port = recording_server(hostname="::1", tls_context=aiosmtpd_peer.server_context)
    receipt = await sendmail(
        destination,
        "a@example.org",
        ["b@example.org"],
        MESSAGE,
        port=port,
        trust_root=aiosmtpd_ca,
        authentication=ALICE,
        timeouts=QUICK,
    )
    assert receipt.tls is not None
    [seen] = recorder.messages
    assert ipaddress.ip_address(seen.peer[0]) == ipaddress.IPv6Address("::1")
    assert (seen.tls, seen.login, seen.data) == (True, "alice", MESSAGE)


# -- several messages over one connection ------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_session_three_messages(
    recording_server: StartServer,
    aiosmtpd_peer: AiosmtpdPeer,
    aiosmtpd_ca: twisted_ssl.Certificate,
) -> None:
    recorder, port = recording_server(tls_context=aiosmtpd_peer.server_context)
    receipts = []
    async with await connect(
        "127.0.0.1",
        port=port,
        trust_root=aiosmtpd_ca,
        authentication=Authentication("alice", "s3cret", Mechanism.LOGIN),
        timeouts=QUICK,
    ) as session:
        assert session.tls is not None
        for i in range(3):
            body = b"Subject: %d\r\n\r\n.message %d\r\n" % (i, i)
            receipts.append(await session.send("a@example.org", [f"r{i}@example.org"], body))
    await session.closed
    assert [r.queue_id for r in receipts] == ["REC001", "REC002", "REC003"]
    assert [m.recipients for m in recorder.messages] == [
        ["r0@example.org"],
        ["r1@example.org"],
        ["r2@example.org"],
    ]
    assert [m.data for m in recorder.messages] == [
        b"Subject: %d\r\n\r\n.message %d\r\n" % (i, i) for i in range(3)
    ]
    # One connection: one client port, one STARTTLS, one AUTH.
    assert len({m.peer for m in recorder.messages}) == 1
    assert all(m.tls and m.login == "alice" for m in recorder.messages)
    assert recorder.commands == ["STARTTLS", "AUTH LOGIN"]


@pytest_twisted.ensureDeferred
async def test_session_queued_sends(
    recording_server: StartServer,
    aiosmtpd_peer: AiosmtpdPeer,
    aiosmtpd_ca: twisted_ssl.Certificate,
) -> None:
    # aiosmtpd offers no PIPELINING: sends queued at once run one after another.
    recorder, port = recording_server(tls_context=aiosmtpd_peer.server_context)
    async with await connect(
        "127.0.0.1", port=port, trust_root=aiosmtpd_ca, timeouts=QUICK
    ) as session:
        sent = [
            session.send("a@example.org", [f"{who}@example.org"], b"Subject: %d\r\n\r\nx\r\n" % i)
            for i, who in enumerate(["r0", "refuse", "r2"])
        ]
        results = await DeferredList(sent, consumeErrors=True)
    assert [ok for ok, _ in results] == [True, False, True]
    assert isinstance(results[1][1].value, RecipientsRefused)
    assert [results[0][1].queue_id, results[2][1].queue_id] == ["REC001", "REC002"]
    assert [m.recipients for m in recorder.messages] == [["r0@example.org"], ["r2@example.org"]]
    assert len({m.peer for m in recorder.messages}) == 1


@pytest_twisted.ensureDeferred
async def test_session_survives_refused_transaction(
    aiosmtpd_peer: AiosmtpdPeer, aiosmtpd_ca: twisted_ssl.Certificate
) -> None:
    async with await connect(
        "127.0.0.1", port=aiosmtpd_peer.starttls_port, trust_root=aiosmtpd_ca, timeouts=QUICK
    ) as session:
        with pytest.raises(RecipientsRefused):
            await session.send("a@example.org", ["refuse@example.org"], MESSAGE)
        receipt = await session.send("a@example.org", ["b@example.org"], MESSAGE)
    assert receipt.queue_id == "AIO00001"
    [received] = aiosmtpd_peer.received
    assert received.recipients == ["b@example.org"]


# -- large recipient lists (RFC 5321 §4.5.3.1.8, .10) ------------------------------


@pytest.mark.parametrize(
    "too_many",
    ["452 4.5.3 Error: too many recipients", "552 5.5.3 Error: too many recipients"],
)
@pytest_twisted.ensureDeferred
async def test_recipients_over_the_servers_limit_go_in_further_transactions(
    recording_server: StartServer, tmp_path: Path, too_many: str
) -> None:
    limited = Recorder(max_recipients=40, too_many=too_many)
    recorder, port = recording_server(auth_require_tls=False, recorder=limited)
    people = [f"r{i}@example.org" for i in range(130)]
    data = big_body(600_000)  # streamed from the file, so sent again from a copy
    path = tmp_path / "body.eml"
    path.write_bytes(data)
    with path.open("rb") as body:
        receipt = await sendmail(
            "127.0.0.1", "a@example.org", people, body, port=port, timeouts=QUICK
        )
    # Our 100, cut to the server's 40, then 40 at a time on the same connection.
    assert [len(m.recipients) for m in recorder.messages] == [40, 40, 40, 10]
    assert {m.peer for m in recorder.messages} == {recorder.messages[0].peer}
    assert all(m.data == data for m in recorder.messages)
    assert sorted(receipt.accepted) == sorted(people)
    assert receipt.refused == {}  # none bounced by the 552, none deferred by the 452
    assert [p.queue_id for p in receipt.parts] == ["REC001", "REC002", "REC003", "REC004"]
