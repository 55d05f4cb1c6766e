"""The SMTP client as a sans-I/O state machine: bytes in, events and bytes out.

Theory of operation
-------------------
:class:`ClientMachine` holds every rule of the client's side of the
conversation and no I/O. Its driver (the Twisted protocol, or a test)
does four things and nothing else:

1. feed what the server sent to :meth:`~ClientMachine.receive_data`, and tell
   :meth:`~ClientMachine.connection_lost` / :meth:`~ClientMachine.timed_out`;
2. write :meth:`~ClientMachine.data_to_send` to the server;
3. act on each :meth:`~ClientMachine.next_event` (:mod:`txcolombe.client.events`):
   :class:`StartTLS` (start TLS, then call :meth:`~ClientMachine.tls_started`),
   :class:`BodyWanted` (stream that send's body through
   :meth:`~ClientMachine.send_body` and :meth:`~ClientMachine.end_body`),
   :class:`BodyRefused` (stop that body), :class:`Ready`,
   :class:`TransactionDone`, :class:`TransactionRefused`,
   :class:`SessionFailed`, :class:`Closed` (close the transport);
4. keep one timer for :attr:`~ClientMachine.waiting_for` and call
   :meth:`~ClientMachine.timed_out` when it fires.

A send (:meth:`~ClientMachine.start_transaction`) is queued and named by the
handle it returns; the machine starts it as soon as the conversation allows
and splits its recipients over several transactions when the server's
limits ask for it (:mod:`txcolombe.client.recipients`). Every command sent is
queued with the step it belongs to, and each reply answers the oldest queued
command, so lock-step and pipelined (RFC 2920) conversations are handled by
the same code. The session goes greeting → EHLO → [STARTTLS → EHLO] →
[AUTH] → ready; each transaction goes MAIL → RCPT… → DATA → body → end of
data → ready, or RSET → ready after a failure: :data:`TRANSITIONS` lists
every move, and the machine makes no other. A fatal error sends QUIT when
the conversation still allows it. A QUIT asked for during the last
transaction leaves with its final dot when the server offers PIPELINING
(RFC 2920 §3.1: QUIT may end a group), one write and one read fewer.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from txcolombe.client.envelope import Envelope, mail_parameters, use_bdat
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
from txcolombe.client.recipients import (
    DEFAULT_MAX_RECIPIENTS,
    Tally,
    as_temporary,
    server_limits,
    take_batch,
    too_many_recipients,
)
from txcolombe.client.states import TRANSITIONS, Input, State
from txcolombe.codec.address import path
from txcolombe.codec.data import DataEncoder
from txcolombe.codec.errors import (
    AuthenticationUnavailable,
    ConnectionFailed,
    ConnectionLost,
    RecipientsRefused,
    ResponseTimeout,
    SMTPError,
    STARTTLSUnavailable,
    Step,
    TransactionLimit,
    UnexpectedResponse,
    UsageError,
    error_for_reply,
)
from txcolombe.codec.extensions import Extensions
from txcolombe.codec.reply import Reply, ReplyParser
from txcolombe.codec.sasl import (
    Authentication,
    SASLClient,
    choose_mechanism,
    decode_challenge,
    encode_response,
)

__all__ = [
    "BDAT_CHUNK",
    "TRANSITIONS",
    "BodyRefused",
    "BodyWanted",
    "ClientMachine",
    "Closed",
    "Envelope",
    "Event",
    "Handle",
    "Input",
    "Ready",
    "SessionFailed",
    "StartTLS",
    "State",
    "TLSMode",
    "Trace",
    "TransactionDone",
    "TransactionRefused",
]


class TLSMode(enum.Enum):
    """How the session gets TLS."""

    NONE = "none"
    """Never STARTTLS (authentication is then impossible)."""
    OPPORTUNISTIC = "opportunistic"
    """STARTTLS when the server offers it; plaintext otherwise."""
    REQUIRED = "starttls"
    """STARTTLS, which the server must offer."""
    IMPLICIT = "implicit"
    """The transport is TLS from the first byte (port 465)."""


#: BDAT chunks are gathered up to this size before they are sent.
BDAT_CHUNK = 256 * 1024

Trace = Callable[[str, str], None]

#: The argument of the RSET sent before a transaction's MAIL (Envelope.reset_first).
_PROBE = -1


@dataclass(eq=False)
class _Send:
    """One caller's message: its handle, and its recipients over transactions."""

    handle: Handle
    envelope: Envelope
    #: Indices of the recipients not yet given to a transaction.
    todo: deque[int]
    mail_command: str = ""
    bdat: bool = False
    #: An SMTPUTF8 transaction: paths keep the domains as given.
    utf8: bool = False
    running: int = 0
    started: int = 0
    tally: Tally = field(default_factory=Tally)


