"""The SMTP server as a sans-I/O state machine: bytes in, events and bytes out.

Theory of operation
-------------------
:class:`ServerMachine` holds every rule of the server's side of the
conversation, and no I/O. Its driver (the Twisted protocol, or a test):

1. feeds what the client sent to :meth:`~ServerMachine.receive_data`, and
   tells :meth:`~ServerMachine.timed_out` / :meth:`~ServerMachine.connection_lost`;
2. writes :meth:`~ServerMachine.data_to_send` to the client;
3. acts on each :meth:`~ServerMachine.next_event`:

   - :class:`StartTLS`: start TLS, then call :meth:`~ServerMachine.tls_started`;
   - :class:`AuthRequest`: check the credentials, then call
     :meth:`~ServerMachine.auth_result`;
   - :class:`MessageReceived`: store the message, then call
     :meth:`~ServerMachine.message_result` with the reply to give;
   - :class:`BodyData` (only with ``body_chunk``): the first part or the
     next part of a message being received; :class:`MessageReceived` then
     carries only what came after the last part. :class:`DataAborted`: the
     message those parts belong to will not be completed (refused);
   - :class:`Delay`: wait that long, then call :meth:`~ServerMachine.wake`
     (a client making errors is slowed down);
   - :class:`Rejected`: a policy refusal, for the log (nothing to do);
   - :class:`Close`: close the transport after writing what is pending.

While an answer is awaited the machine reads no further command: pipelined
commands wait in its buffer, and are answered in order once it comes.

Intake rules enforced here: STARTTLS discards anything pipelined after it;
AUTH is offered and accepted only under TLS; recipients outside
``local_domains`` need relay permission (a trusted network or AUTH), else
554 5.7.1; at most ``max_recipients`` (452) and ``max_size`` octets (552);
in DATA, a bare CR or LF (SMTP smuggling), a line over 998 octets or
``max_hops`` ``Received:`` headers reject the message. Every buffer is bounded,
and with ``body_chunk`` so is the body held: past that many octets it is
handed to the driver as it comes. After ``soft_error_limit`` errors each
error reply is delayed by ``error_sleep`` seconds; at ``max_errors`` the
connection is closed (Postfix's smtpd_soft_error_limit, smtpd_error_sleep_time
and smtpd_hard_error_limit).
"""

from __future__ import annotations

import enum
import functools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from txcolombe.codec.address import Mailbox, parse_domain
from txcolombe.codec.command import CommandSyntaxError, parse_command, parse_mail, parse_rcpt
from txcolombe.codec.errors import InvalidAddress
from txcolombe.codec.reply import Reply
from txcolombe.codec.sasl import decode_base64

#: RFC 5321 §4.5.3.1.4 says 512; SMTPUTF8 and parameters make lines longer.
MAX_COMMAND_LINE = 2048
#: RFC 4954 §4: an AUTH line may be 12288 octets.
MAX_AUTH_LINE = 12288
#: RFC 5321 §4.5.3.1.6: 998 octets of text per line.
MAX_TEXT_LINE = 998


@dataclass(frozen=True)
class ServerConfig:
    """What the server offers and enforces.

    :ivar hostname: our name, in the greeting, EHLO reply and Received header.
    :ivar tls_available: STARTTLS may be offered (a certificate is configured).
    :ivar auth_enabled: AUTH PLAIN/LOGIN is offered (under TLS only).
    :ivar local_domains: recipient domains accepted from anyone.
    :ivar max_errors: errors after which the connection is closed (421).
    :ivar soft_error_limit: errors after which every error reply is delayed
        by ``error_sleep`` seconds.
    :ivar max_connections: concurrent connections in all (421 beyond).
    :ivar max_connections_per_client: concurrent connections from one
        address (421 beyond), except from clients that may relay.
    """

    hostname: str
    max_size: int = 10 * 1024 * 1024
    max_recipients: int = 100
    max_hops: int = 100
    max_errors: int = 20
    tls_available: bool = False
    auth_enabled: bool = False
    local_domains: frozenset[str] = frozenset()
    software: str = "txcolombe"
    soft_error_limit: int = 10
    error_sleep: float = 1.0
    max_connections: int = 100
    max_connections_per_client: int = 50


