"""The Twisted server protocol: a thin driver of :class:`~txcolombe.server.machine.ServerMachine`.

It moves bytes between the transport and the machine, starts TLS when the
machine says so, asks its :class:`ServerHandler` to check credentials and to
store messages, stops reading while an answer is awaited and much pipelined
input is buffered, and runs an idle timer. Every rule of the conversation is
the machine's.

A handler that also has ``open_message`` (:class:`StreamingHandler`) gets
large bodies as they arrive, so a connection holds at most
:data:`BODY_CHUNK` octets of a message; ``check_mail``
(:class:`MailChecker`) may refuse a MAIL; ``rejected`` (:class:`RejectionCounter`)
hears of every refusal, which is also logged here in Postfix's
``NOQUEUE: reject:`` form. The factory limits concurrent connections (in all
and per client address) and can close every session with a 421
(:meth:`SMTPServerFactory.close_sessions`).
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import socket
from collections import Counter
from typing import Any
from typing import Protocol as TypingProtocol

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IOpenSSLServerConnectionCreator,
    IReactorTime,
    ISSLTransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from txcolombe.codec.address import Mailbox
from txcolombe.codec.reply import Reply
from txcolombe.server.machine import (
    AuthRequest,
    BodyData,
    Close,
    DataAborted,
    Delay,
    MessageReceived,
    Rejected,
    ServerConfig,
    ServerEnvelope,
    ServerMachine,
    ServerStartTLS,
)

log = Logger(namespace="txcolombe.server")

_TEMPFAIL = Reply.of(451, "4.3.0 Error: local error in processing, try again later")

#: While an answer is awaited, read on until this much input is buffered;
#: pausing the transport for every message would cost two system calls each.
MAX_PENDING_INPUT = 64 * 1024

#: Octets of a message body a connection holds before handing them to a
#: streaming handler: smaller messages are stored in one piece.
BODY_CHUNK = 64 * 1024

#: The client address of a peer that has none (a UNIX socket's): not an IP
#: address, so that it never passes for 127.0.0.1, which a relay trusts by
#: default, and matches no trusted network.
UNIX_CLIENT = "unix"

_SHUTDOWN = Reply.of(421, "4.3.2 Service shutting down, closing transmission channel")


class ServerHandler(TypingProtocol):
    """What the server asks of the application."""

    def relay_allowed(self, client_address: str) -> bool:
        """May this client relay without AUTH?"""

    def check_password(self, username: str, password: str) -> Deferred[bool]:
        """Are these credentials right?"""

    def store(self, envelope: ServerEnvelope, data: bytes) -> Deferred[Reply]:
        """Take responsibility for the message; the reply (250 once it is durable)."""


class IncomingMessage(TypingProtocol):
    """A message being received, written out as it comes."""

    def write(self, data: bytes) -> None:
        """The next part of the body."""

    def finish(self) -> Deferred[Reply]:
        """The body is complete: the reply (250 once it is durable)."""

    def abort(self) -> None:
        """The message will not be completed: forget it."""


class StreamingHandler(ServerHandler, TypingProtocol):
    """A handler that takes large messages as they arrive."""

    def open_message(self, envelope: ServerEnvelope) -> IncomingMessage:
        """Start storing a message; its body follows."""


class MailChecker(TypingProtocol):
    """A handler that may refuse a MAIL before the transaction starts."""

    def check_mail(self, client_address: str, sender: Mailbox | None) -> Reply | None:
        """A refusal (e.g. ``452 4.3.1`` when the spool is short of space), or None."""


class RejectionCounter(TypingProtocol):
    """A handler that hears of every refusal (to count them)."""

    def rejected(self, client_address: str, event: Rejected) -> None:
        """A policy refusal was given."""


class SMTPServerProtocol(Protocol):
    """One SMTP server connection."""

    def __init__(
        self,
        config: ServerConfig,
        handler: ServerHandler,
        *,
        reactor: IReactorTime,
        tls: IOpenSSLServerConnectionCreator | None = None,
        idle_timeout: float = 300.0,
        factory: SMTPServerFactory | None = None,
    ) -> None:
        self.config = config
        self.handler = handler
        self.server_factory = factory
        self.machine: ServerMachine | None = None
        self.client_address = ""
        self._incoming: IncomingMessage | None = None
        self._sleep: IDelayedCall | None = None
        self._tls_pending = False
        self._messages = 0
        self._reactor = reactor
        self._tls = tls
        self._idle_timeout = idle_timeout
        self._timer: IDelayedCall | None = None
        self._active_at = 0.0
        self._paused = False
        self._gone = False
        #: The plain TCP socket while replies may be sent on it directly.
        self._direct: socket.socket | None = None

    def connectionMade(self) -> None:
        transport: Any = self.transport
        no_delay = getattr(transport, "setTcpNoDelay", None)
        if no_delay is not None:
            with contextlib.suppress(OSError):  # not TCP (a UNIX socket)
                no_delay(True)
        address = self.client_address = _client_address(transport.getPeer())
        implicit = ISSLTransport.providedBy(transport)
        handle = getattr(transport, "getHandle", lambda: None)()
        if not implicit and isinstance(handle, socket.socket):
            self._direct = handle
        relay_allowed = self.handler.relay_allowed(address)
        factory = self.server_factory
        refusal = None if factory is None else factory.admit(self, address, relay_allowed)
        if refusal is not None:
            log.info(
                "NOQUEUE: reject: CONNECT from [{client}]: {reply}",
                client=address,
                reply=_reply_text(refusal),
            )
            self._count_rejection(Rejected("CONNECT", refusal, None, None, None))
            self._gone = True
            self._write(refusal.to_bytes())
            transport.loseConnection()
            return
        log.info("connect from [{client}]", client=address)
        check = getattr(self.handler, "check_mail", None)
        streaming = getattr(self.handler, "open_message", None) is not None
        self.machine = ServerMachine(
            self.config,
            client_address=address,
            relay_allowed=relay_allowed,
            tls=implicit,
            body_chunk=BODY_CHUNK if streaming else None,
            mail_check=None if check is None else functools.partial(check, address),
        )
        self._tls_pending = implicit
        self._active_at = self._reactor.seconds()
        self._timer = self._reactor.callLater(self._idle_timeout, self._check_idle)
        self._process()

    def dataReceived(self, data: bytes) -> None:
        if self.machine is None:
            return
        if self._tls_pending:
            self._tls_established()
        self._active_at = self._reactor.seconds()
        self.machine.receive_data(data)
        self._process()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._gone = True
        self._cancel_timer()
        if self._sleep is not None and self._sleep.active():
            self._sleep.cancel()
        self._sleep = None
        self._abort_incoming()
        if self.server_factory is not None:
            self.server_factory.release(self)
        if self.machine is not None:
            self.machine.connection_lost()
            log.info(
                "disconnect from [{client}] messages={messages} errors={errors}",
                client=self.client_address,
                messages=self._messages,
                errors=self.machine.errors,
            )

    def shutdown(self) -> None:
        """The server is stopping: ``421 4.3.2`` and close (after the reply
        to a message being stored)."""
        if self.machine is None or self._gone:
            return
        self.machine.shutdown(_SHUTDOWN)
        self._process()

    def _tls_established(self) -> None:
        """The first bytes under TLS: the handshake is done; note and log
        the protocol and cipher (for the Received header, as Postfix does)."""
        self._tls_pending = False
        machine = self.machine
        handle: Any = getattr(self.transport, "getHandle", lambda: None)()
        try:
            version = handle.get_protocol_version_name()
            cipher = handle.get_cipher_name()
            bits = handle.get_cipher_bits()
        except AttributeError:
            return  # not an OpenSSL connection (a test transport)
        if machine is None or not isinstance(cipher, str):
            return
        machine.tls_details = f"{version} with cipher {cipher} ({bits}/{bits} bits)"
        log.info(
            "TLS connection established from [{client}]: {tls}",
            client=self.client_address,
            tls=machine.tls_details,
        )

    # -- the machine's events --------------------------------------------------------

    def _process(self) -> None:
        machine = self.machine
        assert machine is not None
        while True:
            data = machine.data_to_send()
            if data and not self._gone:
                self._write(data)
            event = machine.next_event()
            if event is None:
                break
            self._on_event(event)
        self._flow()

    def _on_event(self, event: object) -> None:
        machine = self.machine
        assert machine is not None
        if isinstance(event, ServerStartTLS):
            self._direct = None
            if self._tls is None or self._gone:
                self.transport.loseConnection()  # type: ignore[union-attr]
                return
            self.transport.startTLS(self._tls)  # type: ignore[union-attr]
            self._tls_pending = True
            machine.tls_started()
        elif isinstance(event, AuthRequest):
            d: Deferred[bool] = maybeDeferred(
                self.handler.check_password, event.username, event.password
            )
            d.addErrback(self._auth_error)
            d.addCallback(self._auth_done, event.username)
        elif isinstance(event, BodyData):
            self._body_data(event)
        elif isinstance(event, MessageReceived):
            incoming, self._incoming = self._incoming, None
            if incoming is not None:
                stored: Deferred[Reply] = maybeDeferred(self._finish, incoming, event.data)
            else:
                stored = maybeDeferred(self.handler.store, event.envelope, event.data)
            stored.addErrback(self._store_error)
            stored.addCallback(self._stored)
        elif isinstance(event, DataAborted):
            self._abort_incoming()
        elif isinstance(event, Delay):
            self._sleep = self._reactor.callLater(event.seconds, self._wake)
        elif isinstance(event, Rejected):
            self._log_rejection(event)
        elif isinstance(event, Close):
            self._cancel_timer()
            if not self._gone:
                self.transport.loseConnection()  # type: ignore[union-attr]

    def _write(self, data: bytes) -> None:
        """Send a reply. On plain TCP, straight to the socket while Twisted's
        buffer is empty: a reply is small, and the usual way (buffer, ask the
        reactor for writability, write on its next turn) costs two system
        calls and a turn of the reactor each. The first reply the socket does
        not take whole goes, with all after it, through the transport."""
        direct = self._direct
        if direct is not None:
            try:
                sent = direct.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                sent = 0  # the transport will find out and close
            if sent == len(data):
                return
            data = data[sent:]
            self._direct = None
        self.transport.write(data)  # type: ignore[union-attr]

    def _body_data(self, event: BodyData) -> None:
        """A part of a large body: to the handler's incoming message, opened
        with the first part."""
        incoming = self._incoming
        if incoming is None:
            handler: Any = self.handler
            incoming = self._incoming = handler.open_message(event.envelope)
        incoming.write(event.data)

    @staticmethod
    def _finish(incoming: IncomingMessage, rest: bytes) -> Deferred[Reply]:
        if rest:
            incoming.write(rest)
        return incoming.finish()

    def _abort_incoming(self) -> None:
        incoming, self._incoming = self._incoming, None
        if incoming is not None:
            incoming.abort()

    def _wake(self) -> None:
        self._sleep = None
        if self._gone or self.machine is None:
            return
        self._active_at = self._reactor.seconds()
        self.machine.wake()
        self._process()

    def _log_rejection(self, event: Rejected) -> None:
        """Postfix's ``NOQUEUE: reject:`` line, and the handler's count."""
        log.info(
            "NOQUEUE: reject: {stage} from [{client}]: {reply}; from=<{sender}> to=<{rcpt}>"
            " helo=<{helo}>",
            stage=event.stage,
            client=self.client_address,
            reply=_reply_text(event.reply),
            sender="" if event.sender is None else str(event.sender),
            rcpt="" if event.recipient is None else str(event.recipient),
            helo=event.helo or "",
        )
        self._count_rejection(event)

    def _count_rejection(self, event: Rejected) -> None:
        rejected = getattr(self.handler, "rejected", None)
        if rejected is not None:
            rejected(self.client_address, event)

    def _auth_error(self, failure: Failure) -> bool:
        log.failure("checking credentials", failure)
        return False

    def _auth_done(self, ok: bool, username: str) -> None:
        if self._gone or self.machine is None:
            return
        log.info(
            "AUTH {result} user={user} client={client}",
            result="ok" if ok else "failed",
            user=username,
            client=self.machine.client_address,
        )
        self._active_at = self._reactor.seconds()
        self.machine.auth_result(bool(ok))
        self._process()

    def _store_error(self, failure: Failure) -> Reply:
        if isinstance(failure.value, OSError):
            # The spool's own trouble (a full disk...): one line, no traceback.
            log.error("cannot store a message: {error}", error=failure.value)
        else:
            log.failure("storing a message", failure)
        return _TEMPFAIL

    def _stored(self, reply: Reply) -> None:
        if reply.positive:
            self._messages += 1
        if self._gone or self.machine is None:
            return
        self._active_at = self._reactor.seconds()
        self.machine.message_result(reply)
        self._process()

    # -- flow control and the idle timer -------------------------------------------------

    def _flow(self) -> None:
        """Stop reading while an answer is awaited and much input is buffered."""
        machine = self.machine
        if machine is None or self._gone:
            return
        pause = machine.waiting and machine.buffered > MAX_PENDING_INPUT
        if pause != self._paused:
            self._paused = pause
            transport: Any = self.transport
            if pause:
                transport.pauseProducing()
            else:
                transport.resumeProducing()

    def _check_idle(self) -> None:
        """The idle timer: one per connection, rescheduled rather than reset
        on every command. Time spent waiting for our own answer never counts."""
        self._timer = None
        machine = self.machine
        if machine is None or self._gone:
            return
        now = self._reactor.seconds()
        if machine.waiting:
            self._active_at = now
        left = self._active_at + self._idle_timeout - now
        if left > 0:
            self._timer = self._reactor.callLater(left, self._check_idle)
            return
        machine.timed_out()
        self._process()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


class SMTPServerFactory(Factory):
    """Builds :class:`SMTPServerProtocol` instances sharing one config and handler."""

    noisy = False

    def __init__(
        self,
        config: ServerConfig,
        handler: ServerHandler,
        *,
        reactor: IReactorTime | None = None,
        tls: IOpenSSLServerConnectionCreator | None = None,
        idle_timeout: float = 300.0,
    ) -> None:
        if reactor is None:
            # client.options.default_reactor() is the helper, but the server
            # layer may not import the client's: the same two lines.
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.config = config
        self.handler = handler
        self.reactor: IReactorTime = reactor
        self.tls = tls
        self.idle_timeout = idle_timeout
        #: The open sessions, and how many come from each address.
        self.sessions: set[SMTPServerProtocol] = set()
        self._per_client: Counter[str] = Counter()
        self._counted: dict[SMTPServerProtocol, str] = {}

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        return SMTPServerProtocol(
            self.config,
            self.handler,
            reactor=self.reactor,
            tls=self.tls,
            idle_timeout=self.idle_timeout,
            factory=self,
        )

    def admit(self, session: SMTPServerProtocol, client_address: str, exempt: bool) -> Reply | None:
        """Count a new session in, or the 421 that refuses it: over
        ``max_connections`` in all, or ``max_connections_per_client`` from
        its address (clients that may relay are exempt from the latter, as
        Postfix's smtpd_client_event_limit_exceptions = $mynetworks)."""
        cfg = self.config
        if len(self.sessions) >= cfg.max_connections:
            return Reply.of(421, f"4.7.0 {cfg.hostname} Error: too many connections")
        if not exempt and self._per_client[client_address] >= cfg.max_connections_per_client:
            return Reply.of(
                421, f"4.7.0 {cfg.hostname} Error: too many connections from {client_address}"
            )
        self.sessions.add(session)
        self._per_client[client_address] += 1
        self._counted[session] = client_address
        return None

    def release(self, session: SMTPServerProtocol) -> None:
        """A session admitted by :meth:`admit` is over."""
        self.sessions.discard(session)
        address = self._counted.pop(session, None)
        if address is not None:
            self._per_client[address] -= 1
            if self._per_client[address] <= 0:
                del self._per_client[address]

    def close_sessions(self) -> None:
        """Send ``421 4.3.2`` to every open session and close it (a session
        whose message is being stored gets its reply first)."""
        for session in list(self.sessions):
            session.shutdown()


def _reply_text(reply: Reply) -> str:
    """A reply on one log line: code, enhanced status and text."""
    return f"{reply.code} {' '.join(reply.lines)}"


def _client_address(peer: object) -> str:
    """The client's IP address (normalised), or :data:`UNIX_CLIENT` for a peer without one."""
    host = getattr(peer, "host", None)
    return _normal_address(host) if isinstance(host, str) else UNIX_CLIENT


@functools.lru_cache(maxsize=1024)
def _normal_address(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host.split("%")[0]))
    except ValueError:
        return host
