"""The in-memory SMTP server: :mod:`txcolombe.server.machine`, driven for tests.

Every rule of the conversation (commands, AUTH, DATA and BDAT decoding) is
the server machine's, the same that the relay's intake runs. What this
module adds is what a test needs: a machine configured to record rather
than judge (``lenient``, the extensions a test asks for, no error limits),
credentials from a dict, a record of each message as a :class:`Transaction`,
and scripting: each command, the greeting and the end of each message are
held by the machine (``intercept``) until the scripts have been asked.
"""

from __future__ import annotations

import email
import email.message
import email.policy
import itertools
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import cast

from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IOpenSSLServerConnectionCreator,
    IReactorTime,
    ITCPTransport,
    ITLSTransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.ssl import Certificate
from twisted.python.failure import Failure

from txcolombe.client.options import default_reactor
from txcolombe.codec.reply import Reply
from txcolombe.server.events import (
    END_OF_DATA,
    GREETING,
    AuthRequest,
    Close,
    CommandRead,
    MessageReceived,
    ServerStartTLS,
)
from txcolombe.server.machine import ServerConfig, ServerMachine
from txcolombe.testing.ca import ServerTLS, credentials

__all__ = [
    "DEFAULT_EXTENSIONS",
    "DEFAULT_HOSTNAMES",
    "END_OF_DATA",
    "GREETING",
    "MemorySMTPServer",
    "MemoryServerProtocol",
    "Responder",
    "Response",
    "Transaction",
]

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


@dataclass(frozen=True)
class Transaction:
    """One message the server accepted.

    :ivar sender: the reverse-path without angle brackets (``""`` for ``<>``).
    :ivar recipients: each forward-path without angle brackets, in order.
    :ivar data: the message exactly as received, dot-unstuffed, without the
        final ``.CRLF`` (so it ends with the CRLF of its last line); with
        BDAT, the chunks joined.
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


class MemorySMTPServer(Factory):
    """An SMTP server for tests: a protocol factory that records what it receives.

    Use it with :class:`~txcolombe.testing.MemorySMTP` (or with any
    transport: it is an ordinary Twisted factory, though STARTTLS needs a
    transport with ``startTLS``).

    :param name: the server's name in its greeting and EHLO reply.
    :param extensions: the EHLO keywords with their parameters. STARTTLS is
        advertised only before TLS; AUTH only under TLS unless
        ``auth_without_tls``. The server accepts what it advertises: add
        ``"CHUNKING"`` for BDAT, ``"DSN"``, ``"BINARYMIME"``...
    :param users: user name → password, for AUTH PLAIN and LOGIN.
    :param require_auth: answer MAIL with 530 until the client authenticates.
    :param hostnames: the names and addresses the TLS certificate is valid for.
    :param clock: where slow replies wait; :class:`~txcolombe.testing.MemorySMTP`
        sets its reactor here.

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
        self.connections: list[MemoryServerProtocol] = []
        ca_pem, certificate_pem, key_pem = credentials(tuple(hostnames))
        self.ca_pem = ca_pem
        self.trust_root = Certificate.loadPEM(ca_pem)
        self.tls_options: IOpenSSLServerConnectionCreator = ServerTLS(certificate_pem, key_pem)
        self._rules: list[_Rule] = []
        self._queue_ids = itertools.count(1)

    def config(self) -> ServerConfig:
        """The server machine's configuration, from the attributes as they are now."""
        unlimited = sys.maxsize
        return ServerConfig(
            hostname=self.name,
            software="txcolombe.testing",
            extensions=self.extensions,
            ehlo_greeting="{hostname} greets {helo}",
            auth_required=self.require_auth,
            auth_without_tls=self.auth_without_tls,
            lenient=True,
            max_recipients=unlimited,
            max_errors=unlimited,
            soft_error_limit=unlimited,
            error_sleep=0.0,
        )

    def buildProtocol(self, addr: IAddress | None) -> MemoryServerProtocol:
        protocol = MemoryServerProtocol(self)
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