class State(enum.Enum):
    COMMAND = "command"
    DATA = "data"
    AUTH_INPUT = "auth input"
    WAIT_TLS = "waiting for TLS"
    WAIT_AUTH = "waiting for the credentials check"
    WAIT_STORE = "waiting for the message to be stored"
    SLEEP = "slowing down a client that makes errors"
    CLOSED = "closed"


@dataclass(frozen=True)
class Envelope:
    """A received message's envelope and trace information.

    :ivar protocol: the ``with`` keyword of the Received header (RFC 3848,
        RFC 6531): SMTP, ESMTP, ESMTPS, ESMTPSA, UTF8SMTPSA...
    :ivar body_type: the client's BODY parameter (7BIT, 8BITMIME) or None.
    :ivar tls_details: the TLS protocol and cipher, as the driver told them.
    """

    sender: Mailbox | None
    recipients: tuple[Mailbox, ...]
    helo: str
    client_address: str
    protocol: str
    tls: bool
    authenticated: str | None
    smtputf8: bool = False
    body_type: str | None = None
    tls_details: str | None = None


# -- events -------------------------------------------------------------------


class Event:
    """Base class of what :meth:`ServerMachine.next_event` returns."""


@dataclass(frozen=True)
class StartTLS(Event):
    """The client asked for TLS and got 220: start TLS, then ``tls_started()``."""


@dataclass(frozen=True)
class AuthRequest(Event):
    """Check these credentials, then call ``auth_result()``."""

    mechanism: str
    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class MessageReceived(Event):
    """A complete message: store it, then call ``message_result()``.

    :ivar data: the message as received, dot-unstuffed, every line ending in
        CRLF; after :class:`BodyData` parts, only the rest.
    """

    envelope: Envelope
    data: bytes = field(repr=False)


@dataclass(frozen=True)
class BodyData(Event):
    """Part of the body of the message in DATA (dot-unstuffed, whole lines),
    handed over because more than ``body_chunk`` octets are held."""

    envelope: Envelope
    data: bytes = field(repr=False)


@dataclass(frozen=True)
class DataAborted(Event):
    """The message whose parts went out as :class:`BodyData` is refused:
    forget those parts."""


@dataclass(frozen=True)
class Delay(Event):
    """Wait ``seconds``, then call ``wake()``: a client making errors."""

    seconds: float


@dataclass(frozen=True)
class Rejected(Event):
    """A policy refusal (Postfix's ``NOQUEUE: reject:``), for the log.

    :ivar stage: the command refused (CONNECT, MAIL, RCPT, DATA, END-OF-MESSAGE).
    """

    stage: str
    reply: Reply
    sender: Mailbox | None
    recipient: Mailbox | None
    helo: str | None


@dataclass(frozen=True)
class Close(Event):
    """Close the connection once the pending bytes are written."""


def _r(code: int, text: str) -> Reply:
    return Reply.of(code, text)


@functools.lru_cache(maxsize=16)
def _greeting(hostname: str, software: str) -> bytes:
    return _r(220, f"{hostname} ESMTP {software}").to_bytes()


# The replies of the common path, encoded once.
_DATA_INTRO = _r(354, "End data with <CR><LF>.<CR><LF>").to_bytes()
_OK = _r(250, "2.0.0 Ok").to_bytes()
_MAIL_OK = _r(250, "2.1.0 Ok").to_bytes()
_RCPT_OK = _r(250, "2.1.5 Ok").to_bytes()
_BYE = _r(221, "2.0.0 Bye")