@dataclass(eq=False)
class _Transaction:
    send: _Send
    #: This transaction's recipients, as indices into the envelope's.
    indices: list[int]
    pipelined: bool
    accepted: dict[str, Reply] = field(default_factory=dict)
    refused: dict[str, Reply] = field(default_factory=dict)
    #: Recipients a "too many recipients" reply sent to a later transaction.
    deferred: list[int] = field(default_factory=list)
    error: SMTPError | None = None
    next_rcpt: int = 0
    rcpt_replies: int = 0
    empty_data: bool = False
    #: DATA or the first BDAT has left: the transaction can no longer end with RSET.
    data_sent: bool = False

    @property
    def envelope(self) -> Envelope:
        return self.send.envelope

    @property
    def bdat(self) -> bool:
        return self.send.bdat

    def names(self) -> list[str]:
        recipients = self.send.envelope.recipients
        return [str(recipients[i]) for i in self.indices]


class ClientMachine:
    """The client side of one SMTP session.

    :param domain: the EHLO name, already validated (see
        :func:`txcolombe.codec.address.parse_domain`).
    :param tls: how to get TLS; with :attr:`TLSMode.IMPLICIT` the driver's
        transport is TLS already.
    :param authentication: credentials; AUTH is only ever sent under TLS.
    :param trace: called with ``(">" or "<", line)`` for each command and
        reply, credentials replaced by ``****``; for debug logs.
    :param max_recipients: recipients per transaction at most (None: no
        limit of ours); a send with more runs as several transactions. The
        server's LIMITS RCPTMAX and "too many recipients" replies lower it.
    """

    def __init__(
        self,
        domain: str,
        *,
        tls: TLSMode = TLSMode.OPPORTUNISTIC,
        authentication: Authentication | None = None,
        trace: Trace | None = None,
        server_host: str | None = None,
        server_port: int | None = None,
        max_recipients: int | None = DEFAULT_MAX_RECIPIENTS,
    ) -> None:
        if max_recipients is not None and max_recipients < 1:
            raise UsageError(f"max_recipients must be at least 1, not {max_recipients}")
        self.domain = domain
        self.tls_mode = tls
        self.authentication = authentication
        self.server_host = server_host
        self.server_port = server_port
        self.max_recipients = max_recipients
        self.tls_active = tls is TLSMode.IMPLICIT
        self.extensions = Extensions()
        self.state = State.GREETING
        self.trace = trace
        self._parser = ReplyParser()
        self._pending: deque[tuple[Step, int | None]] = deque([(Step.GREETING, None)])
        self._outbox: list[bytes] = []
        self._events: deque[Event] = deque()
        self._sasl: SASLClient | None = None
        self._next_handle: Handle = 1
        self._sends: dict[Handle, _Send] = {}  # every send not yet reported
        self._queue: deque[_Send] = deque()  # sends with recipients waiting for a transaction
        self._txns: deque[_Transaction] = deque()  # running, oldest first
        self._learned_limit: int | None = None  # from a "too many recipients" reply
        self._mails = 0  # transactions begun on this connection (LIMITS MAILMAX)
        self._encoder: DataEncoder | None = None
        self._bdat_buffer: list[bytes] = []
        #: Counts replies, so a driver can restart its timer on each one.
        self.replies_received = 0
        self._bdat_size = 0
        self._quit_requested = False
        self._quit_sent = False  # with the last final dot, before the session was idle

    # -- driver interface ----------------------------------------------------

    def data_to_send(self) -> bytes:
        """Bytes to write to the server now (possibly empty)."""
        out = b"".join(self._outbox)
        self._outbox.clear()
        return out

    def next_event(self) -> Event | None:
        """The next event for the driver, or None."""
        return self._events.popleft() if self._events else None

    @property
    def waiting_for(self) -> Step | None:
        """The step whose timeout should run now, or None when idle.

        Once QUIT is sent (politely, or after a fatal error), only the QUIT
        grace runs, whatever replies are still outstanding before it.
        """
        if self.state is State.QUITTING:
            return Step.QUIT
        return self._step()

    def _step(self) -> Step | None:
        """The step the conversation is at, for errors and timeouts."""
        if self.state is State.BODY:
            return Step.BODY
        if self.state in (State.CLOSED, State.TLS_WAIT):
            return None
        return self._pending[0][0] if self._pending else None

    @property
    def extensions(self) -> Extensions:
        """What the server advertised in its last EHLO reply."""
        return self._extensions

    @extensions.setter
    def extensions(self, extensions: Extensions) -> None:
        self._extensions = extensions
        # Asked for every message: worth keeping at hand.
        self.pipelining = "PIPELINING" in extensions
        self._limits = server_limits(extensions)

    def receive_data(self, data: bytes) -> None:
        """Feed bytes received from the server."""
        if self.state in (State.CLOSED, State.TLS_WAIT):
            return
        self._parser.feed(data)
        while self.state not in (State.CLOSED, State.TLS_WAIT):
            try:
                reply = self._parser.next_reply()
            except SMTPError as error:
                error.step = self._step()
                self._fatal(error, quit=False)
                return
            if reply is None:
                return
            if self.trace is not None:
                self.trace("<", str(reply))
            self._handle(reply)
        if self.state is State.TLS_WAIT:
            # RFC 3207 §6: nothing sent before the TLS handshake can be trusted.
            self._parser.discard()

    def tls_started(self) -> None:
        """The driver has started TLS after :class:`StartTLS`: greet again."""
        if self.state is not State.TLS_WAIT:
            raise UsageError(f"tls_started() in state {self.state.value}")
        self.tls_active = True
        self.extensions = Extensions()
        self._go(Input.TLS_STARTED)
        self._send(f"EHLO {self.domain}", Step.EHLO)

    def connection_lost(self, error: SMTPError | None = None) -> None:
        """The transport closed; ``error`` says why when the driver knows."""
        if self.state is State.CLOSED:
            return
        step = self._step()
        if self.state is State.QUITTING and error is None:
            self._close(clean=True)
            return
        if error is None:
            error = ConnectionLost("the server closed the connection", step=step)
        if isinstance(error, ConnectionFailed):
            error.maybe_delivered = self._maybe_delivered(step)
        if error.step is None:
            error.step = step
        self._fail_session(error)
        self._close(clean=False)

    def timed_out(self) -> None:
        """The timer for :attr:`waiting_for` expired."""
        if self.state is State.QUITTING:
            self._close(clean=False)
            return
        step = self._step()
        what = step.value if step is not None else "the server"
        error = ResponseTimeout(f"no reply in time to {what}", step=step)
        error.maybe_delivered = self._maybe_delivered(step)
        self._fatal(error, quit=True)

    def _maybe_delivered(self, step: Step | None) -> bool:
        """After the final dot of a real body, the server may have the message."""
        return step is Step.DATA_END and bool(self._txns) and not self._txns[0].empty_data

    def quit(self) -> None:
        """End the session politely: QUIT, then :class:`Closed` on its reply.

        Sends already queued run first; in the middle of a body, or before
        the session is set up, the connection is simply dropped.
        """
        if self.state in (State.QUITTING, State.CLOSED):
            return
        if self.state in (State.BODY, State.TLS_WAIT, State.GREETING):
            self._close(clean=False)
            return
        if self._txns or self._queue:
            self._quit_requested = True
            return
        self._send_quit()

    def _send_quit(self) -> None:
        """Move to QUITTING and send QUIT, unless it left with the final dot."""
        self._go(Input.QUIT)
        if not self._quit_sent:
            self._send("QUIT", Step.QUIT)

    def _quit_with_dot(self, txn: _Transaction) -> None:
        """Send the QUIT asked for with this final dot, if nothing else is to follow it.

        Only with PIPELINING, only after the last transaction, and not for
        BDAT (whose refusals are answered with RSET, which QUIT must follow).
        The reply to the dot is handled as ever; QUITTING begins after it.
        """
        if (
            self._quit_requested
            and self.pipelining
            and not txn.bdat
            and not self._queue
            and len(self._txns) == 1
        ):
            self._quit_sent = True
            self._send("QUIT", Step.QUIT)

    # -- sends -----------------------------------------------------------------

    def start_transaction(self, envelope: Envelope) -> Handle:
        """Queue a send; it starts as soon as the conversation allows.

        Sends run in the order they were queued; with PIPELINING the next
        one's MAIL, RCPT and DATA leave in the same write as the previous
        one's final dot (RFC 2920 §3.1). One with more recipients than a
        transaction may take runs as several transactions in a row. Its
        events (:class:`BodyWanted`, then one :class:`TransactionDone` or
        :class:`TransactionRefused`) carry the handle returned here. An
        envelope that cannot go to this server (SMTPUTF8, SIZE, an
        extension) gets a :class:`TransactionRefused` and sends nothing.

        :raises UsageError: no recipient, or the session is closing.
        """
        if not envelope.recipients:
            raise UsageError("a message needs at least one recipient")
        if self.state in (State.QUITTING, State.CLOSED) or self._quit_requested:
            raise UsageError(f"cannot start a transaction in state {self.state.value}")
        handle = self._next_handle
        self._next_handle += 1
        send = _Send(handle, envelope, deque(range(len(envelope.recipients))))
        self._sends[handle] = send
        self._queue.append(send)
        self._start_queued()
        return handle

    def cancel(self, handle: Handle) -> bool:
        """Abandon a send: dropped if not started, ended with RSET if its DATA has not left.

        A send cancelled while its transaction runs ends at the next reply
        with RSET and a :class:`TransactionRefused`, and the session goes
        on; a send still queued is dropped with no event.

        :returns: False when its body is under way (or DATA was pipelined):
            only dropping the connection can stop it then.
        """
        send = self._sends.get(handle)
        if send is None:
            return True  # reported already
        if not send.running:
            self._drop(send)
            del self._sends[handle]
            return True
        running = [txn for txn in self._txns if txn.send is send]
        if self.state not in (State.TRANSACTION, State.RESETTING) or any(
            txn.data_sent for txn in running
        ):
            return False
        for txn in running:
            if txn.error is None:
                txn.error = UsageError("the transaction was cancelled", step=self._step())
        self._drop(send)
        return True

    def _drop(self, send: _Send) -> None:
        """No further transaction for ``send``."""
        send.todo.clear()
        if send in self._queue:
            self._queue.remove(send)

    def _can_start(self) -> bool:
        state = self.state
        if state is State.READY:
            return True
        return self.pipelining and (state is State.DATA_END or state is State.RESETTING)

    def _recipient_limit(self) -> int | None:
        limits = (self.max_recipients, self._learned_limit, self._limits.get("RCPTMAX"))
        known = [limit for limit in limits if limit is not None]
        return min(known) if known else None

    @property
    def exhausted(self) -> bool:
        """True once the server's LIMITS MAILMAX (RFC 9422) transactions have
        begun: this connection takes no further message."""
        mailmax = self._limits.get("MAILMAX")
        return mailmax is not None and self._mails >= mailmax

    def _start_queued(self) -> None:
        """Start the queued sends the conversation allows now, oldest first."""
        while self._queue and self._can_start():
            send = self._queue[0]
            envelope = send.envelope
            if self.exhausted:
                self._queue.popleft()
                self._beyond_mailmax(send)
                continue
            if not send.started:
                try:
                    send.bdat = use_bdat(envelope, self.extensions)
                    params = mail_parameters(envelope, self.extensions, self.tls_active)
                except SMTPError as error:
                    self._queue.popleft()
                    del self._sends[send.handle]
                    self._events.append(TransactionRefused(send.handle, error))
                    continue
                send.utf8 = " SMTPUTF8" in params
                send.mail_command = f"MAIL FROM:{path(envelope.sender, utf8=send.utf8)}{params}"
            if envelope.all_or_nothing:
                batch = list(send.todo)
                send.todo.clear()
            else:
                domains = self._limits.get("RCPTDOMAINMAX")
                batch = take_batch(send.todo, envelope.recipients, self._recipient_limit(), domains)
            if not send.todo:
                self._queue.popleft()
            self._begin(send, batch)

    def _beyond_mailmax(self, send: _Send) -> None:
        """A send the connection has no transaction left for: refused for now if
        nothing of it has begun; else it ends with what its transactions gave,
        its untried recipients neither accepted nor refused (still to send)."""
        send.todo.clear()
        if send.handle not in self._sends:
            return
        if not send.started:
            del self._sends[send.handle]
            error = TransactionLimit(
                f"the server takes {self._limits['MAILMAX']} transactions per connection"
                " (LIMITS MAILMAX): send it on another connection",
                step=Step.MAIL,
            )
            self._events.append(TransactionRefused(send.handle, error))
        elif send.running == 0:
            del self._sends[send.handle]
            self._events.append(send.tally.result(send.handle))

    def _begin(self, send: _Send, indices: list[int]) -> None:
        """Send one transaction's MAIL (and, pipelined, its RCPTs and DATA)."""
        self._mails += 1
        self._go(Input.MAIL)
        txn = _Transaction(send, indices, pipelined=self.pipelining)
        self._txns.append(txn)
        send.running += 1
        send.started += 1
        if send.envelope.reset_first and send.started == 1:
            self._send("RSET", Step.RSET, _PROBE)
            if not txn.pipelined:
                return  # MAIL follows the RSET's reply
        self._send(send.mail_command, Step.MAIL)
        if txn.pipelined:
            while txn.next_rcpt < len(txn.indices):
                self._send_next_rcpt(txn)
            if self._data_pipelined(txn):
                txn.data_sent = True
                self._send("DATA", Step.DATA)

    @staticmethod
    def _data_pipelined(txn: _Transaction) -> bool:
        """DATA goes with MAIL and RCPT, unless the RCPT replies must be seen first."""
        return txn.pipelined and not txn.envelope.all_or_nothing and not txn.bdat

    # -- the body ------------------------------------------------------------------

    def send_body(self, chunk: bytes) -> None:
        """Send the next chunk of the body (after :class:`BodyWanted`).

        A chunk that cannot be sent (a line too long, 8-bit data for a
        7-bit server) fails the session without the final dot, so that the
        server stores nothing: :class:`SessionFailed` then :class:`Closed`
        (unclean) follow.
        """
        if self.state is not State.BODY or self._encoder is None:
            raise UsageError(f"send_body() in state {self.state.value}")
        txn = self._current()
        try:
            data = self._encoder.encode(chunk)
        except SMTPError as error:
            self._fail_session(error)
            self._close(clean=False)
            return
        if not data:
            return
        if not txn.bdat:
            self._outbox.append(data)
            return
        self._bdat_buffer.append(data)
        self._bdat_size += len(data)
        if self._bdat_size >= BDAT_CHUNK:
            self._send_bdat(last=False)

    def _send_bdat(self, *, last: bool) -> None:
        data = b"".join(self._bdat_buffer)
        self._bdat_buffer.clear()
        self._bdat_size = 0
        marker = " LAST" if last else ""
        self._outbox.append(b"BDAT %d%s\r\n" % (len(data), marker.encode()))
        self._outbox.append(data)
        if self.trace is not None:
            self.trace(">", f"BDAT {len(data)}{marker} <{len(data)} octets>")
        self._pending.append((Step.DATA_END if last else Step.BODY, None))

    def end_body(self) -> None:
        """The body is complete: send the end-of-data marker."""
        if self.state is not State.BODY or self._encoder is None:
            raise UsageError(f"end_body() in state {self.state.value}")
        tail = self._encoder.finish()
        octets = self._encoder.octets_out
        self._encoder = None
        txn = self._current()
        if txn.bdat:
            if tail:
                self._bdat_buffer.append(tail)
            self._send_bdat(last=True)
        else:
            self._outbox.append(tail)
            if self.trace is not None:
                self.trace(">", f"<{octets} octets of data>")
            self._pending.append((Step.DATA_END, None))
        self._go(Input.END_OF_DATA)
        self._start_queued()
        self._quit_with_dot(txn)

    # -- internals ------------------------------------------------------------------

    def _go(self, what: Input) -> None:
        """Make the move :data:`TRANSITIONS` lists for ``what`` in this state."""
        try:
            self.state = TRANSITIONS[self.state, what]
        except KeyError:
            raise UsageError(f"{what.value} in state {self.state.value}") from None

    def _send(
        self, line: str, step: Step, arg: int | None = None, *, shown: str | None = None
    ) -> None:
        if self.trace is not None:
            self.trace(">", shown if shown is not None else line)
        self._outbox.append(line.encode("utf-8") + b"\r\n")
        self._pending.append((step, arg))

    def _send_next_rcpt(self, txn: _Transaction) -> None:
        position = txn.next_rcpt
        index = txn.indices[position]
        rcpt = txn.envelope.recipients[index]
        txn.next_rcpt += 1
        options = txn.envelope.rcpt_options
        params = options[index].parameters() if index < len(options) else ""
        self._send(f"RCPT TO:{path(rcpt, utf8=txn.send.utf8)}{params}", Step.RCPT, position)

    def _handle(self, reply: Reply) -> None:
        self.replies_received += 1
        if not self._pending:
            if reply.code == 421:
                self._fatal(error_for_reply(reply, None), quit=False)
            else:
                self._fatal(UnexpectedResponse("a reply to no command", reply=reply), quit=True)
            return
        step, arg = self._pending.popleft()
        if self.state is State.QUITTING:
            if step is Step.QUIT:
                self._close(clean=True)
            return
        if reply.code == 421:
            self._fatal(error_for_reply(reply, step), quit=False)
            return
        handler = _HANDLERS[step]
        handler(self, reply, arg)

    # -- session set-up -------------------------------------------------------------

    def _on_greeting(self, reply: Reply, _: int | None) -> None:
        if reply.code != 220:
            self._fatal(error_for_reply(reply, Step.GREETING, "the server refused the session"))
            return
        self._go(Input.GREETED)
        self._send(f"EHLO {self.domain}", Step.EHLO)

    def _on_ehlo(self, reply: Reply, _: int | None) -> None:
        if reply.code != 250:
            if reply.code in (500, 502) and not self._needs_tls():
                self._send(f"HELO {self.domain}", Step.HELO)
                return
            self._fatal(error_for_reply(reply, Step.EHLO))
            return
        self.extensions = Extensions.from_reply(reply)
        self._after_hello()

    def _on_helo(self, reply: Reply, _: int | None) -> None:
        if reply.code != 250:
            self._fatal(error_for_reply(reply, Step.HELO))
            return
        words = reply.lines[0].split()
        self.extensions = Extensions(words[0] if words else "")
        self._after_hello()

    def _needs_tls(self) -> bool:
        return self.tls_mode is TLSMode.REQUIRED or self.authentication is not None

    def _after_hello(self) -> None:
        if (
            not self.tls_active
            and self.tls_mode in (TLSMode.OPPORTUNISTIC, TLSMode.REQUIRED)
            and "STARTTLS" in self.extensions
        ):
            self._send("STARTTLS", Step.STARTTLS)
            return
        if not self.tls_active and self._needs_tls():
            why = "authentication" if self.authentication is not None else "this session"
            self._fatal(
                STARTTLSUnavailable(
                    f"{why} requires TLS and the server does not offer STARTTLS",
                    step=Step.STARTTLS,
                )
            )
            return
        if self.authentication is not None:
            self._start_auth(self.authentication)
            return
        self._ready()

    def _on_starttls(self, reply: Reply, _: int | None) -> None:
        if reply.code != 220:
            self._fatal(error_for_reply(reply, Step.STARTTLS))
            return
        self._go(Input.TLS_ACCEPTED)
        self._events.append(StartTLS())

    def _start_auth(self, authentication: Authentication) -> None:
        offered = self.extensions.auth_mechanisms
        mechanism = choose_mechanism(authentication, offered)
        if mechanism is None:
            listing = ", ".join(sorted(offered)) or "no mechanism"
            if authentication.mechanism is not None:
                wanted = f"AUTH {authentication.mechanism.value}"
            elif authentication.token is not None:
                wanted = "a mechanism for a token (OAUTHBEARER, XOAUTH2)"
            else:
                wanted = "a mechanism for a password (SCRAM-SHA-256, PLAIN, LOGIN)"
            self._fatal(
                AuthenticationUnavailable(
                    f"the server does not offer {wanted} (it offers {listing})",
                    step=Step.AUTH,
                )
            )
            return
        try:
            sasl = SASLClient(
                authentication, mechanism, host=self.server_host, port=self.server_port
            )
        except SMTPError as error:  # e.g. a token provider left unresolved
            error.step = Step.AUTH
            self._fatal(error)
            return
        self._sasl = sasl
        line = sasl.auth_command()  # the initial response when it fits (RFC 4954 §4)
        bare = f"AUTH {mechanism.value}"
        self._send(line, Step.AUTH, shown=None if line == bare else f"{bare} ****")

    def _on_auth(self, reply: Reply, _: int | None) -> None:
        sasl = self._sasl
        if reply.code == 334 and sasl is not None:
            try:
                answer = sasl.respond(decode_challenge(reply.lines[0]))
            except SMTPError as error:
                error.reply = reply
                self._send("*", Step.AUTH)  # RFC 4954 §4: cancel the exchange
                self._fatal(error)
                return
            # A continuation response: empty is an empty line, never "=".
            self._send(encode_response(answer), Step.AUTH, shown="****")
            return
        self._sasl = None
        if reply.code != 235:
            message = "authentication refused"
            if sasl is not None and sasl.server_error is not None:
                message += f" (the server reported: {sasl.server_error[:200]})"
            self._fatal(error_for_reply(reply, Step.AUTH, message))
            return
        if sasl is not None:
            try:
                sasl.check_success()  # SCRAM: the server must have proved itself
            except SMTPError as error:
                error.reply = reply
                self._fatal(error)
                return
        self._ready()

    def _ready(self) -> None:
        self._go(Input.SET_UP)
        self._events.append(Ready(self.extensions, self.tls_active))
        self._start_queued()

    # -- transaction replies --------------------------------------------------------

    def _on_mail(self, reply: Reply, _: int | None) -> None:
        txn = self._current()
        if reply.code // 100 != 2:
            txn.error = error_for_reply(reply, Step.MAIL, "sender refused")
            if not txn.pipelined:
                self._abandon(txn, txn.error)
            return
        if not txn.pipelined:
            if txn.error is not None:  # cancelled while MAIL was on its way
                self._abandon(txn, txn.error)
            else:
                self._send_next_rcpt(txn)

    def _on_rcpt(self, reply: Reply, position: int | None) -> None:
        txn = self._current()
        # Counted, not read off accepted/refused: a recipient may be listed twice.
        txn.rcpt_replies += 1
        if txn.error is not None:
            # MAIL failed (these are the pipelined replies that follow) or the
            # transaction was cancelled. Without a pipelined DATA to answer
            # last (all-or-nothing), end here.
            last = txn.rcpt_replies == len(txn.indices)
            if not txn.pipelined or (last and not self._data_pipelined(txn)):
                self._abandon(txn, txn.error)
            return
        assert position is not None
        index = txn.indices[position]
        rcpt = str(txn.envelope.recipients[index])
        if reply.code // 100 == 2:
            txn.accepted[rcpt] = reply
        elif not too_many_recipients(reply):
            txn.refused[rcpt] = reply
        elif not txn.accepted or txn.envelope.all_or_nothing:
            # No progress to make in another transaction: a temporary refusal.
            txn.refused[rcpt] = as_temporary(reply)
        else:
            self._defer(txn, position)
        if txn.next_rcpt < len(txn.indices):
            if not txn.pipelined:
                self._send_next_rcpt(txn)
            return
        if txn.rcpt_replies < len(txn.indices):
            return
        if txn.deferred:
            # RFC 5321 §4.5.3.1.10: the rest go in the next transaction, first.
            send = txn.send
            send.todo.extendleft(reversed(txn.deferred))
            if send not in self._queue:
                self._queue.appendleft(send)
        error = self._recipients_error(txn)
        if self._data_pipelined(txn):
            txn.error = error  # DATA is on its way already; its reply decides
        elif error is not None:
            self._abandon(txn, error)
        elif txn.bdat:
            self._begin_body(txn)
        else:
            txn.data_sent = True
            self._send("DATA", Step.DATA)

    def _defer(self, txn: _Transaction, position: int) -> None:
        """The server takes no more recipients in this transaction (452, or 552)."""
        if not txn.deferred:
            # Learnt for the rest of the session: as many as it answered before.
            limit = txn.rcpt_replies - 1
            if self._learned_limit is None or limit < self._learned_limit:
                self._learned_limit = limit
        txn.deferred.append(txn.indices[position])
        if not txn.pipelined:
            # Lock-step: the ones not asked yet go along, unasked.
            txn.deferred.extend(txn.indices[txn.next_rcpt :])
            del txn.indices[txn.next_rcpt :]

    def _recipients_error(self, txn: _Transaction) -> SMTPError | None:
        if not txn.accepted:
            return RecipientsRefused("no recipient was accepted", txn.refused)
        if txn.envelope.all_or_nothing and txn.refused:
            return RecipientsRefused("not every recipient was accepted", txn.refused)
        return None

    def _on_data(self, reply: Reply, _: int | None) -> None:
        txn = self._current()
        if reply.code == 354 and txn.error is not None:
            # RFC 2920 §3.1: DATA accepted with nothing to deliver; end it empty.
            txn.empty_data = True
            self._outbox.append(b".\r\n")
            self._pending.append((Step.DATA_END, None))
            return
        if txn.error is not None:
            self._abandon(txn, txn.error)
            return
        if reply.code != 354:
            self._abandon(txn, error_for_reply(reply, Step.DATA, "message refused"))
            return
        self._begin_body(txn)

    def _begin_body(self, txn: _Transaction) -> None:
        txn.data_sent = True
        self._go(Input.BODY)
        self._encoder = DataEncoder(
            allow_8bit="8BITMIME" in self.extensions or txn.envelope.binary,
            stuff=not txn.bdat,
            raw=txn.envelope.binary,
        )
        # The recipients of this send's next transactions are known by now.
        self._events.append(BodyWanted(txn.send.handle, again=bool(txn.send.todo)))

    def _on_bdat(self, reply: Reply, _: int | None) -> None:
        txn = self._current()
        if reply.code // 100 == 2 or txn.error is not None:
            return
        error = error_for_reply(reply, Step.BODY, "message refused")
        if self.state is not State.BODY:
            txn.error = error  # the last chunk has left: its reply ends the transaction
            return
        # RFC 3030 §2: no more chunks once one is refused; the driver stops the body.
        self._encoder = None
        self._bdat_buffer.clear()
        self._bdat_size = 0
        self._events.append(BodyRefused(txn.send.handle))
        self._abandon(txn, error)

    def _on_data_end(self, reply: Reply, _: int | None) -> None:
        txn = self._current()
        if txn.error is not None and (txn.empty_data or txn.bdat):
            self._abandon(txn, txn.error)
        elif reply.code // 100 == 2:
            self._finish(TransactionDone(txn.send.handle, txn.accepted, txn.refused, reply))
        else:
            self._finish(error_for_reply(reply, Step.DATA_END, "message refused"))

    def _abandon(self, txn: _Transaction, error: SMTPError) -> None:
        """End a failed transaction with RSET; report it once RSET is answered."""
        txn.error = error
        if not isinstance(error, RecipientsRefused):
            self._drop(txn.send)  # the message itself failed: no further transaction
        self._go(Input.RSET)
        self._send("RSET", Step.RSET)
        self._start_queued()

    def _on_rset(self, reply: Reply, arg: int | None) -> None:
        txn = self._current()
        if arg == _PROBE:
            if reply.code // 100 != 2:
                self._fatal(error_for_reply(reply, Step.RSET))
            elif not txn.pipelined:
                self._send(txn.send.mail_command, Step.MAIL)
            return
        if reply.code // 100 != 2:
            self._txns.popleft()
            self._transaction_over(txn, txn.error or error_for_reply(reply, Step.RSET))
            self._fatal(error_for_reply(reply, Step.RSET))
            return
        self._finish(txn.error or error_for_reply(reply, Step.RSET))

    def _on_unexpected(self, reply: Reply, _: int | None) -> None:
        self._fatal(UnexpectedResponse("unexpected reply", reply=reply))

    def _current(self) -> _Transaction:
        if not self._txns:
            raise UnexpectedResponse("a transaction reply outside a transaction")
        return self._txns[0]

    def _finish(self, result: TransactionDone | SMTPError) -> None:
        """The oldest transaction is over; report it, go on, then QUIT if asked to."""
        self._transaction_over(self._txns.popleft(), result)
        if self._txns:
            return
        self._go(Input.IDLE)
        self._start_queued()
        if self._quit_requested and not self._txns:
            self._quit_requested = False
            self.quit()

    def _transaction_over(self, txn: _Transaction, result: TransactionDone | SMTPError) -> None:
        """Count one transaction in its send; report the send once none is left."""
        send = txn.send
        send.running -= 1
        if isinstance(result, TransactionDone):
            send.tally.delivered(result)
        else:
            send.tally.failed(txn.names(), result, txn.refused)
            if not isinstance(result, RecipientsRefused):
                self._drop(send)
        if send.running == 0 and not send.todo and send.handle in self._sends:
            del self._sends[send.handle]  # not reported yet (nor failed with the session)
            self._events.append(send.tally.result(send.handle))

    # -- failure ------------------------------------------------------------------

    def _fail_session(self, error: SMTPError) -> None:
        # A send split over transactions keeps what was delivered already.
        for send in list(self._sends.values()):
            if send.tally.parts:
                self._events.append(send.tally.done(send.handle))
        self._sends.clear()
        self._queue.clear()
        self._events.append(SessionFailed(error))

    def _fatal(self, error: SMTPError, *, quit: bool = True) -> None:
        """The session cannot continue: report, then QUIT if the conversation allows."""
        if self.state in (State.CLOSED, State.QUITTING):
            return
        if error.step is None:
            error.step = self._step()
        self._fail_session(error)
        if quit and (self.state, Input.QUIT) in TRANSITIONS:
            self._send_quit()
        else:
            self._close(clean=False)

    def _close(self, *, clean: bool) -> None:
        if self._sends:  # dropped by quit() mid-body, or before the session was set up
            step = self._step()
            self._fail_session(ConnectionLost("the connection was dropped by quit()", step=step))
        self._go(Input.CLOSE)
        self._pending.clear()
        self._txns.clear()
        self._queue.clear()
        self._encoder = None
        self._events.append(Closed(clean))


_HANDLERS: dict[Step, Callable[[ClientMachine, Reply, int | None], None]] = {
    Step.GREETING: ClientMachine._on_greeting,
    Step.EHLO: ClientMachine._on_ehlo,
    Step.HELO: ClientMachine._on_helo,
    Step.STARTTLS: ClientMachine._on_starttls,
    Step.AUTH: ClientMachine._on_auth,
    Step.MAIL: ClientMachine._on_mail,
    Step.RCPT: ClientMachine._on_rcpt,
    Step.DATA: ClientMachine._on_data,
    Step.BODY: ClientMachine._on_bdat,
    Step.DATA_END: ClientMachine._on_data_end,
    Step.RSET: ClientMachine._on_rset,
    Step.QUIT: ClientMachine._on_unexpected,
}
