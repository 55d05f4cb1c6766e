"""The in-memory SMTP server and network behind :mod:`txcolombe.testing`."""

from __future__ import annotations

import base64
import binascii
import datetime
import email
import email.message
import email.policy
import functools
import inspect
import ipaddress
import itertools
import re
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

from OpenSSL import SSL
from twisted.internet._producer_helpers import _PullToPush
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.error import ConnectionLost as ConnectionLostError
from twisted.internet.interfaces import (
    IAddress,
    IConsumer,
    IDelayedCall,
    IOpenSSLServerConnectionCreator,
    IProducer,
    IProtocol,
    IProtocolFactory,
    IPullProducer,
    IPushProducer,
    IReactorTime,
    IStreamClientEndpoint,
    ITCPTransport,
    ITLSTransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.ssl import Certificate
from twisted.internet.task import Cooperator
from twisted.internet.testing import MemoryReactorClock
from twisted.names import dns
from twisted.names.common import ResolverBase
from twisted.names.error import DNSNameError
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import alsoProvides, implementer

from txcolombe.codec.errors import SMTPError
from txcolombe.codec.reply import Reply

__all__ = [
    "DEFAULT_EXTENSIONS",
    "DEFAULT_HOSTNAMES",
    "END_OF_DATA",
    "GREETING",
    "MemoryConnection",
    "MemoryResolver",
    "MemorySMTP",
    "MemorySMTPServer",
    "MemoryTransport",
    "Responder",
    "Response",
    "SMTPServerProtocol",
    "SMTPTestMixin",
    "Transaction",
]

GREETING = "<greeting>"
"""The pseudo-command a script uses to replace the server's greeting."""

END_OF_DATA = "<end of data>"
"""The pseudo-command a script uses to answer the final dot of a message."""

DEFAULT_EXTENSIONS: tuple[str, ...] = (
    "PIPELINING",
    "8BITMIME",
    "SIZE 10485760",
    "ENHANCEDSTATUSCODES",
    "SMTPUTF8",
    "AUTH PLAIN LOGIN",
    "STARTTLS",
)
"""What :class:`MemorySMTPServer` advertises unless told otherwise."""

DEFAULT_HOSTNAMES: tuple[str, ...] = (
    "localhost",
    "example.org",
    "*.example.org",
    "example.com",
    "*.example.com",
    "127.0.0.1",
    "::1",
)
"""The names (and addresses) the server's certificate is valid for."""


# -- what the server records and how it is scripted ------------------------------------


@dataclass(frozen=True)
class Transaction:
    """One message the server accepted.

    :ivar sender: the reverse-path without angle brackets (``""`` for ``<>``).
    :ivar recipients: each forward-path without angle brackets, in order.
    :ivar data: the message exactly as received, dot-unstuffed, without the
        final ``.CRLF`` (so it ends with the CRLF of its last line).
    :ivar mail_parameters: the MAIL FROM parameters, e.g. ``("SIZE=12",)``.
    :ivar rcpt_parameters: each recipient's RCPT TO parameters.
    :ivar tls: True when the transaction ran under TLS.
    :ivar auth: the authenticated user name, or None.
    :ivar helo: the name the client gave in EHLO or HELO.
    :ivar queue_id: the id the server gave in its reply to the final dot.
    """

    sender: str
    recipients: tuple[str, ...]
    data: bytes
    mail_parameters: tuple[str, ...] = ()
    rcpt_parameters: tuple[tuple[str, ...], ...] = ()
    tls: bool = False
    auth: str | None = None
    helo: str | None = None
    queue_id: str = ""

    def message(self) -> email.message.EmailMessage:
        """:attr:`data` parsed as an email message."""
        return email.message_from_bytes(self.data, policy=email.policy.default)


@dataclass(frozen=True)
class Response:
    """What the server does in answer to one command.

    :ivar reply: a :class:`~txcolombe.codec.reply.Reply`; or bytes, written as they
        are (garbage, several replies at once, an injection); or None for no
        reply at all: the server then hangs, reading nothing more, unless
        ``close`` or ``abort`` is set.
    :ivar delay: seconds of fake time before the reply is written; the server
        reads nothing more meanwhile, like a slow server.
    :ivar close: close the connection (cleanly) after the reply.
    :ivar abort: drop the connection (no TLS close, like a reset) after the reply.

    A reply below 400 (or bytes starting with ``2`` or ``3``) lets the
    command take effect as usual (a 250 to RCPT adds the recipient, a 220 to
    STARTTLS starts TLS, a 250 to the final dot records the message); any
    other reply, or none, leaves the server's state as it was.
    """

    reply: Reply | bytes | None
    delay: float = 0.0
    close: bool = False
    abort: bool = False

    @property
    def positive(self) -> bool:
        """True when the command takes effect."""
        if isinstance(self.reply, Reply):
            return self.reply.code < 400
        return self.reply is not None and self.reply[:1] in (b"2", b"3")


Responder = Callable[[str, str], "Reply | bytes | Response | None"]
"""Called with ``(command, argument)`` for each command, upper-case verb
(or :data:`GREETING` / :data:`END_OF_DATA`) and the rest of the line; returns
what to answer, or None for the server's usual answer."""


@dataclass
class _Rule:
    command: str | None
    respond: Responder
    remaining: int | None


# -- the certificate ------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _credentials(hostnames: tuple[str, ...]) -> tuple[bytes, bytes]:
    """A throw-away CA's certificate, and a key and certificate for ``hostnames``
    that it signed (both PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "txcolombe.testing CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    names: list[x509.GeneralName] = []
    for name in hostnames:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            names.append(x509.DNSName(name))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    pem = serialization.Encoding.PEM
    return ca.public_bytes(pem), leaf.public_bytes(pem) + key_pem


@implementer(IOpenSSLServerConnectionCreator)
class _ServerTLS:
    """Server TLS with one key and certificate (TLS 1.2 and later)."""

    def __init__(self, pem: bytes) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        context = SSL.Context(SSL.TLS_METHOD)
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        context.use_certificate(x509.load_pem_x509_certificate(pem))
        context.use_privatekey(load_pem_private_key(pem, None))  # type: ignore[arg-type]
        self._context = context

    def serverConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        return SSL.Connection(self._context, None)


# -- the server -------------------------------------------------------------------------

_Effect = Callable[[], None]
_LEADING_DOT = re.compile(rb"(?:\A|(?<=\r\n))\.")
_PATH = re.compile(r"\s*<([^<>]*)>(.*)\Z")


def _unstuff(lines: bytes | bytearray) -> bytes:
    """Remove the dot that starts a line (RFC 5321 §4.5.2)."""
    return _LEADING_DOT.sub(b"", bytes(lines))


def _parse_path(argument: str, prefix: str) -> tuple[str, tuple[str, ...]] | None:
    """``FROM:<a@b> SIZE=1`` → ``("a@b", ("SIZE=1",))``; None when malformed."""
    if argument[: len(prefix)].upper() != prefix:
        return None
    match = _PATH.match(argument[len(prefix) :])
    if match is None:
        return None
    return match.group(1), tuple(match.group(2).split())


def _b64(text: str) -> bytes | None:
    try:
        return base64.b64decode(text.strip().encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        return None


class MemorySMTPServer(Factory):
    """An SMTP server for tests: a protocol factory that records what it receives.

    Use it with :class:`MemorySMTP` (or with any transport: it is an ordinary
    Twisted factory, though STARTTLS needs a transport with ``startTLS``).

    :param name: the server's name in its greeting and EHLO reply.
    :param extensions: the EHLO keywords with their parameters. STARTTLS is
        advertised only before TLS; AUTH only under TLS unless
        ``auth_without_tls``.
    :param users: user name → password, for AUTH PLAIN and LOGIN.
    :param require_auth: answer MAIL with 530 until the client authenticates.
    :param hostnames: the names and addresses the TLS certificate is valid for.
    :param clock: where slow replies wait; :class:`MemorySMTP` sets its
        reactor here.

    :ivar transactions: every accepted message, in order.
    :ivar commands: every line received in command mode (AUTH responses
        included), in order, over all connections.
    :ivar connections: every connection's protocol, in order.
    :ivar trust_root: the CA that signed the server's certificate, for
        ``trust_root=``.
    :ivar ca_pem: the same CA certificate, PEM-encoded.
    """

    noisy = False

    def __init__(
        self,
        *,
        name: str = "mx.example.org",
        extensions: Iterable[str] = DEFAULT_EXTENSIONS,
        users: Mapping[str, str] | None = None,
        require_auth: bool = False,
        auth_without_tls: bool = False,
        hostnames: Iterable[str] = DEFAULT_HOSTNAMES,
        clock: IReactorTime | None = None,
    ) -> None:
        self.name = name
        self.extensions = tuple(extensions)
        self.users = dict(users or {})
        self.require_auth = require_auth
        self.auth_without_tls = auth_without_tls
        self.clock = clock
        self.transactions: list[Transaction] = []
        self.commands: list[str] = []
        self.connections: list[SMTPServerProtocol] = []
        ca_pem, server_pem = _credentials(tuple(hostnames))
        self.ca_pem = ca_pem
        self.trust_root = Certificate.loadPEM(ca_pem)
        self.tls_options: IOpenSSLServerConnectionCreator = _ServerTLS(server_pem)
        self._rules: list[_Rule] = []
        self._queue_ids = itertools.count(1)

    def buildProtocol(self, addr: IAddress | None) -> SMTPServerProtocol:
        protocol = SMTPServerProtocol(self)
        protocol.factory = self
        self.connections.append(protocol)
        return protocol

    # -- scripting ----------------------------------------------------------------------

    def script(
        self,
        command: str,
        reply: Reply | bytes | None,
        *,
        delay: float = 0.0,
        close: bool = False,
        abort: bool = False,
        times: int | None = 1,
    ) -> None:
        """Answer the next ``times`` ``command`` (all of them if None) with ``reply``.

        ``command`` is a verb (``"RCPT"``), :data:`GREETING` or
        :data:`END_OF_DATA`; see :class:`Response` for the other arguments.
        Rules apply in the order they were added, so two scripts for the
        same command answer its first and second occurrence::

            server.script("RCPT", Reply.of(450, "4.2.1 try later"))
            server.script(END_OF_DATA, None, delay=0, close=True)  # drop after the dot
        """
        response = Response(reply, delay=delay, close=close, abort=abort)
        verb = command if command in (GREETING, END_OF_DATA) else command.upper()
        self._rules.append(_Rule(verb, lambda _c, _a: response, times))

    def add_responder(self, responder: Responder) -> None:
        """Ask ``responder`` about every command (after earlier rules).

        It gets ``(command, argument)`` and returns a :class:`Reply`, bytes,
        a :class:`Response`, or None to let the server answer as usual.
        """
        self._rules.append(_Rule(None, responder, None))

    def inject(self, data: bytes) -> None:
        """Write ``data`` as it is on every open connection, now."""
        for protocol in self.connections:
            protocol.inject(data)

    def _scripted(self, command: str, argument: str) -> Response | None:
        for rule in self._rules:
            if rule.remaining == 0 or rule.command not in (None, command):
                continue
            answer = rule.respond(command, argument)
            if answer is None:
                continue
            if rule.remaining is not None:
                rule.remaining -= 1
            if isinstance(answer, Response):
                return answer
            return Response(answer)
        return None

    def _next_queue_id(self) -> str:
        return f"MEM{next(self._queue_ids):06d}"


class SMTPServerProtocol(Protocol):
    """One connection to a :class:`MemorySMTPServer`.

    :ivar tls: TLS is active (after STARTTLS, or implicit).
    :ivar helo: the name from the last EHLO/HELO, or None.
    :ivar authenticated: the user name after a successful AUTH, or None.
    :ivar closed: the connection is gone.
    :ivar implicit_tls: start TLS before the greeting (set before connecting).
    """

    def __init__(self, server: MemorySMTPServer) -> None:
        self.server = server
        self.tls = False
        self.helo: str | None = None
        self.authenticated: str | None = None
        self.closed = False
        self.implicit_tls = False
        self._input = bytearray()
        self._data: bytearray | None = None
        self._blocked = False
        self._closing = False
        self._timer: IDelayedCall | None = None
        self._auth: Callable[[str], tuple[Reply, _Effect | None]] | None = None
        self._sender: str | None = None
        self._mail_parameters: tuple[str, ...] = ()
        self._recipients: list[tuple[str, tuple[str, ...]]] = []

    # -- controls for tests ---------------------------------------------------------------

    def inject(self, data: bytes) -> None:
        """Write ``data`` as it is, now."""
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def close(self) -> None:
        """Close the connection cleanly (TLS close_notify included)."""
        self._closing = True
        if self.transport is not None and not self.closed:
            self.transport.loseConnection()

    def abort(self) -> None:
        """Drop the connection at once."""
        self._closing = True
        if self.transport is not None and not self.closed:
            cast(ITCPTransport, self.transport).abortConnection()

    # -- the transport's callbacks -----------------------------------------------------------

    def connectionMade(self) -> None:
        if self.implicit_tls:
            self._start_tls()
        self._respond(GREETING, "", Reply.of(220, f"{self.server.name} ESMTP txcolombe.testing"))

    def dataReceived(self, data: bytes) -> None:
        self._input += data
        self._process()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    # -- reading ---------------------------------------------------------------------------

    def _process(self) -> None:
        while self._input and not (self._blocked or self._closing or self.closed):
            if self._data is not None:
                if not self._take_data():
                    return
                continue
            end = self._input.find(b"\n")
            if end < 0:
                return
            raw = bytes(self._input[:end])
            del self._input[: end + 1]
            self._line(raw[:-1] if raw.endswith(b"\r") else raw)

    def _take_data(self) -> bool:
        """Take complete body lines; True once the final dot was read."""
        buffer, data = self._input, self._data
        assert data is not None
        if buffer.startswith(b".\r\n"):
            del buffer[:3]
            self._end_of_data()
            return True
        end = buffer.find(b"\r\n.\r\n")
        if end >= 0:
            data += _unstuff(buffer[: end + 2])
            del buffer[: end + 5]
            self._end_of_data()
            return True
        last = buffer.rfind(b"\r\n")
        if last >= 0:
            data += _unstuff(buffer[: last + 2])
            del buffer[: last + 2]
        return False

    def _line(self, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace")
        self.server.commands.append(line)
        if self._auth is not None:
            step, self._auth = self._auth, None
            reply, effect = step(line)
            self._respond("AUTH", line, reply, effect)
            return
        verb, _, argument = line.partition(" ")
        verb = verb.upper()
        handler = _COMMANDS.get(verb, SMTPServerProtocol._unknown)
        reply, effect = handler(self, argument)
        self._respond(verb, argument, reply, effect)

    # -- answering -----------------------------------------------------------------------------

    def _respond(
        self, command: str, argument: str, default: Reply, effect: _Effect | None = None
    ) -> None:
        response = self.server._scripted(command, argument) or Response(default)
        if response.reply is None and not (response.close or response.abort):
            self._blocked = True  # hang: never answer, read nothing more
            return
        if response.delay > 0:
            self._blocked = True
            clock = self.server.clock
            if clock is None:
                from twisted.internet import reactor

                clock = cast(IReactorTime, reactor)
            self._timer = clock.callLater(response.delay, self._delayed, response, effect)
            return
        self._send(response, effect)

    def _delayed(self, response: Response, effect: _Effect | None) -> None:
        self._timer = None
        self._blocked = False
        self._send(response, effect)
        self._process()

    def _send(self, response: Response, effect: _Effect | None) -> None:
        if self.closed or self.transport is None:
            return
        if isinstance(response.reply, Reply):
            self.transport.write(response.reply.to_bytes())
        elif response.reply is not None:
            self.transport.write(response.reply)
        if effect is not None and response.positive:
            effect()
        if response.abort:
            self.abort()
        elif response.close:
            self.close()

    # -- session state ---------------------------------------------------------------------------

    def _reset(self) -> None:
        self._sender = None
        self._mail_parameters = ()
        self._recipients = []
        self._data = None

    def _advertised(self) -> list[str]:
        lines = []
        for extension in self.server.extensions:
            keyword = extension.split()[0].upper() if extension.split() else ""
            if keyword == "STARTTLS" and self.tls:
                continue
            if keyword == "AUTH" and not (self.tls or self.server.auth_without_tls):
                continue
            lines.append(extension)
        return lines

    def _offers(self, keyword: str) -> tuple[str, ...] | None:
        for extension in self._advertised():
            words = extension.split()
            if words and words[0].upper() == keyword:
                return tuple(w.upper() for w in words[1:])
        return None

    def _start_tls(self) -> None:
        del self._input[:]  # RFC 3207 §4.2: nothing read before TLS counts
        self._reset()
        self.helo = None
        self.authenticated = None
        self.tls = True
        cast(ITLSTransport, self.transport).startTLS(self.server.tls_options)

    def _size_limit(self) -> int | None:
        size = self._offers("SIZE")
        if size and size[0].isdigit() and int(size[0]) > 0:
            return int(size[0])
        return None

    # -- commands ----------------------------------------------------------------------------------

    def _ehlo(self, argument: str) -> tuple[Reply, _Effect | None]:
        if not argument.strip():
            return Reply.of(501, "5.5.4 EHLO needs a domain"), None
        name = argument.strip()

        def hello() -> None:
            self.helo = name
            self._reset()

        greeting = f"{self.server.name} greets {name}"
        return Reply.of(250, greeting, *self._advertised()), hello

    def _helo(self, argument: str) -> tuple[Reply, _Effect | None]:
        reply, hello = self._ehlo(argument)
        return (Reply.of(250, self.server.name) if hello else reply), hello

    def _starttls(self, argument: str) -> tuple[Reply, _Effect | None]:
        if self.tls:
            return Reply.of(503, "5.5.1 TLS already active"), None
        if self._offers("STARTTLS") is None:
            return Reply.of(502, "5.5.1 STARTTLS not offered"), None
        return Reply.of(220, "2.0.0 Ready to start TLS"), self._start_tls

    def _auth_command(self, argument: str) -> tuple[Reply, _Effect | None]:
        mechanisms = self._offers("AUTH")
        if mechanisms is None:
            return Reply.of(503, "5.5.1 AUTH not available"), None
        if self.authenticated is not None or self._sender is not None:
            return Reply.of(503, "5.5.1 AUTH not allowed now"), None
        mechanism, _, initial = argument.strip().partition(" ")
        mechanism = mechanism.upper()
        if mechanism not in mechanisms:
            return Reply.of(504, "5.5.4 Unrecognized authentication type"), None
        if mechanism == "PLAIN":
            if initial:
                return self._auth_plain(initial)
            return Reply.of(334, ""), self._expect(self._auth_plain)
        if initial:
            return self._login_user(initial)
        return Reply.of(334, "VXNlcm5hbWU6"), self._expect(self._login_user)

    def _expect(self, step: Callable[[str], tuple[Reply, _Effect | None]]) -> _Effect:
        def expect() -> None:
            self._auth = step

        return expect

    def _auth_plain(self, response: str) -> tuple[Reply, _Effect | None]:
        if response == "*":
            return Reply.of(501, "5.7.0 Authentication cancelled"), None
        decoded = _b64(response)
        parts = decoded.split(b"\x00") if decoded is not None else []
        if len(parts) != 3:
            return Reply.of(501, "5.5.2 Cannot decode the response"), None
        return self._check(parts[1], parts[2])

    def _login_user(self, response: str) -> tuple[Reply, _Effect | None]:
        if response == "*":
            return Reply.of(501, "5.7.0 Authentication cancelled"), None
        user = _b64(response)
        if user is None:
            return Reply.of(501, "5.5.2 Cannot decode the response"), None

        def password(answer: str) -> tuple[Reply, _Effect | None]:
            if answer == "*":
                return Reply.of(501, "5.7.0 Authentication cancelled"), None
            secret = _b64(answer)
            if secret is None:
                return Reply.of(501, "5.5.2 Cannot decode the response"), None
            return self._check(user, secret)

        return Reply.of(334, "UGFzc3dvcmQ6"), self._expect(password)

    def _check(self, user: bytes, password: bytes) -> tuple[Reply, _Effect | None]:
        name = user.decode("utf-8", "replace")
        if name not in self.server.users or self.server.users[name].encode() != password:
            return Reply.of(535, "5.7.8 Authentication credentials invalid"), None

        def authenticated() -> None:
            self.authenticated = name

        return Reply.of(235, "2.7.0 Authentication successful"), authenticated

    def _mail(self, argument: str) -> tuple[Reply, _Effect | None]:
        if self.helo is None:
            return Reply.of(503, "5.5.1 Send EHLO first"), None
        if self._sender is not None:
            return Reply.of(503, "5.5.1 Nested MAIL command"), None
        if self.server.require_auth and self.authenticated is None:
            return Reply.of(530, "5.7.0 Authentication required"), None
        parsed = _parse_path(argument, "FROM:")
        if parsed is None:
            return Reply.of(501, "5.5.4 Syntax: MAIL FROM:<address>"), None
        sender, parameters = parsed
        limit = self._size_limit()
        for parameter in parameters:
            key, _, value = parameter.partition("=")
            if key.upper() == "SIZE" and limit and value.isdigit() and int(value) > limit:
                return Reply.of(552, "5.3.4 Message size exceeds fixed limit"), None

        def mail() -> None:
            self._sender = sender
            self._mail_parameters = parameters
            self._recipients = []

        return Reply.of(250, "2.1.0 Ok"), mail

    def _rcpt(self, argument: str) -> tuple[Reply, _Effect | None]:
        if self._sender is None:
            return Reply.of(503, "5.5.1 Need MAIL before RCPT"), None
        parsed = _parse_path(argument, "TO:")
        if parsed is None:
            return Reply.of(501, "5.5.4 Syntax: RCPT TO:<address>"), None
        return Reply.of(250, "2.1.5 Ok"), functools.partial(self._recipients.append, parsed)

    def _data_command(self, argument: str) -> tuple[Reply, _Effect | None]:
        if argument.strip():
            return Reply.of(501, "5.5.4 DATA takes no argument"), None
        if self._sender is None:
            return Reply.of(503, "5.5.1 Need MAIL command"), None
        if not self._recipients:
            return Reply.of(554, "5.5.1 No valid recipients"), None

        def start() -> None:
            self._data = bytearray()

        return Reply.of(354, "End data with <CR><LF>.<CR><LF>"), start

    def _end_of_data(self) -> None:
        data = bytes(self._data or b"")
        self._data = None
        limit = self._size_limit()
        if limit is not None and len(data) > limit:
            self._reset()
            self._respond(END_OF_DATA, "", Reply.of(552, "5.3.4 Message size exceeds fixed limit"))
            return
        queue_id = self.server._next_queue_id()
        transaction = Transaction(
            sender=self._sender or "",
            recipients=tuple(rcpt for rcpt, _ in self._recipients),
            data=data,
            mail_parameters=self._mail_parameters,
            rcpt_parameters=tuple(params for _, params in self._recipients),
            tls=self.tls,
            auth=self.authenticated,
            helo=self.helo,
            queue_id=queue_id,
        )

        def record() -> None:
            self.server.transactions.append(transaction)

        self._reset()
        self._respond(END_OF_DATA, "", Reply.of(250, f"2.0.0 Ok: queued as {queue_id}"), record)

    def _rset(self, argument: str) -> tuple[Reply, _Effect | None]:
        return Reply.of(250, "2.0.0 Ok"), self._reset

    def _noop(self, argument: str) -> tuple[Reply, _Effect | None]:
        return Reply.of(250, "2.0.0 Ok"), None

    def _vrfy(self, argument: str) -> tuple[Reply, _Effect | None]:
        return Reply.of(252, "2.1.5 Cannot VRFY user"), None

    def _quit(self, argument: str) -> tuple[Reply, _Effect | None]:
        return Reply.of(221, "2.0.0 Bye"), self.close

    def _unknown(self, argument: str) -> tuple[Reply, _Effect | None]:
        return Reply.of(500, "5.5.2 Command not recognized"), None


_COMMANDS: dict[str, Callable[[SMTPServerProtocol, str], tuple[Reply, _Effect | None]]] = {
    "EHLO": SMTPServerProtocol._ehlo,
    "HELO": SMTPServerProtocol._helo,
    "STARTTLS": SMTPServerProtocol._starttls,
    "AUTH": SMTPServerProtocol._auth_command,
    "MAIL": SMTPServerProtocol._mail,
    "RCPT": SMTPServerProtocol._rcpt,
    "DATA": SMTPServerProtocol._data_command,
    "RSET": SMTPServerProtocol._rset,
    "NOOP": SMTPServerProtocol._noop,
    "VRFY": SMTPServerProtocol._vrfy,
    "QUIT": SMTPServerProtocol._quit,
}


# -- the in-memory network ------------------------------------------------------------------

_Address = IPv4Address | IPv6Address


@implementer(ITCPTransport, IConsumer)
class _Wire:
    """The raw byte stream under a TLS layer started on a :class:`MemoryTransport`."""

    def __init__(self, end: MemoryTransport) -> None:
        self._end = end

    def write(self, data: bytes) -> None:
        self._end._wire_write(data)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self._end._wire_write(b"".join(data))

    def loseConnection(self) -> None:
        self._end._wire_lose()

    def abortConnection(self) -> None:
        self._end._wire_abort()

    def loseWriteConnection(self) -> None:
        self._end._wire_lose()

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        self._end._wire_register(producer, streaming)

    def unregisterProducer(self) -> None:
        self._end._wire_unregister()

    def getPeer(self) -> _Address:
        return self._end.getPeer()

    def getHost(self) -> _Address:
        return self._end.getHost()

    def getTcpNoDelay(self) -> bool:
        return self._end.getTcpNoDelay()

    def setTcpNoDelay(self, enabled: bool) -> None:
        self._end.setTcpNoDelay(enabled)

    def getTcpKeepAlive(self) -> bool:
        return self._end.getTcpKeepAlive()

    def setTcpKeepAlive(self, enabled: bool) -> None:
        self._end.setTcpKeepAlive(enabled)


@implementer(ITCPTransport, ITLSTransport, IConsumer, IPushProducer)
class MemoryTransport:
    """One end of a :class:`MemoryConnection`, as its protocol sees it.

    Writes wait in a buffer until :meth:`MemorySMTP.flush` delivers them. A
    registered producer is paused while more than ``buffer_size`` octets
    wait, and resumed once they are delivered, as a TCP transport does.
    ``startTLS`` inserts a real :class:`~twisted.protocols.tls.TLSMemoryBIOProtocol`.

    :ivar protocol: the protocol connected to this end.
    :ivar writes: every ``write`` the protocol made, as given (before TLS).
    :ivar tcp_no_delay: the last value given to ``setTcpNoDelay``.
    :ivar disconnecting: the protocol asked to close (or abort).
    :ivar aborted: the protocol called ``abortConnection``.
    :ivar tls: TLS was started on this end.
    :ivar reading_paused: the protocol paused reading (``pauseProducing``);
        nothing is delivered to it until it resumes.
    :ivar producer: the producer registered by the protocol, if any.
    """

    def __init__(
        self,
        connection: MemoryConnection,
        protocol: IProtocol,
        *,
        is_server: bool,
        host: _Address,
        peer: _Address,
        buffer_size: int,
    ) -> None:
        self.protocol = protocol
        self.writes: list[bytes] = []
        self.tcp_no_delay = False
        self.tcp_keep_alive = False
        self.disconnecting = False
        self.aborted = False
        self.tls = False
        self.reading_paused = False
        self.producer: IProducer | None = None
        self._connection = connection
        self._is_server = is_server
        self._host = host
        self._peer = peer
        self._buffer_size = buffer_size
        self._receiver: IProtocol = protocol
        self._tls: TLSMemoryBIOProtocol | None = None
        self._out: list[bytes] = []
        self._out_size = 0
        self._wire_closing = False
        self._wire_aborted = False
        self._wire_producer: Any = None  # IPushProducer, or IPullProducer
        self._wire_streaming = True
        self._wire_paused = False

    @property
    def buffered(self) -> int:
        """Octets written and not yet delivered."""
        return self._out_size

    # -- ITransport ---------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.disconnecting:
            return
        self.writes.append(data)
        if self._tls is not None:
            self._tls.write(data)  # type: ignore[no-untyped-call]
        else:
            self._wire_write(data)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        if self.disconnecting:
            return
        self.disconnecting = True
        if self._tls is not None:
            self._tls.loseConnection()  # type: ignore[no-untyped-call]
        else:
            self._wire_lose()

    def abortConnection(self) -> None:
        self.disconnecting = True
        self.aborted = True
        if self._tls is not None:
            self._tls.abortConnection()  # type: ignore[no-untyped-call]
        self._wire_abort()

    def loseWriteConnection(self) -> None:
        """Half-close is not simulated: the same as :meth:`loseConnection`."""
        self.loseConnection()

    def getPeer(self) -> _Address:
        return self._peer

    def getHost(self) -> _Address:
        return self._host

    def getTcpNoDelay(self) -> bool:
        return self.tcp_no_delay

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.tcp_no_delay = enabled

    def getTcpKeepAlive(self) -> bool:
        return self.tcp_keep_alive

    def setTcpKeepAlive(self, enabled: bool) -> None:
        self.tcp_keep_alive = enabled

    # -- TLS ---------------------------------------------------------------------------------

    def startTLS(self, contextFactory: Any, beNormal: bool = True) -> None:
        """Put a TLS layer between this end and its protocol, from now on."""
        is_client = (not self._is_server) if beNormal else self._is_server
        factory = TLSMemoryBIOFactory(
            contextFactory, is_client, Factory(), clock=self._connection.network.reactor
        )
        tls = TLSMemoryBIOProtocol(factory, self.protocol, _connectWrapped=False)  # type: ignore[no-untyped-call]
        producer, streaming = self._wire_producer, self._wire_streaming
        if producer is not None:
            self._wire_unregister()
        self._tls = tls
        self._receiver = tls
        self.tls = True
        alsoProvides(self, ITLSTransport)
        tls.makeConnection(_Wire(self))  # type: ignore[no-untyped-call]
        if producer is not None:
            tls.registerProducer(producer, streaming)  # type: ignore[no-untyped-call]

    def getHandle(self) -> object:
        """The ``OpenSSL.SSL.Connection`` once TLS is started, else None."""
        return self._tls.getHandle() if self._tls is not None else None  # type: ignore[no-untyped-call]

    def getPeerCertificate(self) -> object:
        if self._tls is None:
            return None
        return self._tls.getPeerCertificate()  # type: ignore[no-untyped-call]

    # -- IConsumer -----------------------------------------------------------------------------

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        if self.producer is not None:
            raise RuntimeError(f"{self.producer!r} is already registered")
        self.producer = producer
        if self._tls is None:
            self._wire_register(producer, streaming)
        elif streaming:
            self._tls.registerProducer(producer, True)  # type: ignore[no-untyped-call]
        else:
            # The TLS layer would pull from a pull producer on the global
            # reactor's cooperator (FileSender, e.g. twisted.mail's client):
            # pull on the fake clock instead.
            pusher = _FakeClockPullToPush(
                producer, cast(IConsumer, self._tls), self._connection.network.cooperator
            )
            self._tls.registerProducer(pusher, True)  # type: ignore[no-untyped-call]
            if self._tls._producer is not None:
                pusher.startStreaming()

    def unregisterProducer(self) -> None:
        self.producer = None
        if self._tls is not None:
            self._tls.unregisterProducer()  # type: ignore[no-untyped-call]
        else:
            self._wire_unregister()

    # -- IPushProducer: reading -----------------------------------------------------------------

    def pauseProducing(self) -> None:
        """Stop delivering received bytes to the protocol (a slow reader)."""
        self.reading_paused = True

    def resumeProducing(self) -> None:
        """Deliver received bytes again, at the next flush."""
        self.reading_paused = False

    def stopProducing(self) -> None:
        self.loseConnection()

    # -- the wire -------------------------------------------------------------------------------

    def _wire_write(self, data: bytes) -> None:
        if self._wire_aborted or self._connection.closed or not data:
            return
        self._out.append(bytes(data))
        self._out_size += len(data)
        producer = self._wire_producer
        if (
            producer is not None
            and self._wire_streaming
            and not self._wire_paused
            and self._out_size > self._buffer_size
        ):
            self._wire_paused = True
            producer.pauseProducing()

    def _wire_lose(self) -> None:
        self._wire_closing = True

    def _wire_abort(self) -> None:
        self._wire_aborted = True
        self._out.clear()
        self._out_size = 0

    def _wire_register(self, producer: IProducer, streaming: bool) -> None:
        self._wire_producer = producer
        self._wire_streaming = streaming
        self._wire_paused = False
        if not streaming:
            cast(IPullProducer, producer).resumeProducing()

    def _wire_unregister(self) -> None:
        self._wire_producer = None
        self._wire_paused = False

    def _take(self) -> bytes:
        data = b"".join(self._out)
        self._out.clear()
        self._out_size = 0
        return data

    def _drained(self) -> None:
        producer = self._wire_producer
        if producer is None or self._connection.closed:
            return
        if not self._wire_streaming:
            producer.resumeProducing()
        elif self._wire_paused:
            self._wire_paused = False
            producer.resumeProducing()

    def _deliver(self, data: bytes) -> None:
        self._receiver.dataReceived(data)

    def _lost(self, reason: Exception) -> None:
        producer, self._wire_producer = self._wire_producer, None
        self.producer = None
        if producer is not None:
            producer.stopProducing()
        self._receiver.connectionLost(Failure(reason))  # type: ignore[no-untyped-call]


class _FakeClockPullToPush(_PullToPush):
    """Twisted's pull-to-push adapter, pulling on a cooperator of our choosing."""

    def __init__(self, producer: IProducer, consumer: IConsumer, cooperator: Cooperator) -> None:
        super().__init__(producer, consumer)  # type: ignore[no-untyped-call]
        self._cooperator = cooperator

    def startStreaming(self) -> None:
        self._coopTask = self._cooperator.cooperate(self._pull())  # type: ignore[no-untyped-call]


class MemoryConnection:
    """A connection between a client protocol and the server, in memory.

    :ivar client: the client's end.
    :ivar server: the server's end.
    :ivar server_protocol: the :class:`SMTPServerProtocol` on the server's end.
    :ivar closed: both ends have been told the connection is lost.
    """

    def __init__(
        self,
        network: MemorySMTP,
        client_protocol: IProtocol,
        server_protocol: SMTPServerProtocol,
        client_address: _Address,
        server_address: _Address,
    ) -> None:
        self.network = network
        self.closed = False
        self.server_protocol = server_protocol
        size = network.buffer_size
        self.client = MemoryTransport(
            self,
            client_protocol,
            is_server=False,
            host=client_address,
            peer=server_address,
            buffer_size=size,
        )
        self.server = MemoryTransport(
            self,
            server_protocol,
            is_server=True,
            host=server_address,
            peer=client_address,
            buffer_size=size,
        )

    def pump(self) -> bool:
        """Deliver what each end wrote, or close; True if anything happened."""
        if self.closed:
            return False
        for end in (self.client, self.server):
            if end._wire_aborted:
                self._close(end, aborted=True)
                return True
        moved = False
        for source, target in ((self.client, self.server), (self.server, self.client)):
            if not source._out or target.reading_paused:
                continue
            data = source._take()
            if not (target._wire_closing or target._wire_aborted):
                target._deliver(data)
            source._drained()
            moved = True
            if self.closed:
                return True
        if moved:
            return True
        for end in (self.client, self.server):
            if end._wire_aborted or (end._wire_closing and not end._out):
                self._close(end, aborted=end._wire_aborted)
                return True
        return False

    def _close(self, initiator: MemoryTransport, *, aborted: bool) -> None:
        self.closed = True
        peer = self.server if initiator is self.client else self.client
        if aborted:
            initiator._lost(ConnectionAborted())
            peer._lost(ConnectionLostError("the peer reset the connection"))
        else:
            initiator._lost(ConnectionDone())
            peer._lost(ConnectionDone())


@dataclass
class _PendingConnection:
    """A connection attempt, completed at the next flush.

    From :meth:`MemorySMTP.endpoint` it has a ``deferred``; from the reactor's
    ``connectTCP`` a ``connector`` (and the factory is a ``ClientFactory``).
    """

    factory: IProtocolFactory
    implicit_tls: bool
    error: Exception | None
    deferred: Deferred[IProtocol] | None = None
    connector: Any = None
    server_address: _Address | None = None


@implementer(IStreamClientEndpoint)
@dataclass
class _MemoryEndpoint:
    network: MemorySMTP
    implicit_tls: bool
    error: Exception | None

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        pending: _PendingConnection

        def cancel(_: Deferred[IProtocol]) -> None:
            if pending in self.network._pending:
                self.network._pending.remove(pending)

        deferred: Deferred[IProtocol] = Deferred(cancel)
        pending = _PendingConnection(
            protocolFactory, self.implicit_tls, self.error, deferred=deferred
        )
        self.network._pending.append(pending)
        return deferred


class _NetworkReactor(MemoryReactorClock):
    """A ``MemoryReactorClock`` whose ``connectTCP`` reaches the in-memory server.

    Whatever the host and port, the connection goes to the one
    :class:`MemorySMTPServer`; names resolve (through
    ``MemoryReactorClock``'s resolver) to 127.0.0.1 without any lookup.
    """

    def __init__(self, network: MemorySMTP) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._network = network

    def connectTCP(  # type: ignore[no-untyped-def]
        self, host, port, factory, timeout=30, bindAddress=None
    ):
        connector = super().connectTCP(host, port, factory, timeout, bindAddress)  # type: ignore[no-untyped-call]
        self._network._connect_tcp(host, port, factory, connector)
        return connector


class MemoryResolver(ResolverBase):
    """A DNS resolver for :func:`~txcolombe.delivery.deliver`: one exchanger for every domain.

    Every domain's MX record names ``exchanger``; every name has one A record,
    ``address``, and no AAAA or TXT record (so no MTA-STS policy); the names
    in ``missing`` (and their subdomains) do not exist (NXDOMAIN). Give it as
    ``resolver=`` together with ``reactor=`` :attr:`MemorySMTP.reactor`, whose
    connections to any address reach the in-memory server.

    :ivar queries: every question asked, as ``(name, type)``, e.g.
        ``("example.org", "MX")``.
    """

    def __init__(
        self,
        *,
        exchanger: str = "mx.example.org",
        address: str = "192.0.2.25",
        missing: Iterable[str] = (),
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.exchanger = exchanger
        self.address = address
        self.missing = {name.rstrip(".").lower() for name in missing}
        self.queries: list[tuple[str, str]] = []

    def _lookup(
        self, name: bytes, cls: int, type: int, timeout: object
    ) -> Deferred[tuple[list[dns.RRHeader], list[dns.RRHeader], list[dns.RRHeader]]]:
        text = name.decode("ascii", "replace").rstrip(".").lower()
        self.queries.append((text, dns.QUERY_TYPES.get(type, str(type))))
        if any(text == gone or text.endswith("." + gone) for gone in self.missing):
            return fail(DNSNameError(text))
        answers: list[dns.RRHeader] = []
        if type == dns.MX:
            record: Any = dns.Record_MX(10, self.exchanger.encode("ascii"))  # type: ignore[no-untyped-call]
            answers.append(dns.RRHeader(name, dns.MX, dns.IN, 300, record))
        elif type == dns.A:
            record = dns.Record_A(self.address)  # type: ignore[no-untyped-call]
            answers.append(dns.RRHeader(name, dns.A, dns.IN, 300, record))
        return succeed((answers, [], []))


class MemorySMTP:
    """An in-memory network with one :class:`MemorySMTPServer` on it.

    Clients reach the server in two ways: through :meth:`endpoint` (give it as
    ``endpoint=``), or through :attr:`reactor` alone: every TCP connection
    made on it, to any host and port, goes to the server (port 465 with
    implicit TLS), so ``sendmail(..., reactor=fake.reactor)``,
    ``Pool(reactor=fake.reactor)`` and ``deliver(..., reactor=fake.reactor,
    resolver=fake.resolver)`` need nothing else.

    :param server: the server (a fresh :class:`MemorySMTPServer` by default).
    :param reactor: the fake reactor; by default a fresh
        ``MemoryReactorClock`` whose TCP connections reach the server. One
        given here only records its ``connectTCP`` calls.
    :param buffer_size: octets a transport buffers before pausing its producer.
    :param implicit_tls_ports: ports where connections made through the
        reactor speak TLS from the first byte.

    :ivar reactor: give it as ``reactor=``; move its clock with :meth:`advance`.
    :ivar resolver: a :class:`MemoryResolver`, for ``deliver(resolver=)``.
    :ivar connections: every connection made, in order.
    :ivar cooperator: a :class:`~twisted.internet.task.Cooperator` run by the
        fake reactor, for body producers that take one.
    :ivar connect_error: when set, every connection attempt through the
        reactor fails with it (e.g.
        ``twisted.internet.error.ConnectionRefusedError()``).
    """

    max_rounds = 100_000
    """How many rounds :meth:`flush` runs before it gives up."""

    def __init__(
        self,
        server: MemorySMTPServer | None = None,
        *,
        reactor: MemoryReactorClock | None = None,
        buffer_size: int = 64 * 1024,
        implicit_tls_ports: Iterable[int] = (465,),
    ) -> None:
        self.server = server if server is not None else MemorySMTPServer()
        self.reactor = reactor if reactor is not None else _NetworkReactor(self)
        self.buffer_size = buffer_size
        self.implicit_tls_ports = frozenset(implicit_tls_ports)
        self.connect_error: Exception | None = None
        self.resolver = MemoryResolver()
        self.connections: list[MemoryConnection] = []
        if self.server.clock is None:
            self.server.clock = self.reactor
        clock = self.reactor
        self.cooperator = Cooperator(scheduler=lambda work: clock.callLater(0, work))
        self._pending: list[_PendingConnection] = []
        self._ports = itertools.count(49152)

    @property
    def trust_root(self) -> Certificate:
        """The CA to trust for the server's certificate: give it as ``trust_root=``."""
        return self.server.trust_root

    def endpoint(
        self, *, implicit_tls: bool = False, error: Exception | None = None
    ) -> IStreamClientEndpoint:
        """A client endpoint that connects to :attr:`server` at the next :meth:`flush`.

        :param implicit_tls: the server speaks TLS from the first byte (port
            465); the client must too (``submit()`` does on port 465).
        :param error: fail each connection attempt with this instead (e.g.
            ``twisted.internet.error.ConnectionRefusedError()``).
        """
        return _MemoryEndpoint(self, implicit_tls, error)

    def flush(self) -> bool:
        """Run due calls and move bytes until nothing moves; True if anything did.

        :raises RuntimeError: the conversation never settles.
        """
        busy = False
        for _ in range(self.max_rounds):
            self.reactor.advance(0)
            moved = self._complete_connections()
            for connection in list(self.connections):
                moved = connection.pump() or moved
            if not moved:
                return busy
            busy = True
        raise RuntimeError(f"the conversation did not settle in {self.max_rounds} rounds")

    def advance(self, seconds: float) -> None:
        """Move the fake clock ``seconds`` ahead, flushing after each timer that fires.

        Bytes travel instantly: a reply a slow server sends at second 200
        reaches the client before a timer of the client's that fires at
        second 300, however large the step.
        """
        self.flush()
        clock = self.reactor
        target = clock.seconds() + seconds
        while True:
            due = [c.getTime() for c in clock.getDelayedCalls() if c.getTime() <= target]
            if not due:
                break
            clock.advance(max(0.0, min(due) - clock.seconds()))
            self.flush()
        clock.advance(max(0.0, target - clock.seconds()))
        self.flush()

    # -- running code and checking what arrived ---------------------------------------------

    def run(self, work: Deferred[Any] | Coroutine[Any, Any, Any], *, advance: float = 0.0) -> Any:
        """Flush until ``work`` (a Deferred or a coroutine) has a result, and return it.

        The fake clock moves only if ``advance`` allows: up to ``advance``
        seconds, from one timer to the next, stopping as soon as ``work`` is
        done and every connection is closed (a QUIT the server never answers
        runs out its grace period). A failure is raised as its exception::

            receipt = fake.run(txcolombe.sendmail(..., reactor=fake.reactor))
            with pytest.raises(MailboxUnavailable):
                fake.run(txcolombe.sendmail(..., reactor=fake.reactor))

        :raises AssertionError: ``work`` has not finished by then.
        """
        deferred = work if isinstance(work, Deferred) else Deferred.fromCoroutine(work)
        box: list[Any] = []

        def keep(result: Any) -> Any:
            box.append(result)
            return result  # unchanged, for a later run() or callback

        deferred.addBoth(keep)
        self.flush()
        deadline = self.reactor.seconds() + advance
        # A result comes before the QUIT that follows it: within ``advance``,
        # also let a connection still open (a QUIT unanswered) run out.
        while not box or any(not c.closed for c in self.connections):
            due = [c.getTime() for c in self.reactor.getDelayedCalls()]
            if not due or min(due) > deadline:
                break
            self.advance(max(0.0, min(due) - self.reactor.seconds()))
        if not box:
            waiting = "" if advance == 0 else f" after {advance:g} s of fake time"
            raise AssertionError(
                f"{deferred!r} has not fired{waiting}; is something waiting on the clock?"
            )
        if isinstance(box[0], Failure):
            deferred.addErrback(lambda _: None)  # handled: raised here
            box[0].raiseException()
        return box[0]

    def react(
        self,
        main: Callable[..., Any],
        argv: Iterable[object] = (),
        *,
        advance: float = 24 * 3600.0,
    ) -> Any:
        """Like ``twisted.internet.task.react``, on the fake reactor.

        Calls ``main(reactor, *argv)`` and :meth:`run`\\ s what it returns
        (a Deferred, a coroutine or a value), letting up to ``advance`` fake
        seconds pass. Returns its result instead of exiting; raises its
        failure.
        """
        result = main(self.reactor, *argv)
        if isinstance(result, Deferred):
            return self.run(result, advance=advance)
        if inspect.iscoroutine(result):
            return self.run(result, advance=advance)
        return result

    def assert_sent(
        self,
        *,
        sender: str | None = None,
        recipients: Iterable[str] | None = None,
        subject: str | None = None,
        contains: bytes | str | None = None,
        tls: bool | None = None,
        auth: str | None = None,
    ) -> Transaction:
        """The one recorded :class:`Transaction` that matches every criterion given.

        :param sender: the reverse-path (``""`` for ``<>``).
        :param recipients: the recipients, in any order.
        :param subject: the message's ``Subject``, decoded.
        :param contains: bytes (or UTF-8 text) found in the message.
        :param tls: the transaction ran under TLS (or not).
        :param auth: the authenticated user.
        :raises AssertionError: no transaction, or several, match; the
            message lists what the server received.
        """
        wanted = set(recipients) if recipients is not None else None
        needle = contains.encode() if isinstance(contains, str) else contains

        def matches(t: Transaction) -> bool:
            return (
                (sender is None or t.sender == sender)
                and (wanted is None or set(t.recipients) == wanted)
                and (subject is None or t.message()["Subject"] == subject)
                and (needle is None or needle in t.data)
                and (tls is None or t.tls == tls)
                and (auth is None or t.auth == auth)
            )

        found = [t for t in self.server.transactions if matches(t)]
        if len(found) == 1:
            return found[0]
        criteria = {
            "sender": sender,
            "recipients": recipients,
            "subject": subject,
            "contains": contains,
            "tls": tls,
            "auth": auth,
        }
        asked = ", ".join(f"{k}={v!r}" for k, v in criteria.items() if v is not None)
        raise AssertionError(
            f"{len(found) or 'no'} message(s) match {asked or 'anything'}; "
            f"the server received: {self._summary()}"
        )

    def assert_nothing_sent(self) -> None:
        """:raises AssertionError: the server accepted a message."""
        if self.server.transactions:
            raise AssertionError(f"the server received: {self._summary()}")

    def assert_clean(self) -> None:
        """Check that nothing was left behind: every connection closed, no timer pending.

        :raises AssertionError: a connection is still open, or a delayed call
            still waits on :attr:`reactor`.
        """
        open_connections = [c for c in self.connections if not c.closed]
        timers = self.reactor.getDelayedCalls()
        if open_connections or timers:
            raise AssertionError(
                f"left behind: {len(open_connections)} open connection(s), "
                f"{len(timers)} pending timer(s) {timers!r}"
            )

    def _summary(self) -> str:
        if not self.server.transactions:
            return "nothing"
        return "; ".join(
            f"<{t.sender}> -> {', '.join(f'<{r}>' for r in t.recipients)} "
            f"({len(t.data)} octets, Subject: {t.message()['Subject']!r})"
            for t in self.server.transactions
        )

    # -- connections ----------------------------------------------------------------------------

    def _connect_tcp(self, host: str, port: int, factory: IProtocolFactory, connector: Any) -> None:
        address: _Address = (
            IPv6Address("TCP", host, port) if ":" in host else IPv4Address("TCP", host, port)
        )
        implicit = port in self.implicit_tls_ports
        self._pending.append(
            _PendingConnection(
                factory, implicit, self.connect_error, connector=connector, server_address=address
            )
        )

    def _complete_connections(self) -> bool:
        pending, self._pending = self._pending, []
        for attempt in pending:
            self._complete(attempt)
        return bool(pending)

    def _failed(self, attempt: _PendingConnection, error: Exception) -> None:
        if attempt.deferred is not None:
            attempt.deferred.errback(error)
        else:
            reason = Failure(error)  # type: ignore[no-untyped-call]
            cast(Any, attempt.factory).clientConnectionFailed(attempt.connector, reason)

    def _complete(self, attempt: _PendingConnection) -> None:
        if attempt.connector is not None and attempt.connector.stoppedConnecting:
            return  # cancelled (e.g. happy eyeballs connected elsewhere)
        if attempt.error is not None:
            self._failed(attempt, attempt.error)
            return
        port = 465 if attempt.implicit_tls else 25
        server_address = attempt.server_address or IPv4Address("TCP", "192.0.2.25", port)
        client_address: _Address
        if isinstance(server_address, IPv6Address):
            client_address = IPv6Address("TCP", "2001:db8::1", next(self._ports))
        else:
            client_address = IPv4Address("TCP", "192.0.2.1", next(self._ports))
        factory = attempt.factory
        if isinstance(factory, TLSMemoryBIOFactory):
            # A TLS wrapper made without a clock (wrapClientTLS's default)
            # would flush its writes on the global reactor: use ours.
            factory._clock = self.reactor
        client = factory.buildProtocol(server_address)
        if client is None:
            self._failed(attempt, ConnectionAborted("the factory built no protocol"))
            return
        server = self.server.buildProtocol(client_address)
        server.implicit_tls = attempt.implicit_tls
        connection = MemoryConnection(self, client, server, client_address, server_address)
        self.connections.append(connection)
        server.makeConnection(connection.server)  # type: ignore[no-untyped-call]
        client.makeConnection(connection.client)
        if attempt.deferred is not None:
            attempt.deferred.callback(client)


# -- for trial (and unittest) ---------------------------------------------------------------


class SMTPTestMixin:
    """Give each test of a ``TestCase`` an in-memory SMTP server: ``self.smtp``.

    Put it before the ``TestCase`` (trial's or unittest's)::

        class SignupTests(SMTPTestMixin, TestCase):
            def make_smtp_server(self):
                return MemorySMTPServer(users={"alice": "s3cret"})

            def test_welcome_mail(self):
                d = send_welcome("bob@example.org", reactor=self.smtp.reactor)
                self.smtpResult(d)
                self.assertMailSent(recipients=["bob@example.org"], subject="Welcome")

    :ivar smtp: a fresh :class:`MemorySMTP` for each test, made in ``setUp``
        from :meth:`make_smtp_server`.
    """

    smtp: MemorySMTP

    def make_smtp_server(self) -> MemorySMTPServer:
        """The server for each test; override to configure it."""
        return MemorySMTPServer()

    def setUp(self) -> Any:
        self.smtp = MemorySMTP(self.make_smtp_server())
        return cast(Any, super()).setUp()

    def _fail(self, error: AssertionError) -> AssertionError:
        failure = getattr(self, "failureException", AssertionError)
        return cast(AssertionError, failure(str(error)))

    def smtpResult(
        self, work: Deferred[Any] | Coroutine[Any, Any, Any], advance: float = 0.0
    ) -> Any:
        """:meth:`MemorySMTP.run`: the result of ``work``, once the conversation is over."""
        try:
            return self.smtp.run(work, advance=advance)
        except AssertionError as error:
            raise self._fail(error) from None

    def assertMailSent(self, **criteria: Any) -> Transaction:
        """:meth:`MemorySMTP.assert_sent`: the one message matching ``criteria``."""
        try:
            return self.smtp.assert_sent(**criteria)
        except AssertionError as error:
            raise self._fail(error) from None

    def assertNoMailSent(self) -> None:
        """Fail if the server accepted any message."""
        try:
            self.smtp.assert_nothing_sent()
        except AssertionError as error:
            raise self._fail(error) from None

    def assertSMTPError(
        self,
        work: Deferred[Any] | Coroutine[Any, Any, Any],
        error_type: type[SMTPError] = SMTPError,
        *,
        code: int | None = None,
        advance: float = 0.0,
    ) -> SMTPError:
        """Run ``work`` and check that it fails with ``error_type`` (and ``code``).

        :returns: the error, for more checks.
        """
        try:
            result = self.smtp.run(work, advance=advance)
        except error_type as error:
            if code is not None and error.code != code:
                raise self._fail(
                    AssertionError(f"expected reply code {code}, got {error.code}: {error}")
                ) from None
            return error
        except AssertionError as error:
            raise self._fail(error) from None
        raise self._fail(
            AssertionError(f"expected {error_type.__name__}, got a result: {result!r}")
        )

    def assertSMTPClean(self) -> None:
        """:meth:`MemorySMTP.assert_clean`: no open connection, no pending timer."""
        try:
            self.smtp.assert_clean()
        except AssertionError as error:
            raise self._fail(error) from None
