"""The Twisted protocol: a thin driver of :class:`~txcolombe.client.machine.ClientMachine`.

It moves bytes between the transport and the machine, upgrades the
transport with ``startTLS`` when the machine asks, streams the body from an
``IBodyProducer`` with the transport's backpressure, and runs one timer for
whatever step the machine is waiting on (RFC 5321 §4.5.3.2). Everything
else, including every decision, is the machine's.
"""

from __future__ import annotations

import functools
import ipaddress
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

from OpenSSL import SSL
from service_identity import CertificateError, VerificationError
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IProducer,
    IReactorTime,
)
from twisted.internet.protocol import Protocol
from twisted.internet.task import Cooperator
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from txcolombe.client.body import ReadProducer, SmallBodyProducer
from txcolombe.client.conversation import log_conversation
from txcolombe.client.envelope import Envelope
from txcolombe.client.events import (
    BodyRefused,
    BodyWanted,
    Closed,
    Event,
    Handle,
    Ready,
    SessionFailed,
    StartTLS,
    TransactionDone,
    TransactionRefused,
)
from txcolombe.client.machine import ClientMachine, TLSMode, Trace
from txcolombe.client.options import DEFAULT_TIMEOUTS, Timeouts
from txcolombe.client.receipt import Receipt, TLSInfo
from txcolombe.client.states import State
from txcolombe.client.writer import close_now, immediate_writer, plain_tcp
from txcolombe.codec.address import address_literal
from txcolombe.codec.errors import (
    ConnectionLost,
    InvalidBody,
    SMTPError,
    Step,
    TLSFailure,
    UsageError,
)

log = Logger(namespace="txcolombe")

#: Seconds a plain TCP connection waits, after the reply to QUIT, for the
#: server to close it before closing it itself.
CLOSE_GRACE = 2.0


@implementer(IConsumer)
class _BodyConsumer:
    """Where the body producer writes: through the encoder to the transport."""

    def __init__(self, protocol: SMTPClientProtocol) -> None:
        self._protocol = protocol
        self.closed = False

    def write(self, data: bytes) -> None:
        if not self.closed:
            self._protocol._body_chunk(data)

    # The protocol registers the body producer with the transport itself, so
    # a producer that also registers with its consumer changes nothing.
    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass


_CLEAN_CLOSE = Failure(ConnectionDone())  # type: ignore[no-untyped-call]

#: Makes the connection's machine once connected, given the address literal
#: of our end (the EHLO name when none is configured) and the trace to use.
MachineFactory = Callable[[str, Trace | None], ClientMachine]

#: Octets a TCP transport may hand the kernel in one send.
_SEND_LIMIT = 1 << 20

#: Trace lines kept before they are logged even mid-conversation.
_TRACE_LINES = 64

#: The machine's states in which the conversation so far is logged: nothing
#: is under way (set up and idle, or over).
_TRACE_AT = (State.READY, State.CLOSED)


