"""The Twisted server protocol: a thin driver of :class:`~txcolombe.server.machine.ServerMachine`.

It moves bytes between the transport and the machine, starts TLS when the
machine says so, asks its :class:`ServerHandler` to check credentials and to
store messages, stops reading while an answer is awaited and much pipelined
input is buffered, and runs an idle timer. Every rule of the conversation is
the machine's.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import socket
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

from txcolombe.reply import Reply
from txcolombe.server.machine import (
    AuthRequest,
    Close,
    Envelope,
    MessageReceived,
    ServerConfig,
    ServerMachine,
    StartTLS,
)

log = Logger(namespace="txcolombe.server")

_TEMPFAIL = Reply.of(451, "4.3.0 Error: local error in processing, try again later")

#: While an answer is awaited, read on until this much input is buffered;
#: pausing the transport for every message would cost two system calls each.
MAX_PENDING_INPUT = 64 * 1024


class ServerHandler(TypingProtocol):
    """What the server asks of the application."""

    def relay_allowed(self, client_address: str) -> bool:
        """May this client relay without AUTH?"""

    def check_password(self, username: str, password: str) -> Deferred[bool]:
        """Are these credentials right?"""

    def store(self, envelope: Envelope, data: bytes) -> Deferred[Reply]:
        """Take responsibility for the message; the reply (250 once it is durable)."""


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
    ) -> None:
        self.config = config
        self.handler = handler
        self.machine: ServerMachine | None = None
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
        address = _client_address(transport.getPeer())
        implicit = ISSLTransport.providedBy(transport)
        handle = getattr(transport, "getHandle", lambda: None)()
        if not implicit and isinstance(handle, socket.socket):
            self._direct = handle
        self.machine = ServerMachine(
            self.config,
            client_address=address,
            relay_allowed=self.handler.relay_allowed(address),
            tls=implicit,
        )
        self._active_at = self._reactor.seconds()
        self._timer = self._reactor.callLater(self._idle_timeout, self._check_idle)
        self._process()

    def dataReceived(self, data: bytes) -> None:
        if self.machine is None:
            return
        self._active_at = self._reactor.seconds()
        self.machine.receive_data(data)
        self._process()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._gone = True
        self._cancel_timer()
        if self.machine is not None:
            self.machine.connection_lost()

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
        if isinstance(event, StartTLS):
            self._direct = None
            if self._tls is None or self._gone:
                self.transport.loseConnection()  # type: ignore[union-attr]
                return
            self.transport.startTLS(self._tls)  # type: ignore[union-attr]
            machine.tls_started()
        elif isinstance(event, AuthRequest):
            d: Deferred[bool] = maybeDeferred(
                self.handler.check_password, event.username, event.password
            )
            d.addErrback(self._auth_error)
            d.addCallback(self._auth_done, event.username)
        elif isinstance(event, MessageReceived):
            stored: Deferred[Reply] = maybeDeferred(self.handler.store, event.envelope, event.data)
            stored.addErrback(self._store_error)
            stored.addCallback(self._stored)
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
        log.failure("storing a message", failure)
        return _TEMPFAIL

    def _stored(self, reply: Reply) -> None:
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
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.config = config
        self.handler = handler
        self.reactor: IReactorTime = reactor
        self.tls = tls
        self.idle_timeout = idle_timeout

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        return SMTPServerProtocol(
            self.config,
            self.handler,
            reactor=self.reactor,
            tls=self.tls,
            idle_timeout=self.idle_timeout,
        )


def _client_address(peer: object) -> str:
    host = getattr(peer, "host", None)
    return _normal_address(host if isinstance(host, str) else None)


@functools.lru_cache(maxsize=1024)
def _normal_address(host: str | None) -> str:
    try:
        return str(ipaddress.ip_address(str(host).split("%")[0]))
    except ValueError:
        return "127.0.0.1" if host is None else str(host)