class ServerMachine:
    """One SMTP server conversation.

    :param client_address: the client's IP address (for Received).
    :param relay_allowed: the client may relay without AUTH (trusted network).
    :param tls: the connection is TLS from the start (implicit TLS).
    :param body_chunk: hand the body over in :class:`BodyData` parts once
        more than this many octets of it are held (None: hold it all).
    :param mail_check: asked at each MAIL with the sender; a reply refuses it
        (e.g. too little free space in the spool).
    """

    def __init__(
        self,
        config: ServerConfig,
        *,
        client_address: str,
        relay_allowed: bool = False,
        tls: bool = False,
        body_chunk: int | None = None,
        mail_check: Callable[[Mailbox | None], Reply | None] | None = None,
    ) -> None:
        self.config = config
        self.body_chunk = body_chunk
        self.mail_check = mail_check
        self.tls_details: str | None = None
        self.client_address = client_address
        self.relay_allowed = relay_allowed
        self.tls = tls
        self.state = State.COMMAND
        self.authenticated: str | None = None
        self.helo: str | None = None
        self.esmtp = False
        self._in = bytearray()
        self._out: list[bytes] = []
        self._events: deque[Event] = deque()
        self._errors = 0
        self._reset_transaction()
        self._auth_mechanism = ""
        self._auth_username: str | None = None
        self._skip_line = False
        self._delayed: Reply | None = None
        self._closing: Reply | None = None
        self._reply(_greeting(config.hostname, config.software))

    # -- the driver's side -------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Bytes from the client."""
        if self.state is State.CLOSED:
            return
        self._in += data
        self._run()

    def data_to_send(self) -> bytes:
        """Bytes to write to the client (replies), or b""."""
        out, self._out = b"".join(self._out), []
        return out

    def next_event(self) -> Event | None:
        """The next event for the driver, or None."""
        return self._events.popleft() if self._events else None

    @property
    def buffered(self) -> int:
        """Octets received and not yet read (pipelined input)."""
        return len(self._in)

    @property
    def waiting(self) -> bool:
        """True while an answer from the driver is awaited (no client timeout then)."""
        return self.state in (State.WAIT_TLS, State.WAIT_AUTH, State.WAIT_STORE, State.SLEEP)

    @property
    def errors(self) -> int:
        """Errors the client made so far."""
        return self._errors

    def tls_started(self) -> None:
        """TLS is up: the session starts over (RFC 3207 §4.2)."""
        if self.state is not State.WAIT_TLS:
            return
        self.tls = True
        self.helo = None
        self.esmtp = False
        self.authenticated = None
        self._reset_transaction()
        self.state = State.COMMAND
        self._run()

    def auth_result(self, ok: bool) -> None:
        """The answer to an :class:`AuthRequest`."""
        if self.state is not State.WAIT_AUTH:
            return
        self.state = State.COMMAND
        if ok:
            self.authenticated = self._auth_username
            self._reply(_r(235, "2.7.0 Authentication successful"))
        else:
            self._error(_r(535, "5.7.8 Authentication credentials invalid"))
        self._auth_username = None
        self._run()

    def message_result(self, reply: Reply) -> None:
        """The reply to give for a :class:`MessageReceived` (250 once it is stored)."""
        if self.state is not State.WAIT_STORE:
            return
        self.state = State.COMMAND
        self._reset_transaction()
        self._reply(reply)
        if self._closing is not None:
            self._close(self._closing)
            return
        self._run()

    def wake(self) -> None:
        """The :class:`Delay` is over: give the delayed reply, read on."""
        if self.state is not State.SLEEP:
            return
        self.state = State.COMMAND
        if self._delayed is not None:
            self._reply(self._delayed)
            self._delayed = None
        self._run()

    def shutdown(self, reply: Reply) -> None:
        """The server is stopping: close with ``reply`` now, or, while a
        message is being stored, right after its reply (so that the client
        learns its fate)."""
        if self.state is State.CLOSED:
            return
        if self.state is State.WAIT_STORE:
            self._closing = reply
            return
        if self.state is State.DATA and self._chunked:
            self._events.append(DataAborted())
        self._close(reply)

    def timed_out(self) -> None:
        """The client was idle too long."""
        if self.state is State.CLOSED:
            return
        self._close(_r(421, f"4.4.2 {self.config.hostname} Error: timeout exceeded"))

    def connection_lost(self) -> None:
        """The connection is gone; nothing more will be sent."""
        self.state = State.CLOSED
        self._in.clear()

    # -- internals ------------------------------------------------------------------

    def _reset_transaction(self) -> None:
        self.sender: Mailbox | None = None
        self.in_transaction = False
        self.recipients: list[Mailbox] = []
        self._smtputf8 = False
        self._body_type: str | None = None
        self._data: list[bytes] = []
        self._held = 0
        self._chunked = False
        self._data_size = 0
        self._data_problem: Reply | None = None
        self._in_headers = True
        self._hops = 0
        self._long_line = False
        self._after_crlf = True

    def _reply(self, reply: Reply | bytes) -> None:
        self._out.append(reply if isinstance(reply, bytes) else reply.to_bytes())

    def _error(self, reply: Reply) -> None:
        self._errors += 1
        cfg = self.config
        if self._errors >= cfg.max_errors and self.state is not State.CLOSED:
            self._reply(reply)
            too_many = _r(421, f"4.7.0 {cfg.hostname} Error: too many errors")
            self._reject("CONNECT", too_many, self._first_recipient())
            self._close(too_many)
        elif self._errors > cfg.soft_error_limit and cfg.error_sleep > 0:
            self._delayed = reply
            self.state = State.SLEEP
            self._events.append(Delay(cfg.error_sleep))
        else:
            self._reply(reply)

    def _first_recipient(self) -> Mailbox | None:
        return self.recipients[0] if self.recipients else None

    def _reject(self, stage: str, reply: Reply, recipient: Mailbox | None) -> None:
        self._events.append(Rejected(stage, reply, self.sender, recipient, self.helo))

    def _close(self, reply: Reply) -> None:
        self._reply(reply)
        self.state = State.CLOSED
        self._in.clear()
        self._events.append(Close())

    def _run(self) -> None:
        while self.state in (State.COMMAND, State.AUTH_INPUT, State.DATA):
            if self.state is State.DATA:
                if not self._data_bytes():
                    return
                continue
            limit = MAX_AUTH_LINE if self.state is State.AUTH_INPUT else MAX_COMMAND_LINE
            end = self._in.find(b"\n")
            if end < 0:
                if len(self._in) > limit:
                    self._in.clear()
                    self._skip_line = True
                return
            line = bytes(self._in[:end])
            del self._in[: end + 1]
            if line.endswith(b"\r"):
                line = line[:-1]
            if self._skip_line or len(line) > limit:
                self._skip_line = False
                if self.state is State.AUTH_INPUT:
                    self.state = State.COMMAND
                self._error(_r(500, "5.5.6 Line too long"))
                continue
            if self.state is State.AUTH_INPUT:
                self._auth_input(line)
            else:
                self._command(line)

    # -- commands ---------------------------------------------------------------------

    def _command(self, line: bytes) -> None:
        try:
            command = parse_command(line)
        except CommandSyntaxError as error:
            self._error(_r(error.code, error.text))
            return
        handler = getattr(self, f"_do_{command.verb.lower()}", None)
        if handler is None:
            self._error(_r(500, "5.5.2 Error: command not recognized"))
            return
        try:
            handler(command.argument)
        except CommandSyntaxError as error:
            self._error(_r(error.code, error.text))

    def _ehlo_lines(self) -> list[str]:
        cfg = self.config
        lines = [
            f"{cfg.hostname} Hello {self.helo} [{self.client_address}]",
            "PIPELINING",
            f"SIZE {cfg.max_size}",
            "8BITMIME",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
        ]
        if cfg.tls_available and not self.tls:
            lines.append("STARTTLS")
        if cfg.auth_enabled and self.tls:
            lines.append("AUTH PLAIN LOGIN")
        return lines

    def _greet(self, argument: str, *, esmtp: bool) -> None:
        name = argument.split(" ")[0] if argument else ""
        if not name:
            raise CommandSyntaxError(501, "5.5.4 Syntax: EHLO hostname")
        try:
            domain = parse_domain(name)
        except InvalidAddress:
            raise CommandSyntaxError(501, "5.5.4 Invalid EHLO/HELO domain") from None
        self.helo = domain
        self.esmtp = esmtp
        self._reset_transaction()
        if esmtp:
            self._reply(Reply.of(250, *self._ehlo_lines()))
        else:
            self._reply(_r(250, self.config.hostname))

    def _do_ehlo(self, argument: str) -> None:
        self._greet(argument, esmtp=True)

    def _do_helo(self, argument: str) -> None:
        self._greet(argument, esmtp=False)

    def _do_mail(self, argument: str) -> None:
        if self.helo is None:
            raise CommandSyntaxError(503, "5.5.1 Error: send HELO/EHLO first")
        if self.in_transaction:
            raise CommandSyntaxError(503, "5.5.1 Error: nested MAIL command")
        parsed = parse_mail(argument)
        params = parsed.params
        if params and not self.esmtp:
            raise CommandSyntaxError(555, "5.5.4 Parameters need EHLO")
        smtputf8 = False
        body_type = None
        for key, value in params.items():
            if key == "SIZE":
                if value is None or not value.isdigit():
                    raise CommandSyntaxError(501, "5.5.4 Bad SIZE parameter")
                if int(value) > self.config.max_size:
                    too_big = _r(552, "5.3.4 Message size exceeds fixed limit")
                    self._events.append(Rejected("MAIL", too_big, parsed.mailbox, None, self.helo))
                    raise CommandSyntaxError(552, "5.3.4 Message size exceeds fixed limit")
            elif key == "BODY":
                if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                    raise CommandSyntaxError(501, "5.5.4 Bad BODY parameter")
                body_type = value.upper()
            elif key == "SMTPUTF8":
                if value is not None:
                    raise CommandSyntaxError(501, "5.5.4 SMTPUTF8 takes no value")
                smtputf8 = True
            elif key == "AUTH":
                pass  # RFC 4954 §5: may be ignored
            else:
                raise CommandSyntaxError(555, f"5.5.4 Unsupported parameter {key}")
        if parsed.mailbox is not None and parsed.mailbox.needs_smtputf8 and not smtputf8:
            raise CommandSyntaxError(553, "5.6.7 Non-ASCII address needs SMTPUTF8")
        if self.mail_check is not None:
            refusal = self.mail_check(parsed.mailbox)
            if refusal is not None:
                self._events.append(Rejected("MAIL", refusal, parsed.mailbox, None, self.helo))
                self._error(refusal)
                return
        self.sender = parsed.mailbox
        self.in_transaction = True
        self._smtputf8 = smtputf8
        self._body_type = body_type
        self._reply(_MAIL_OK)

    def _do_rcpt(self, argument: str) -> None:
        if not self.in_transaction:
            raise CommandSyntaxError(503, "5.5.1 Error: need MAIL command")
        parsed = parse_rcpt(argument)
        if parsed.params:
            raise CommandSyntaxError(555, "5.5.4 Unsupported RCPT parameters")
        mailbox = parsed.mailbox
        assert mailbox is not None
        if mailbox.needs_smtputf8 and not self._smtputf8:
            raise CommandSyntaxError(553, "5.6.7 Non-ASCII address needs SMTPUTF8")
        if len(self.recipients) >= self.config.max_recipients:
            self._reject("RCPT", _r(452, "4.5.3 Error: too many recipients"), mailbox)
            raise CommandSyntaxError(452, "4.5.3 Error: too many recipients")
        local = mailbox.domain is None or mailbox.domain.lower() in self.config.local_domains
        if not local and not (self.relay_allowed or self.authenticated is not None):
            self._reject("RCPT", _r(554, "5.7.1 Relay access denied"), mailbox)
            raise CommandSyntaxError(554, "5.7.1 Relay access denied")
        self.recipients.append(mailbox)
        self._reply(_RCPT_OK)

    def _do_data(self, argument: str) -> None:
        if argument:
            raise CommandSyntaxError(501, "5.5.4 Syntax: DATA")
        if not self.in_transaction:
            raise CommandSyntaxError(503, "5.5.1 Error: need MAIL command")
        if not self.recipients:
            raise CommandSyntaxError(554, "5.5.1 Error: no valid recipients")
        self.state = State.DATA
        self._reply(_DATA_INTRO)

    def _do_rset(self, argument: str) -> None:
        self._reset_transaction()
        self._reply(_OK)

    def _do_noop(self, argument: str) -> None:
        self._reply(_OK)

    def _do_vrfy(self, argument: str) -> None:
        self._reply(_r(252, "2.5.0 Cannot VRFY user, but will accept message and attempt delivery"))

    def _do_help(self, argument: str) -> None:
        self._reply(_r(214, "2.0.0 See RFC 5321"))

    def _do_quit(self, argument: str) -> None:
        self._close(_BYE)

    def _do_starttls(self, argument: str) -> None:
        if not self.config.tls_available:
            raise CommandSyntaxError(502, "5.5.1 Error: command not implemented")
        if self.tls:
            raise CommandSyntaxError(503, "5.5.1 Error: TLS already active")
        if argument:
            raise CommandSyntaxError(501, "5.5.4 Syntax: STARTTLS")
        self._reply(_r(220, "2.0.0 Ready to start TLS"))
        # RFC 3207 §4.2 / CVE-2011-0411: nothing pipelined after STARTTLS counts.
        self._in.clear()
        self.state = State.WAIT_TLS
        self._events.append(StartTLS())

    # -- AUTH (RFC 4954) ------------------------------------------------------------

    def _do_auth(self, argument: str) -> None:
        if not self.config.auth_enabled:
            raise CommandSyntaxError(502, "5.5.1 Error: authentication not enabled")
        if not self.tls:
            raise CommandSyntaxError(
                538, "5.7.11 Encryption required for requested authentication mechanism"
            )
        if not self.esmtp:
            raise CommandSyntaxError(503, "5.5.1 Error: send EHLO first")
        if self.authenticated is not None:
            raise CommandSyntaxError(503, "5.5.1 Error: already authenticated")
        if self.in_transaction:
            raise CommandSyntaxError(503, "5.5.1 Error: MAIL transaction in progress")
        mechanism, _, initial = argument.partition(" ")
        mechanism = mechanism.upper()
        initial = initial.strip()
        if mechanism not in ("PLAIN", "LOGIN"):
            raise CommandSyntaxError(504, "5.5.4 Unrecognized authentication type")
        self._auth_mechanism = mechanism
        self._auth_username = None
        if mechanism == "PLAIN":
            if initial:
                self._auth_plain(initial)
            else:
                self.state = State.AUTH_INPUT
                self._reply(Reply(334, ("",)))
        elif initial:
            self._auth_username = self._decode(initial)
            if self._auth_username is not None:
                self.state = State.AUTH_INPUT
                self._reply(Reply(334, ("UGFzc3dvcmQ6",)))
        else:
            self.state = State.AUTH_INPUT
            self._reply(Reply(334, ("VXNlcm5hbWU6",)))

    def _decode(self, text: str) -> str | None:
        try:
            raw = b"" if text == "=" else decode_base64(text)
            return raw.decode("utf-8")
        except ValueError:  # not base64 (decode_base64), or not UTF-8
            self.state = State.COMMAND
            self._error(_r(501, "5.5.2 Cannot decode response"))
            return None

    def _auth_input(self, line: bytes) -> None:
        text = line.decode("ascii", "replace").strip()
        if text == "*":
            self.state = State.COMMAND
            self._auth_username = None
            self._error(_r(501, "5.7.0 Authentication cancelled"))
            return
        if self._auth_mechanism == "PLAIN":
            self.state = State.COMMAND
            self._auth_plain(text)
        elif self._auth_username is None:
            self._auth_username = self._decode(text)
            if self._auth_username is not None:
                self._reply(Reply(334, ("UGFzc3dvcmQ6",)))
        else:
            password = self._decode(text)
            if password is not None:
                self._request_auth(self._auth_username, password)

    def _auth_plain(self, text: str) -> None:
        decoded = self._decode(text)
        if decoded is None:
            return
        parts = decoded.split("\x00")
        if len(parts) != 3 or not parts[1] or parts[0] not in ("", parts[1]):
            self.state = State.COMMAND
            self._error(_r(501, "5.5.2 Invalid PLAIN response"))
            return
        self._request_auth(parts[1], parts[2])

    def _request_auth(self, username: str, password: str) -> None:
        self._auth_username = username
        self.state = State.WAIT_AUTH
        self._events.append(AuthRequest(self._auth_mechanism, username, password))

    # -- DATA ------------------------------------------------------------------------
    #
    # The body is handled a run of complete lines at a time, with bytes
    # methods (find, count, replace) rather than line by line: the checks are
    # the same, their cost is C's. Only the unfinished last line stays
    # buffered, and at most MAX_TEXT_LINE + 2 octets of it.

    def _data_bytes(self) -> bool:
        """Consume what is buffered of the body; True when the message ended."""
        buf = self._in
        at_line_start = self._after_crlf and not self._long_line
        if at_line_start and buf[:3] == b".\r\n":
            end = 0
        else:
            found = buf.find(b"\r\n.\r\n")
            end = found + 2 if found >= 0 else -1
        if end >= 0:
            if end:
                self._segment(bytes(buf[:end]), at_line_start)
            del buf[: end + 3]
            self._end_of_data()
            return True
        last = buf.rfind(b"\n")
        if last >= 0:
            self._segment(bytes(buf[: last + 1]), at_line_start)
            del buf[: last + 1]
        if len(buf) > MAX_TEXT_LINE + 2:
            # Keep a final CR: it may begin the CRLF.
            keep = 1 if buf.endswith(b"\r") else 0
            self._problem(_r(550, "5.5.6 Message has a line longer than 998 octets"))
            del buf[: len(buf) - keep]
            self._long_line = True
            self._after_crlf = False
        return False

    def _problem(self, reply: Reply) -> None:
        if self._data_problem is None:
            self._data_problem = reply
            self._data = []
            if self._chunked:
                self._events.append(DataAborted())

    def _segment(self, seg: bytes, at_line_start: bool) -> None:
        """Complete body lines (each ending in LF), still dot-stuffed.

        ``at_line_start`` is False when ``seg`` begins with the rest of an
        overlong line, already refused.
        """
        self._long_line = False
        self._after_crlf = seg.endswith(b"\r\n")
        if self._data_problem is not None:
            return  # refused already: only looking for the end
        crlf = seg.count(b"\r\n")
        if seg.count(b"\n") != crlf:
            self._problem(_r(550, "5.5.2 Message contains bare LF (RFC 5321 §2.3.8)"))
            return
        if seg.count(b"\r") != crlf:
            self._problem(_r(550, "5.5.2 Message contains bare CR (RFC 5321 §2.3.8)"))
            return
        if at_line_start and seg[:1] == b".":
            seg = seg[1:]
        if b"\n." in seg:
            seg = seg.replace(b"\r\n.", b"\r\n")
        if len(seg) > MAX_TEXT_LINE + 2 and max(map(len, seg.split(b"\r\n"))) > MAX_TEXT_LINE:
            self._problem(_r(550, "5.5.6 Message has a line longer than 998 octets"))
            return
        if self._in_headers:
            self._headers(seg, at_line_start)
        self._data_size += len(seg)
        if self._data_size > self.config.max_size:
            self._problem(_r(552, "5.3.4 Message size exceeds fixed limit"))
            return
        self._data.append(seg)
        self._held += len(seg)
        chunk = self.body_chunk
        if chunk is not None and self._held > chunk:
            self._chunked = True
            data = b"".join(self._data)
            self._data = []
            self._held = 0
            self._events.append(BodyData(self._envelope(), data))

    def _headers(self, seg: bytes, at_line_start: bool) -> None:
        """Count the Received fields of the header section; note where it ends."""
        if at_line_start and seg.startswith(b"\r\n"):
            self._in_headers = False
            return
        blank = seg.find(b"\r\n\r\n")
        if blank >= 0:
            self._in_headers = False
            seg = seg[: blank + 2]
        lower = seg.lower()
        self._hops += lower.count(b"\nreceived:")
        if at_line_start and lower.startswith(b"received:"):
            self._hops += 1

    def _end_of_data(self) -> None:
        if self._data_problem is None and self._hops >= self.config.max_hops:
            self._problem(_r(554, "5.4.6 Too many hops (mail loop?)"))
        if self._data_problem is not None:
            problem = self._data_problem
            self._reject("END-OF-MESSAGE", problem, self._first_recipient())
            self._reset_transaction()
            self.state = State.COMMAND
            self._error(problem)
            return
        data = b"".join(self._data)
        self._data = []
        self.state = State.WAIT_STORE
        self._events.append(MessageReceived(self._envelope(), data))

    def _envelope(self) -> Envelope:
        if not self.esmtp:
            protocol = "SMTP"
        else:
            protocol = (
                ("UTF8SMTP" if self._smtputf8 else "ESMTP")
                + ("S" if self.tls else "")
                + ("A" if self.authenticated is not None else "")
            )
        return Envelope(
            sender=self.sender,
            recipients=tuple(self.recipients),
            helo=self.helo or "",
            client_address=self.client_address,
            protocol=protocol,
            tls=self.tls,
            authenticated=self.authenticated,
            smtputf8=self._smtputf8,
            body_type=self._body_type,
            tls_details=self.tls_details if self.tls else None,
        )