@implementer(IHandshakeListener)
class SMTPClientProtocol(Protocol):
    """One SMTP client connection.

    :param new_machine: makes the :class:`ClientMachine` when the
        connection is made (:data:`MachineFactory`).
    :param trace: log the conversation at debug level (the machine's trace).
    :ivar ready: fires with this protocol once the session is set up
        (greeting, EHLO, STARTTLS, AUTH), or fails with an :class:`SMTPError`.
    :ivar closed: fires when the connection is gone.
    """

    def __init__(
        self,
        new_machine: MachineFactory,
        *,
        reactor: IReactorTime,
        timeouts: Timeouts = DEFAULT_TIMEOUTS,
        tls: IOpenSSLClientConnectionCreator | None = None,
        peer: str = "",
        trace: bool = True,
    ) -> None:
        self._new_machine = new_machine
        self._machine: ClientMachine | None = None
        self.peer = peer
        self._trace: list[tuple[str, str]] = []
        self._tracing = trace
        self._write: Callable[[bytes], None] | None = None
        self.ready: Deferred[SMTPClientProtocol] = Deferred()
        self.closed: Deferred[None] = Deferred()
        self.tls_info: TLSInfo | None = None
        self.reactor = reactor
        self._timeouts = timeouts
        self._tls = tls
        self._timer: IDelayedCall | None = None
        self._closing: IDelayedCall | None = None  # CLOSE_GRACE, after 221
        self._timer_step: Step | None = None
        self._timer_replies = 0
        self._sends: dict[Handle, _Send] = {}  # by the machine's handle
        self._body: IBodyProducer | None = None
        self._consumer: _BodyConsumer | None = None
        self._recording: _Spool | None = None  # a body that will be sent again
        self._failure: SMTPError | None = None
        self._gone = False

    # -- transport callbacks ---------------------------------------------------

    def connectionMade(self) -> None:
        no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if no_delay is not None:
            no_delay(True)
        if isinstance(getattr(self.transport, "SEND_LIMIT", None), int):
            # A TCP transport sends at most SEND_LIMIT octets a reactor turn
            # (128 KiB; the limit is for Windows): a body leaves in fewer,
            # larger sends.
            self._transport.SEND_LIMIT = _SEND_LIMIT
        self._write = immediate_writer(self._transport)
        trace = self._trace_line if self._tracing else None
        self._machine = self._new_machine(_local_literal(self.transport), trace)
        self._process()

    @property
    def machine(self) -> ClientMachine:
        """The connection's state machine (there is none before the connection)."""
        if self._machine is None:
            raise UsageError("the connection is not made yet")
        return self._machine

    def dataReceived(self, data: bytes) -> None:
        self.machine.receive_data(data)
        self._process()

    def handshakeCompleted(self) -> None:
        handle: Any = getattr(self.transport, "getHandle", lambda: None)()
        if isinstance(handle, SSL.Connection):
            self.tls_info = TLSInfo(
                version=handle.get_protocol_version_name(),
                cipher=handle.get_cipher_name() or "",
                implicit=self.machine.tls_mode is TLSMode.IMPLICIT,
            )
            log.debug(
                "TLS established: {version} {cipher}",
                version=self.tls_info.version,
                cipher=self.tls_info.cipher,
            )

    def connectionLost(self, reason: Failure = _CLEAN_CLOSE) -> None:
        self._gone = True
        self._cancel_timer()
        if self._closing is not None and self._closing.active():
            self._closing.cancel()
        self._closing = None
        step = None  # the machine knows where the conversation was
        if isinstance(reason.value, _TLS_ERRORS) and self.tls_info is None:
            step = Step.TLS  # the handshake itself failed
        if self._machine is not None:
            self._machine.connection_lost(_error_from(reason, step))
            self._process()
        self._log_trace()
        self._stop_body()
        if self._failure is None:
            self._failure = ConnectionLost("the connection is closed")
        if not self.ready.called:
            self.ready.errback(self._failure)
        self.closed.callback(None)

    @property
    def usable(self) -> bool:
        """True while transactions can still run on this connection."""
        if self._machine is not None and self._machine.exhausted:
            return False  # LIMITS MAILMAX reached: no further message here
        return self._failure is None and not self._gone

    @property
    def _transport(self) -> Any:
        """The transport with its full type (TCP or TLS), as Twisted gives it."""
        return self.transport

    # -- the caller's operations ---------------------------------------------------

    def send(self, envelope: Envelope, body: IBodyProducer) -> Deferred[Receipt]:
        """Queue one transaction; fires with its :class:`Receipt`.

        Transactions run in the order they were queued. With PIPELINING the
        next one's MAIL, RCPT and DATA leave with the previous final dot.
        Cancelling one that has not started removes it from the queue; one
        started ends with RSET if its DATA has not left yet, and the session
        goes on; only one whose DATA or body is under way aborts the
        connection.

        :raises UsageError: (as a failed Deferred) the envelope does not fit
            the server.
        """
        if self._failure is not None:
            return fail(self._failure)
        try:
            handle = self.machine.start_transaction(envelope)
        except SMTPError as error:
            return fail(error)
        result: Deferred[Receipt] = Deferred(lambda _: self._cancel(handle))
        self._sends[handle] = _Send(body, result)
        self._process()
        return result

    def quit(self) -> Deferred[None]:
        """Say QUIT and close; fires when the connection is gone."""
        if not self._gone and self._machine is not None:
            self._machine.quit()
            self._process()
        return self.closed

    def abort(self) -> None:
        """Drop the connection now."""
        if self.transport is not None and not self._gone:
            self._transport.abortConnection()

    def _cancel(self, handle: Handle) -> None:
        """A send not started leaves the queue; one started before its body
        ends with RSET; only one mid-body costs the connection."""
        if self._gone:
            return
        if self.machine.cancel(handle):
            self._close_send(handle)
        else:
            self.abort()

    # -- the machine's events ------------------------------------------------------

    def _trace_line(self, direction: str, line: str) -> None:
        self._trace.append((direction, line))

    def _process(self) -> None:
        machine = self.machine
        while True:
            data = machine.data_to_send()
            if data and self._write is not None and not self._gone:
                self._write(data)
            event = machine.next_event()
            if event is None:
                break
            self._on_event(event)
        if self._trace and (machine.state in _TRACE_AT or len(self._trace) >= _TRACE_LINES):
            self._log_trace()
        self._update_timer()

    def _log_trace(self) -> None:
        """Log the conversation since the last time, as one event.

        Before a send's result is given, each time the session goes idle or
        ends, and every :data:`_TRACE_LINES` lines; not per line or per
        read: a log event costs more than the rest of a small message's
        work. A message on its own connection is one or two events (its
        QUIT leaves with the final dot: both replies may come in one read).
        """
        if self._trace:
            log_conversation(self.peer, self._trace)
            self._trace = []

    def _on_event(self, event: Event) -> None:
        if isinstance(event, Ready):
            self.ready.callback(self)
        elif isinstance(event, StartTLS):
            self._start_tls()
        elif isinstance(event, BodyWanted):
            self._start_body(event)
        elif isinstance(event, BodyRefused):
            self._stop_body()
        elif isinstance(event, TransactionDone):
            self._fire(event.handle, self._receipt(event), None)
        elif isinstance(event, TransactionRefused):
            self._fire(event.handle, None, event.error)
        elif isinstance(event, SessionFailed):
            self._failure = event.error
            self._stop_body()
            if not self.ready.called:
                self.ready.errback(event.error)
            for handle in list(self._sends):
                self._fire(handle, None, event.error)
        elif isinstance(event, Closed):
            self._cancel_timer()
            self._stop_body()  # quit() mid-body drops the connection
            if self.transport is not None and not self._gone:
                if event.clean:
                    self._close_after_server()
                else:
                    self._transport.abortConnection()

    def _close_after_server(self) -> None:
        """After the reply to QUIT, let the server close first, as it does
        (RFC 5321 §4.1.1.10: it replies 221, then closes), so that the TIME_WAIT
        a TCP connection leaves is the server's and not ours: a client that
        opens connection after connection to one server would otherwise hold
        a local port for each for a minute. If it has not closed within
        :data:`CLOSE_GRACE`, we close. TLS has a closing exchange of its own:
        a TLS connection is closed at once, with ``loseConnection``."""
        if plain_tcp(self.transport):
            self._closing = self.reactor.callLater(CLOSE_GRACE, self._close)
        else:
            self._transport.loseConnection()

    def _close(self) -> None:
        """The server kept the connection open after 221: close it."""
        self._closing = None
        if not self._gone and not close_now(self._transport):
            self._transport.loseConnection()

    def _receipt(self, event: TransactionDone) -> Receipt:
        return Receipt(
            accepted=event.accepted,
            refused=event.refused,
            reply=event.reply,
            tls=self.tls_info,
            extensions=self.machine.extensions,
            parts=tuple(self._receipt(part) for part in event.parts),
        )

    def _fire(self, handle: Handle, receipt: Receipt | None, error: SMTPError | None) -> None:
        """Fire the send's Deferred unless it was cancelled already."""
        item = self._close_send(handle)
        if item is None or item.result.called:
            return
        self._log_trace()  # the caller hears of it after the log has it
        if receipt is not None:
            item.result.callback(receipt)
        else:
            item.result.errback(error)

    def _close_send(self, handle: Handle) -> _Send | None:
        item = self._sends.pop(handle, None)
        if item is not None and item.spool is not None:
            item.spool.close()
        return item

    def _start_tls(self) -> None:
        if self._tls is None or self.transport is None:
            self.machine.connection_lost(
                TLSFailure("no TLS options to start TLS with", step=Step.TLS)
            )
            return
        self.transport.startTLS(self._tls)  # type: ignore[attr-defined]
        self.machine.tls_started()

    # -- the body ------------------------------------------------------------

    def _start_body(self, event: BodyWanted) -> None:
        item = self._sends[event.handle]
        if item.spool is None:
            body = item.body
            if event.again:  # the same body goes in another transaction next
                item.spool = self._recording = _Spool()
        else:
            # Complete: the machine sends no more of a send whose body was cut short.
            body = item.spool.producer(self.reactor)
        if isinstance(body, SmallBodyProducer):
            self._send_small_body(body.data)
            return
        self._body = body
        self._consumer = consumer = _BodyConsumer(self)
        if self.transport is not None:
            # The transport pauses the producer when the server reads slowly.
            self._transport.registerProducer(body, True)
        done: Deferred[None] = body.startProducing(consumer)  # type: ignore[no-untyped-call]
        done.addCallbacks(self._body_done, self._body_failed)

    def _send_small_body(self, data: bytes) -> None:
        """A body in one chunk goes with its end marker, in the same write:
        no producer to register, no Deferred, no reactor turn."""
        if self._recording is not None:
            self._recording.write(data)
            self._recording = None
        machine = self.machine
        if data:
            machine.send_body(data)
        if machine.state is State.BODY:  # unless the chunk failed the session
            machine.end_body()

    def _body_chunk(self, data: bytes) -> None:
        if self._recording is not None:
            self._recording.write(data)
        self.machine.send_body(data)
        self._process()
        if self._timer is not None and self._timer_step is Step.BODY:
            self._timer.reset(self._timeouts.data_block)

    def _release_body(self) -> bool:
        """Detach the finished producer; False if it was detached already."""
        if self._consumer is None or self._consumer.closed:
            return False
        self._consumer.closed = True
        self._consumer = None
        self._recording = None
        if self.transport is not None and not self._gone:
            self._transport.unregisterProducer()
        return True

    def _body_done(self, _: object) -> None:
        if not self._release_body():
            return
        self.machine.end_body()
        self._process()

    def _body_failed(self, failure: Failure) -> None:
        if not self._release_body():
            return
        if isinstance(failure.value, CancelledError):
            return
        error = InvalidBody(f"the body could not be read: {failure.value}", step=Step.BODY)
        error.__cause__ = failure.value
        # No final dot: the server must store nothing of a half-read body.
        self.machine.connection_lost(error)
        self._process()

    def _stop_body(self) -> None:
        body = self._body
        if self._release_body() and body is not None:
            try:
                body.stopProducing()  # type: ignore[no-untyped-call]
            except Exception:  # a producer that already finished may complain
                log.failure("stopping the body producer")

    # -- timers -------------------------------------------------------------------

    def _update_timer(self) -> None:
        """One timer for the step the machine waits on, restarted by each reply.

        The same delayed call moves from step to step (``reset`` to a later
        time costs no reordering of the reactor's timers); it goes only when
        the machine waits for nothing.
        """
        machine = self.machine
        step = None if self._gone else machine.waiting_for
        if step is None:
            self._cancel_timer()
            return
        replies = machine.replies_received
        if step is self._timer_step and replies == self._timer_replies:
            return
        self._timer_step = step
        self._timer_replies = replies
        if self._timer is None:
            self._timer = self.reactor.callLater(self._timeouts.for_step(step), self._timed_out)
        else:
            self._timer.reset(self._timeouts.for_step(step))

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._timer_step = None

    def _timed_out(self) -> None:
        self._timer = None
        self._timer_step = None
        self.machine.timed_out()
        self._process()