class MemoryServerProtocol(Protocol):
    """One connection to a :class:`MemorySMTPServer`: a driver of its
    :class:`~txcolombe.server.machine.ServerMachine` (``intercept`` on).

    :ivar machine: the connection's server machine (from ``connectionMade``).
    :ivar closed: the connection is gone.
    :ivar implicit_tls: start TLS before the greeting (set before connecting).
    """

    def __init__(self, server: MemorySMTPServer) -> None:
        self.server = server
        self.machine: ServerMachine | None = None
        self.closed = False
        self.implicit_tls = False
        self._closing = False
        self._timer: IDelayedCall | None = None

    @property
    def tls(self) -> bool:
        """TLS is active (after STARTTLS, or implicit)."""
        return self.machine is not None and self.machine.tls

    @property
    def helo(self) -> str | None:
        """The name from the last EHLO/HELO, or None."""
        return None if self.machine is None else self.machine.helo

    @property
    def authenticated(self) -> str | None:
        """The user name after a successful AUTH, or None."""
        return None if self.machine is None else self.machine.authenticated

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
        assert self.transport is not None
        if self.implicit_tls:
            cast(ITLSTransport, self.transport).startTLS(self.server.tls_options)
        peer = self.transport.getPeer()
        self.machine = ServerMachine(
            self.server.config(),
            client_address=str(getattr(peer, "host", "")),
            relay_allowed=True,
            tls=self.implicit_tls,
            intercept=True,
        )
        self._process()

    def dataReceived(self, data: bytes) -> None:
        if self.machine is None or self._closing or self.closed:
            return
        self.machine.receive_data(data)
        self._process()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed = True
        if self.machine is not None:
            self.machine.connection_lost()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    # -- the machine's events --------------------------------------------------------------

    def _process(self) -> None:
        machine = self.machine
        assert machine is not None
        while not (self.closed or self._closing):
            data = machine.data_to_send()
            if data and self.transport is not None:
                self.transport.write(data)
            event = machine.next_event()
            if event is None:
                return
            if isinstance(event, CommandRead):
                self._command(event)
            elif isinstance(event, ServerStartTLS):
                cast(ITLSTransport, self.transport).startTLS(self.server.tls_options)
                machine.tls_started()
            elif isinstance(event, AuthRequest):
                users = self.server.users
                machine.auth_result(users.get(event.username, None) == event.password)
            elif isinstance(event, MessageReceived):
                machine.message_result(self._record(event))
            elif isinstance(event, Close):
                self.close()
            # Rejected is for logs; DataAborted, BodyData and Delay do not
            # happen with this configuration (no body_chunk, no error sleep).

    def _command(self, event: CommandRead) -> None:
        """Ask the scripts; answer now, later, or never."""
        if event.verb not in (GREETING, END_OF_DATA):
            self.server.commands.append(event.line)
        response = self.server._scripted(event.verb, event.argument)
        if response is None:
            assert self.machine is not None
            self.machine.proceed()
        elif response.reply is None and not (response.close or response.abort):
            return  # hang: never answer, read nothing more
        elif response.delay > 0:
            clock = self.server.clock
            if clock is None:
                clock = cast(IReactorTime, default_reactor())
            self._timer = clock.callLater(response.delay, self._delayed, event, response)
        else:
            self._answer(event, response)

    def _delayed(self, event: CommandRead, response: Response) -> None:
        self._timer = None
        self._answer(event, response)
        self._process()

    def _answer(self, event: CommandRead, response: Response) -> None:
        """Give the scripted reply; the caller then processes what follows,
        unless the connection is to be closed: then only the reply is written."""
        machine = self.machine
        if self.closed or machine is None:
            return
        reply = response.reply
        if reply is not None:
            data = reply.to_bytes() if isinstance(reply, Reply) else reply
            if event.verb == END_OF_DATA and not response.positive:
                self.server._next_queue_id()  # the refused message had its id
            machine.override(data, effective=response.positive)
        if response.abort or response.close:
            pending = machine.data_to_send()
            if pending and self.transport is not None:
                self.transport.write(pending)
            if response.abort:
                self.abort()
            else:
                self.close()

    def _record(self, event: MessageReceived) -> Reply:
        envelope = event.envelope
        queue_id = self.server._next_queue_id()
        sender, *recipients = envelope.paths
        self.server.transactions.append(
            Transaction(
                sender=sender,
                recipients=tuple(recipients),
                data=event.data,
                mail_parameters=envelope.mail_parameters,
                rcpt_parameters=envelope.rcpt_parameters,
                tls=envelope.tls,
                auth=envelope.authenticated,
                helo=envelope.helo,
                queue_id=queue_id,
            )
        )
        return Reply.of(250, f"2.0.0 Ok: queued as {queue_id}")
