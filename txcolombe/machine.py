"""The SMTP client as a sans-I/O state machine: bytes in, events and bytes out.

Theory of operation
-------------------
:class:`ClientMachine` holds every rule of the client's side of the
conversation and no I/O. Its driver (the Twisted protocol, or a test)
does four things and nothing else:

1. feed what the server sent to :meth:`~ClientMachine.receive_data`, and tell
   :meth:`~ClientMachine.connection_lost` / :meth:`~ClientMachine.timed_out`;
2. write :meth:`~ClientMachine.data_to_send` to the server;
3. act on each :meth:`~ClientMachine.next_event`: :class:`StartTLS` (start
   TLS, then call :meth:`~ClientMachine.tls_started`), :class:`BodyWanted`
   (stream the body through :meth:`~ClientMachine.send_body` and
   :meth:`~ClientMachine.end_body`), :class:`Ready`,
   :class:`TransactionDone`, :class:`TransactionFailed`,
   :class:`SessionFailed`, :class:`Closed` (close the transport);
4. start a timer for :attr:`~ClientMachine.waiting_for` and call
   :meth:`~ClientMachine.timed_out` when it fires.

Every command sent is queued with the step it belongs to, and each reply
answers the oldest queued command, so lock-step and pipelined (RFC 2920)
conversations are handled by the same code. The session goes
greeting → EHLO → [STARTTLS → EHLO] → [AUTH] → ready; each transaction goes
MAIL → RCPT… → DATA → body → end of data → ready, or RSET → ready after a
failure. A fatal error sends QUIT when the conversation still allows it.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from txcolombe.address import Mailbox, path
from txcolombe.auth import (
    Authentication,
    SASLClient,
    choose_mechanism,
    decode_challenge,
    encode_response,
)
from txcolombe.dotstuffing import DataEncoder
from txcolombe.dsn import DSN, RecipientOptions
from txcolombe.errors import (
    AuthenticationUnavailable,
    ConnectionFailed,
    ConnectionLost,
    ExtensionUnavailable,
    MessageTooLarge,
    RecipientsRefused,
    ResponseTimeout,
    SMTPError,
    STARTTLSUnavailable,
    Step,
    UnexpectedResponse,
    UsageError,
    UTF8Unsupported,
    error_for_reply,
)
from txcolombe.extensions import Extensions
from txcolombe.reply import Reply, ReplyParser


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


class State(enum.Enum):
    GREETING = "greeting"
    SETUP = "setup"
    TLS_WAIT = "waiting for TLS"
    READY = "ready"
    TRANSACTION = "transaction"
    BODY = "body"
    DATA_END = "end of data"
    RESETTING = "resetting"
    QUITTING = "quitting"
    CLOSED = "closed"


@dataclass(frozen=True)
class Envelope:
    """One message's envelope and the extensions it asks for.

    :ivar size: the body size when known (declared with SIZE).
    :ivar rcpt_options: DSN options of each recipient, in order (or empty).
    :ivar dsn: per-message DSN options (RET, ENVID).
    :ivar requiretls: ask for REQUIRETLS (RFC 8689).
    :ivar chunking: BDAT (RFC 3030): None to use it when CHUNKING and
        PIPELINING are offered, True to require it, False never.
    :ivar binary: send the body as it is with BODY=BINARYMIME (needs
        CHUNKING and BINARYMIME).
    :ivar reset_first: send RSET before MAIL (pipelined when possible): on
        a connection that sat idle, it proves the server is still there
        before anything of the message is at stake.
    :ivar body_type: the BODY the message was declared with (a relay passes
        it on): None says BODY=8BITMIME whenever the server offers it (the
        default); "8BITMIME" likewise; "7BIT" sends no BODY parameter.
    :ivar smtputf8: the message came with SMTPUTF8: say it whenever the
        server offers it (a non-ASCII address always needs it).
    :ivar utf8_headers: the header has UTF-8 (RFC 6532): like a non-ASCII
        address, the message cannot go to a server without SMTPUTF8.
    """

    sender: Mailbox | None
    recipients: tuple[Mailbox, ...]
    size: int | None = None
    all_or_nothing: bool = False
    rcpt_options: tuple[RecipientOptions, ...] = ()
    dsn: DSN | None = None
    requiretls: bool = False
    chunking: bool | None = None
    binary: bool = False
    reset_first: bool = False
    body_type: str | None = None
    smtputf8: bool = False
    utf8_headers: bool = False


# -- events -------------------------------------------------------------------


class Event:
    """Base class of what :meth:`ClientMachine.next_event` returns."""


@dataclass(frozen=True)
class Ready(Event):
    """The session is set up: transactions may start."""

    extensions: Extensions
    tls: bool


@dataclass(frozen=True)
class StartTLS(Event):
    """The server said 220 to STARTTLS: start TLS, then call ``tls_started``."""


@dataclass(frozen=True)
class BodyWanted(Event):
    """The server said 354: send the body."""


@dataclass(frozen=True)
class TransactionDone(Event):
    """The message was accepted."""

    accepted: dict[str, Reply]
    refused: dict[str, Reply]
    reply: Reply


@dataclass(frozen=True)
class TransactionFailed(Event):
    """The message was not accepted; the session can run another transaction."""

    error: SMTPError


@dataclass(frozen=True)
class SessionFailed(Event):
    """The session cannot go on; a :class:`Closed` follows."""

    error: SMTPError


@dataclass(frozen=True)
class Closed(Event):
    """The conversation is over: close the transport.

    ``clean`` is False when the transport must be aborted rather than closed
    gracefully (e.g. in the middle of a body).
    """

    clean: bool = True


# -- the machine -------------------------------------------------------------------


#: BDAT chunks are gathered up to this size before they are sent.
BDAT_CHUNK = 256 * 1024


@dataclass
class _Transaction:
    envelope: Envelope
    pipelined: bool
    bdat: bool = False
    mail_command: str = ""
    accepted: dict[str, Reply] = field(default_factory=dict)
    refused: dict[str, Reply] = field(default_factory=dict)
    error: SMTPError | None = None
    next_rcpt: int = 0
    rcpt_replies: int = 0
    empty_data: bool = False
    #: DATA or the first BDAT has left: the transaction can no longer end with RSET.
    data_sent: bool = False


Trace = Callable[[str, str], None]

#: Marks the RSET sent before a transaction's MAIL (Envelope.reset_first).
_PROBE = "probe"


class ClientMachine:
    """The client side of one SMTP session.

    :param domain: the EHLO name, already validated (see
        :func:`txcolombe.address.parse_domain`).
    :param tls: how to get TLS; with :attr:`TLSMode.IMPLICIT` the driver's
        transport is TLS already.
    :param authentication: credentials; AUTH is only ever sent under TLS.
    :param trace: called with ``(">" or "<", line)`` for each command and
        reply, credentials replaced by ``****``; for debug logs.
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
    ) -> None:
        self.domain = domain
        self.tls_mode = tls
        self.authentication = authentication
        self.server_host = server_host
        self.server_port = server_port
        self.tls_active = tls is TLSMode.IMPLICIT
        self.extensions = Extensions()
        self.state = State.GREETING
        self.trace = trace
        self._parser = ReplyParser()
        self._pending: deque[tuple[Step, str | None]] = deque([(Step.GREETING, None)])
        self._outbox: list[bytes] = []
        self._events: deque[Event] = deque()
        self._sasl: SASLClient | None = None
        self._txns: deque[_Transaction] = deque()
        self._encoder: DataEncoder | None = None
        self._bdat_buffer: list[bytes] = []
        #: Counts replies, so a driver can restart its timer on each one.
        self.replies_received = 0
        self._bdat_size = 0
        self._quit_requested = False

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
        """The step whose timeout should run now, or None when idle."""
        if self.state is State.BODY:
            return Step.BODY
        if self.state in (State.CLOSED, State.TLS_WAIT):
            return None
        return self._pending[0][0] if self._pending else None

    @property
    def can_start(self) -> bool:
        """True when :meth:`start_transaction` may be called now.

        With PIPELINING, the next transaction may start as soon as the
        previous one's end of data (or RSET) is sent: its MAIL, RCPT and DATA
        then leave in the same write as the final dot (RFC 2920 §3.1).
        """
        if self._quit_requested:
            return False
        state = self.state
        if state is State.READY:
            return True
        return self.pipelining and (state is State.DATA_END or state is State.RESETTING)

    @property
    def extensions(self) -> Extensions:
        """What the server advertised in its last EHLO reply."""
        return self._extensions

    @extensions.setter
    def extensions(self, extensions: Extensions) -> None:
        self._extensions = extensions
        # Asked for every message: worth keeping at hand.
        self.pipelining = "PIPELINING" in extensions

    def receive_data(self, data: bytes) -> None:
        """Feed bytes received from the server."""
        if self.state in (State.CLOSED, State.TLS_WAIT):
            return
        self._parser.feed(data)
        while self.state not in (State.CLOSED, State.TLS_WAIT):
            try:
                reply = self._parser.next_reply()
            except SMTPError as error:
                error.step = self.waiting_for
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
        self.state = State.SETUP
        self._send(f"EHLO {self.domain}", Step.EHLO)

    def connection_lost(self, error: SMTPError | None = None) -> None:
        """The transport closed; ``error`` says why when the driver knows."""
        if self.state is State.CLOSED:
            return
        step = self.waiting_for
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
        step = self.waiting_for
        if self.state is State.QUITTING:
            self._close(clean=False)
            return
        what = step.value if step is not None else "the server"
        error = ResponseTimeout(f"no reply in time to {what}", step=step)
        error.maybe_delivered = self._maybe_delivered(step)
        self._fatal(error, quit=True)

    def _maybe_delivered(self, step: Step | None) -> bool:
        """After the final dot of a real body, the server may have the message."""
        return step is Step.DATA_END and bool(self._txns) and not self._txns[0].empty_data

    def quit(self) -> None:
        """End the session politely: QUIT, then :class:`Closed` on its reply.

        Transactions already under way finish first; in the middle of a body,
        or before the session is set up, the connection is simply dropped.
        """
        if self.state in (State.QUITTING, State.CLOSED):
            return
        if self.state in (State.BODY, State.TLS_WAIT, State.GREETING):
            self._close(clean=False)
            return
        if self._txns:
            self._quit_requested = True
            return
        self.state = State.QUITTING
        self._send("QUIT", Step.QUIT)

    # -- transactions ----------------------------------------------------------

    def start_transaction(self, envelope: Envelope) -> None:
        """Begin a transaction; only when :attr:`can_start`.

        Its events (:class:`BodyWanted`, then :class:`TransactionDone` or
        :class:`TransactionFailed`) come in the order transactions started.

        :raises UsageError: the envelope cannot go to this server (SMTPUTF8,
            SIZE), or the session cannot start one now. Nothing is sent then.
        """
        if not self.can_start:
            raise UsageError(f"cannot start a transaction in state {self.state.value}")
        if not envelope.recipients:
            raise UsageError("a message needs at least one recipient")
        bdat = self._use_bdat(envelope)
        params = self._mail_parameters(envelope, bdat)
        self.state = State.TRANSACTION
        txn = _Transaction(envelope, pipelined=self.pipelining, bdat=bdat)
        self._txns.append(txn)
        txn.mail_command = f"MAIL FROM:{path(envelope.sender)}{params}"
        if envelope.reset_first:
            self._send("RSET", Step.RSET, _PROBE)
            if not txn.pipelined:
                return  # MAIL follows the RSET's reply
        self._send(txn.mail_command, Step.MAIL)
        if txn.pipelined:
            while txn.next_rcpt < len(envelope.recipients):
                self._send_next_rcpt(txn)
            if self._data_pipelined(txn):
                txn.data_sent = True
                self._send("DATA", Step.DATA)

    @staticmethod
    def _data_pipelined(txn: _Transaction) -> bool:
        """DATA goes with MAIL and RCPT, unless the RCPT replies must be seen first."""
        return txn.pipelined and not txn.envelope.all_or_nothing and not txn.bdat

    def _use_bdat(self, envelope: Envelope) -> bool:
        offered = "CHUNKING" in self.extensions
        if envelope.binary or envelope.chunking:
            if not offered:
                raise ExtensionUnavailable("CHUNKING")
            if not self.pipelining:
                raise ExtensionUnavailable(
                    "PIPELINING", "txcolombe sends BDAT only to servers that offer PIPELINING"
                )
            if envelope.binary and "BINARYMIME" not in self.extensions:
                raise ExtensionUnavailable("BINARYMIME")
            return True
        return envelope.chunking is None and offered and self.pipelining

    def _mail_parameters(self, envelope: Envelope, bdat: bool) -> str:
        params = ""
        mailboxes = [*envelope.recipients]
        if envelope.sender is not None:
            mailboxes.append(envelope.sender)
        address = any(m.needs_smtputf8 for m in mailboxes)
        if "SMTPUTF8" in self.extensions:
            if address or envelope.smtputf8 or envelope.utf8_headers:
                params += " SMTPUTF8"
        elif address or envelope.utf8_headers:
            what = "a non-ASCII address" if address else "a UTF-8 header (RFC 6532)"
            raise UTF8Unsupported(
                f"{what} needs SMTPUTF8, which the server does not offer", step=Step.MAIL
            )
        if envelope.binary:
            params += " BODY=BINARYMIME"
        elif "8BITMIME" in self.extensions and envelope.body_type != "7BIT":
            params += " BODY=8BITMIME"
        if envelope.size is not None and "SIZE" in self.extensions:
            limit = self.extensions.size
            if limit is not None and envelope.size > limit:
                raise MessageTooLarge(
                    f"the message ({envelope.size} octets) is over the server's"
                    f" limit of {limit} octets",
                    step=Step.MAIL,
                )
            params += f" SIZE={envelope.size}"
        wants_dsn = envelope.dsn is not None or any(
            o.notify or o.orcpt is not None for o in envelope.rcpt_options
        )
        if wants_dsn:
            if "DSN" not in self.extensions:
                raise ExtensionUnavailable("DSN")
            if envelope.dsn is not None:
                params += envelope.dsn.mail_parameters()
        if envelope.requiretls:
            if "REQUIRETLS" not in self.extensions or not self.tls_active:
                raise ExtensionUnavailable(
                    "REQUIRETLS", "REQUIRETLS needs TLS and a server that offers it"
                )
            params += " REQUIRETLS"
        return params

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
        if txn.error is not None:
            return  # a BDAT was refused: the rest of the body is dropped
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

    @property
    def body_refused(self) -> bool:
        """True when the server refused a BDAT chunk: stop the body, call :meth:`end_body`."""
        return self.state is State.BODY and bool(self._txns) and self._txns[0].error is not None

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
            if txn.error is not None:
                self._abandon(txn, txn.error)
                return
            if tail:
                self._bdat_buffer.append(tail)
            self._send_bdat(last=True)
        else:
            self._outbox.append(tail)
            if self.trace is not None:
                self.trace(">", f"<{octets} octets of data>")
            self._pending.append((Step.DATA_END, None))
        self.state = State.DATA_END

    # -- internals ------------------------------------------------------------------

    def _send(
        self, line: str, step: Step, arg: str | None = None, *, shown: str | None = None
    ) -> None:
        if self.trace is not None:
            self.trace(">", shown if shown is not None else line)
        self._outbox.append(line.encode("utf-8") + b"\r\n")
        self._pending.append((step, arg))

    def _send_next_rcpt(self, txn: _Transaction) -> None:
        index = txn.next_rcpt
        rcpt = txn.envelope.recipients[index]
        txn.next_rcpt += 1
        options = txn.envelope.rcpt_options
        params = options[index].parameters() if index < len(options) else ""
        self._send(f"RCPT TO:{path(rcpt)}{params}", Step.RCPT, str(rcpt))

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

    def _on_greeting(self, reply: Reply, _: str | None) -> None:
        if reply.code != 220:
            self._fatal(error_for_reply(reply, Step.GREETING, "the server refused the session"))
            return
        self.state = State.SETUP
        self._send(f"EHLO {self.domain}", Step.EHLO)

    def _on_ehlo(self, reply: Reply, _: str | None) -> None:
        if reply.code != 250:
            if reply.code in (500, 502) and not self._needs_tls():
                self._send(f"HELO {self.domain}", Step.HELO)
                return
            self._fatal(error_for_reply(reply, Step.EHLO))
            return
        self.extensions = Extensions.from_reply(reply)
        self._after_hello()

    def _on_helo(self, reply: Reply, _: str | None) -> None:
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

    def _on_starttls(self, reply: Reply, _: str | None) -> None:
        if reply.code != 220:
            self._fatal(error_for_reply(reply, Step.STARTTLS))
            return
        self.state = State.TLS_WAIT
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

    def _on_auth(self, reply: Reply, _: str | None) -> None:
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
        self.state = State.READY
        self._events.append(Ready(self.extensions, self.tls_active))

    def _finish(self, event: TransactionDone | TransactionFailed) -> None:
        """The oldest transaction is over; report it, then QUIT if asked to."""
        self._txns.popleft()
        self._events.append(event)
        if self._txns:
            return
        self.state = State.READY
        if self._quit_requested:
            self._quit_requested = False
            self.quit()

    def cancel_transaction(self, index: int) -> bool:
        """Abandon the ``index``-th running transaction (0: the oldest) with RSET.

        Possible only before its DATA (or first BDAT) leaves; it then ends
        with RSET at the next reply it gets, and with a
        :class:`TransactionFailed` event like any refused one, and the
        session goes on.

        :returns: False when the body is under way (or DATA was pipelined):
            only dropping the connection can stop it then.
        """
        txn = self._txns[index]
        if txn.data_sent or self.state not in (State.TRANSACTION, State.RESETTING):
            return False
        if txn.error is None:
            txn.error = UsageError("the transaction was cancelled", step=self.waiting_for)
        return True

    # -- transaction replies --------------------------------------------------------

    def _on_mail(self, reply: Reply, _: str | None) -> None:
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

    def _on_rcpt(self, reply: Reply, rcpt: str | None) -> None:
        txn = self._current()
        # Counted, not read off accepted/refused: a recipient may be listed twice.
        txn.rcpt_replies += 1
        last = txn.rcpt_replies == len(txn.envelope.recipients)
        if txn.error is not None:
            # MAIL failed (these are the pipelined replies that follow) or the
            # transaction was cancelled. Without a pipelined DATA to answer
            # last (all-or-nothing), end here.
            if not txn.pipelined or (last and not self._data_pipelined(txn)):
                self._abandon(txn, txn.error)
            return
        assert rcpt is not None
        (txn.accepted if reply.code // 100 == 2 else txn.refused)[rcpt] = reply
        if txn.next_rcpt < len(txn.envelope.recipients):
            if not txn.pipelined:
                self._send_next_rcpt(txn)
            return
        if not last:
            return
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

    def _recipients_error(self, txn: _Transaction) -> SMTPError | None:
        if not txn.accepted:
            return RecipientsRefused("no recipient was accepted", txn.refused)
        if txn.envelope.all_or_nothing and txn.refused:
            return RecipientsRefused("not every recipient was accepted", txn.refused)
        return None

    def _on_data(self, reply: Reply, _: str | None) -> None:
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
        self.state = State.BODY
        self._encoder = DataEncoder(
            allow_8bit="8BITMIME" in self.extensions or txn.envelope.binary,
            stuff=not txn.bdat,
            raw=txn.envelope.binary,
        )
        self._events.append(BodyWanted())

    def _on_bdat(self, reply: Reply, _: str | None) -> None:
        txn = self._current()
        if reply.code // 100 != 2 and txn.error is None:
            txn.error = error_for_reply(reply, Step.BODY, "message refused")

    def _on_data_end(self, reply: Reply, _: str | None) -> None:
        txn = self._current()
        if txn.error is not None and (txn.empty_data or txn.bdat):
            self._abandon(txn, txn.error)
        elif reply.code // 100 == 2:
            self._finish(TransactionDone(txn.accepted, txn.refused, reply))
        else:
            self._finish(
                TransactionFailed(error_for_reply(reply, Step.DATA_END, "message refused"))
            )

    def _abandon(self, txn: _Transaction, error: SMTPError) -> None:
        """End a failed transaction with RSET; report it once RSET is answered."""
        txn.error = error
        self.state = State.RESETTING
        self._send("RSET", Step.RSET)

    def _on_rset(self, reply: Reply, arg: str | None) -> None:
        txn = self._current()
        if arg == _PROBE:
            if reply.code // 100 != 2:
                self._fatal(error_for_reply(reply, Step.RSET))
            elif not txn.pipelined:
                self._send(txn.mail_command, Step.MAIL)
            return
        if reply.code // 100 != 2:
            self._txns.popleft()
            self._events.append(TransactionFailed(txn.error or error_for_reply(reply, Step.RSET)))
            self._fatal(error_for_reply(reply, Step.RSET))
            return
        self._finish(TransactionFailed(txn.error or error_for_reply(reply, Step.RSET)))

    def _on_unexpected(self, reply: Reply, _: str | None) -> None:
        self._fatal(UnexpectedResponse("unexpected reply", reply=reply))

    def _current(self) -> _Transaction:
        if not self._txns:
            raise UnexpectedResponse("a transaction reply outside a transaction")
        return self._txns[0]

    # -- failure ------------------------------------------------------------------

    def _fail_session(self, error: SMTPError) -> None:
        self._events.append(SessionFailed(error))

    def _fatal(self, error: SMTPError, *, quit: bool = True) -> None:
        """The session cannot continue: report, then QUIT if the conversation allows."""
        if self.state in (State.CLOSED, State.QUITTING):
            return
        if error.step is None:
            error.step = self.waiting_for
        self._fail_session(error)
        if quit and self.state not in (State.BODY, State.TLS_WAIT):
            self.state = State.QUITTING
            self._send("QUIT", Step.QUIT)
        else:
            self._close(clean=False)

    def _close(self, *, clean: bool) -> None:
        self.state = State.CLOSED
        self._pending.clear()
        self._txns.clear()
        self._encoder = None
        self._events.append(Closed(clean))


_HANDLERS: dict[Step, Callable[[ClientMachine, Reply, str | None], None]] = {
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
    Step.NOOP: ClientMachine._on_unexpected,
    Step.QUIT: ClientMachine._on_unexpected,
}