def _local_literal(transport: object) -> str:
    """An address literal for our end of the connection (EHLO fallback)."""
    get_host = getattr(transport, "getHost", None)
    try:
        host: object = get_host().host  # type: ignore[misc]
    except (AttributeError, TypeError):
        return "localhost"
    return _literal(host) if isinstance(host, str) else "localhost"


@functools.lru_cache(maxsize=64)
def _literal(host: str) -> str:
    """``host`` (our address) as an address literal; made once per address."""
    try:
        return address_literal(ipaddress.ip_address(host))
    except ValueError:
        return "localhost"


@dataclass(eq=False)
class _Send:
    """One send: its body, its result, and a copy of the body to send it again."""

    body: IBodyProducer
    result: Deferred[Receipt]
    spool: _Spool | None = None


class _Spool:
    """A copy of a body as the producer wrote it, for the send's next transaction.

    Needed only when a send's recipients are split over transactions: a
    producer runs once. Kept in memory up to :data:`SPOOL_IN_MEMORY`, then
    in an anonymous temporary file, closed with the send.
    """

    def __init__(self) -> None:
        # Lives as long as its send, closed by close(): no with-block fits.
        self._file: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)  # noqa: SIM115
        self.length = 0

    def write(self, data: bytes) -> None:
        self._file.write(data)
        self.length += len(data)

    def producer(self, reactor: IReactorTime) -> IBodyProducer:
        """A producer of the whole body again, read from the spool, paced by ``reactor``."""
        self._file.seek(0)
        cooperator = Cooperator(scheduler=lambda work: reactor.callLater(0, work))
        return ReadProducer(self._file.read, self.length, cooperator)

    def close(self) -> None:
        self._file.close()


#: Octets of a spooled body kept in memory before it goes to a temporary file.
SPOOL_IN_MEMORY = 4 * 1024 * 1024


_TLS_ERRORS = (SSL.Error, VerificationError, CertificateError)


def _error_from(reason: Failure, step: Step | None) -> SMTPError | None:
    """Name the cause of a lost connection; None for a plain close."""
    if isinstance(reason.value, VerificationError | CertificateError):
        return TLSFailure(f"the certificate does not match: {reason.value}", step=step)
    if isinstance(reason.value, SSL.Error):
        return TLSFailure(f"TLS failed: {_ssl_reason(reason.value)}", step=step)
    if isinstance(reason.value, ConnectionDone):
        return None
    return ConnectionLost(f"connection lost: {reason.getErrorMessage()}", step=step)


def _ssl_reason(error: BaseException) -> str:
    args = getattr(error, "args", ())
    if args and isinstance(args[0], list) and args[0]:
        return "; ".join(str(item[-1]) for item in args[0] if isinstance(item, tuple))
    return str(error) or type(error).__name__
