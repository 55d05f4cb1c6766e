"""The SMTP server as a sans-I/O state machine: bytes in, events and bytes out.

Theory of operation
-------------------
:class:`ServerMachine` holds every rule of the server's side of the
conversation, and no I/O. Its driver (the Twisted protocol, the in-memory
test server, or a test):

1. feeds what the client sent to :meth:`~ServerMachine.receive_data`, and
   tells :meth:`~ServerMachine.timed_out` / :meth:`~ServerMachine.connection_lost`;
2. writes :meth:`~ServerMachine.data_to_send` to the client;
3. acts on each :meth:`~ServerMachine.next_event` (:mod:`txcolombe.server.events`):

   - :class:`ServerStartTLS`: start TLS, then call :meth:`~ServerMachine.tls_started`;
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
   - :class:`CommandRead` (only with ``intercept``): the machine is about to
     answer a command (or the greeting, or the end of a message): call
     :meth:`~ServerMachine.proceed`, or :meth:`~ServerMachine.override` with
     other bytes; a test server scripts its replies this way;
   - :class:`Close`: close the transport after writing what is pending.

While an answer is awaited the machine reads no further command: pipelined
commands wait in its buffer, and are answered in order once it comes.

Intake rules enforced here: STARTTLS discards anything pipelined after it;
AUTH is offered and accepted only under TLS (unless ``auth_without_tls``);
recipients outside ``local_domains`` need relay permission (a trusted
network or AUTH), else 554 5.7.1; at most ``max_recipients`` (452) and the
SIZE limit (552); in the body, a bare CR or LF (SMTP smuggling), a line over
998 octets or ``max_hops`` ``Received:`` headers reject the message
(``lenient`` lifts these and accepts any MAIL and RCPT parameter). The body,
from DATA or from BDAT (RFC 3030, when CHUNKING is advertised: each chunk is
consumed whole, even when refused), is read by :class:`~txcolombe.codec.data.DataDecoder`.
Every buffer is bounded, and with ``body_chunk`` so is the body held: past
that many octets it is handed to the driver as it comes. After
``soft_error_limit`` errors each error reply is delayed by ``error_sleep``
seconds; at ``max_errors`` the connection is closed (Postfix's
smtpd_soft_error_limit, smtpd_error_sleep_time and smtpd_hard_error_limit).
"""

from __future__ import annotations

import enum
import functools
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from txcolombe.codec.address import Mailbox, parse_domain
from txcolombe.codec.command import (
    CommandSyntaxError,
    PathArgument,
    parse_command,
    parse_mail,
    parse_rcpt,
)
from txcolombe.codec.data import DataDecoder
from txcolombe.codec.errors import InvalidAddress
from txcolombe.codec.reply import Reply
from txcolombe.codec.sasl import decode_base64
from txcolombe.server.events import (
    END_OF_DATA,
    GREETING,
    AuthRequest,
    BodyData,
    Close,
    CommandRead,
    DataAborted,
    Delay,
    MessageReceived,
    Rejected,
    ServerEnvelope,
    ServerEvent,
    ServerStartTLS,
)

__all__ = [
    "END_OF_DATA",
    "GREETING",
    "AuthRequest",
    "BodyData",
    "Close",
    "CommandRead",
    "DataAborted",
    "Delay",
    "MessageReceived",
    "Rejected",
    "ServerConfig",
    "ServerEnvelope",
    "ServerEvent",
    "ServerMachine",
    "ServerStartTLS",
    "ServerState",
]

#: RFC 5321 §4.5.3.1.4 says 512; SMTPUTF8 and parameters make lines longer.
MAX_COMMAND_LINE = 2048
#: RFC 4954 §4: an AUTH line may be 12288 octets.
MAX_AUTH_LINE = 12288


@dataclass(frozen=True)
class ServerConfig:
    """What the server offers and enforces.

    :ivar hostname: our name, in the greeting, EHLO reply and Received header.
    :ivar tls_available: STARTTLS may be offered (a certificate is configured).
    :ivar auth_enabled: AUTH PLAIN/LOGIN is offered (under TLS only, unless
        ``auth_without_tls``).
    :ivar auth_required: MAIL is refused (530) until the client authenticates.
    :ivar chunking: CHUNKING (BDAT, RFC 3030) is offered.
    :ivar local_domains: recipient domains accepted from anyone.
    :ivar max_errors: errors after which the connection is closed (421).
    :ivar soft_error_limit: errors after which every error reply is delayed
        by ``error_sleep`` seconds.
    :ivar max_connections: concurrent connections in all (421 beyond).
    :ivar max_connections_per_client: concurrent connections from one
        address (421 beyond), except from clients that may relay.
    :ivar extensions: the EHLO keywords (with their parameters) to advertise
        instead of those the options above give; the machine then accepts
        what it advertises: STARTTLS, AUTH and its mechanisms, CHUNKING, the
        SIZE limit (none without SIZE). STARTTLS is left out under TLS, AUTH
        without TLS unless ``auth_without_tls``.
    :ivar ehlo_greeting: the first line of the EHLO reply, with
        ``{hostname}``, ``{helo}`` and ``{client}`` filled in.
    :ivar lenient: accept any MAIL and RCPT parameter (and record it), any
        line ending and line length in DATA, any number of hops: a server
        for tests, which records what a client sends rather than judging it.
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
    auth_required: bool = False
    auth_without_tls: bool = False
    chunking: bool = False
    extensions: tuple[str, ...] | None = None
    ehlo_greeting: str = "{hostname} Hello {helo} [{client}]"
    lenient: bool = False


class ServerState(enum.Enum):
    COMMAND = "command"
    DATA = "data"
    BDAT = "reading a BDAT chunk"
    AUTH_INPUT = "auth input"
    HELD = "waiting for the driver to answer (intercept)"
    WAIT_TLS = "waiting for TLS"
    WAIT_AUTH = "waiting for the credentials check"
    WAIT_STORE = "waiting for the message to be stored"
    SLEEP = "slowing down a client that makes errors"
    CLOSED = "closed"


class _Held(enum.Enum):
    """What :meth:`ServerMachine.proceed` would do (``intercept``)."""

    GREETING = "greeting"
    COMMAND = "command"
    AUTH_LINE = "auth line"
    BDAT = "bdat"
    END = "end of message"


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

_BDAT = re.compile(r"(\d{1,15})(?: +(LAST))? *\Z", re.IGNORECASE)
_DSN_NOTIFY = {"NEVER", "SUCCESS", "FAILURE", "DELAY"}


class ServerMachine:
    """One SMTP server conversation.

    :param client_address: the client's IP address (for Received).
    :param relay_allowed: the client may relay without AUTH (trusted network).
    :param tls: the connection is TLS from the start (implicit TLS).
    :param body_chunk: hand the body over in :class:`BodyData` parts once
        more than this many octets of it are held (None: hold it all).
    :param mail_check: asked at each MAIL with the sender; a reply refuses it
        (e.g. too little free space in the spool).
    :param intercept: before answering the greeting, each command line and
        the end of each message, emit :class:`CommandRead` and wait for
        :meth:`proceed` or :meth:`override`.
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
        intercept: bool = False,
    ) -> None:
        self.config = config
        self.body_chunk = body_chunk
        self.mail_check = mail_check
        self.intercept = intercept
        self.tls_details: str | None = None
        self.client_address = client_address
        self.relay_allowed = relay_allowed
        self.tls = tls
        self.state = ServerState.COMMAND
        self.authenticated: str | None = None
        self.helo: str | None = None
        self.esmtp = False
        self._in = bytearray()
        self._out: list[bytes] = []
        self._events: deque[ServerEvent] = deque()
        self._errors = 0
        self._reset_transaction()
        self._auth_mechanism = ""
        self._auth_username: str | None = None
        self._skip_line = False
        self._delayed: Reply | None = None
        self._closing: Reply | None = None
        self._held = _Held.COMMAND
        self._held_line = b""
        self._replacement: bytes | None = None
        self._bdat_left = 0
        self._bdat_last = False
        self._bdat_refusal: Reply | None = None
        self._bdat_line = ""
        if intercept:
            self._hold(_Held.GREETING, GREETING, "")
        else:
            self._reply(_greeting(config.hostname, config.software))

    # -- the driver's side -------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Bytes from the client."""
        if self.state is ServerState.CLOSED:
            return
        self._in += data
        self._run()

    def data_to_send(self) -> bytes:
        """Bytes to write to the client (replies), or b""."""
        out, self._out = b"".join(self._out), []
        return out

    def next_event(self) -> ServerEvent | None:
        """The next event for the driver, or None."""
        return self._events.popleft() if self._events else None

    @property
    def buffered(self) -> int:
        """Octets received and not yet read (pipelined input)."""
        return len(self._in)

    @property
    def waiting(self) -> bool:
        """True while an answer from the driver is awaited (no client timeout then)."""
        return self.state in (
            ServerState.WAIT_TLS,
            ServerState.WAIT_AUTH,
            ServerState.WAIT_STORE,
            ServerState.SLEEP,
            ServerState.HELD,
        )

    @property
    def errors(self) -> int:
        """Errors the client made so far."""
        return self._errors

    def advertised(self) -> list[str]:
        """The EHLO keywords offered now, with their parameters."""
        cfg = self.config
        if cfg.extensions is None:
            lines = ["PIPELINING", f"SIZE {cfg.max_size}", "8BITMIME", "SMTPUTF8"]
            lines.append("ENHANCEDSTATUSCODES")
            if cfg.chunking:
                lines.append("CHUNKING")
            if cfg.tls_available:
                lines.append("STARTTLS")
            if cfg.auth_enabled:
                lines.append("AUTH PLAIN LOGIN")
        else:
            lines = list(cfg.extensions)
        return [line for line in lines if self._may_offer(line)]

    def _may_offer(self, line: str) -> bool:
        keyword = line.split(" ")[0].upper()
        if keyword == "STARTTLS":
            return not self.tls
        if keyword == "AUTH":
            return self.tls or self.config.auth_without_tls
        return True

    def offers(self, keyword: str) -> tuple[str, ...] | None:
        """The parameters of ``keyword`` if it is advertised now, else None."""
        for line in self.advertised():
            words = line.split()
            if words and words[0].upper() == keyword:
                return tuple(words[1:])
        return None

    def _size_limit(self) -> int | None:
        if self.config.extensions is None:
            return self.config.max_size
        size = self.offers("SIZE")
        if size and size[0].isdigit() and int(size[0]) > 0:
            return int(size[0])
        return None

    def tls_started(self) -> None:
        """TLS is up: the session starts over (RFC 3207 §4.2)."""
        if self.state is not ServerState.WAIT_TLS:
            return
        self.tls = True
        self.helo = None
        self.esmtp = False
        self.authenticated = None
        self._reset_transaction()
        self.state = ServerState.COMMAND
        self._run()

    def auth_result(self, ok: bool) -> None:
        """The answer to an :class:`AuthRequest`."""
        if self.state is not ServerState.WAIT_AUTH:
            return
        self.state = ServerState.COMMAND
        if ok:
            self.authenticated = self._auth_username
            self._reply(_r(235, "2.7.0 Authentication successful"))
        else:
            self._error(_r(535, "5.7.8 Authentication credentials invalid"))
        self._auth_username = None
        self._run()

    def message_result(self, reply: Reply | bytes) -> None:
        """The reply to give for a :class:`MessageReceived` (250 once it is stored)."""
        if self.state is not ServerState.WAIT_STORE:
            return
        self.state = ServerState.COMMAND
        self._reset_transaction()
        self._reply(reply)
        if self._closing is not None:
            self._close(self._closing)
            return
        self._run()

    def wake(self) -> None:
        """The :class:`Delay` is over: give the delayed reply, read on."""
        if self.state is not ServerState.SLEEP:
            return
        self.state = ServerState.COMMAND
        if self._delayed is not None:
            self._reply(self._delayed)
            self._delayed = None
        self._run()

    def proceed(self) -> None:
        """The answer to a :class:`CommandRead`: act and reply as usual."""
        if self.state is not ServerState.HELD:
            return
        self._act()
        self._run()

    def override(self, reply: bytes, *, effective: bool) -> None:
        """The answer to a :class:`CommandRead`: reply with ``reply`` instead.

        With ``effective`` the command takes effect as usual (a recipient is
        added, TLS starts, the message is stored) and only its reply is
        replaced; without, the command is forgotten (a message or a chunk
        is discarded, an AUTH exchange cancelled).
        """
        if self.state is not ServerState.HELD:
            return
        if effective:
            self._replacement = reply
            self._act()
            if self._replacement is not None and self.state not in (
                ServerState.WAIT_AUTH,
                ServerState.WAIT_STORE,
                ServerState.SLEEP,
            ):
                self._out.append(self._replacement)  # the command gave no reply
                self._replacement = None
        else:
            self.state = ServerState.COMMAND
            if self._held in (_Held.BDAT, _Held.END):
                self._abort_parts()
                self._reset_transaction()
            self._auth_username = None
            self._out.append(reply)
        self._run()

    def shutdown(self, reply: Reply) -> None:
        """The server is stopping: close with ``reply`` now, or, while a
        message is being stored, right after its reply (so that the client
        learns its fate)."""
        if self.state is ServerState.CLOSED:
            return
        if self.state is ServerState.WAIT_STORE:
            self._closing = reply
            return
        self._abort_parts()
        self._close(reply)

    def timed_out(self) -> None:
        """The client was idle too long."""
        if self.state is ServerState.CLOSED:
            return
        self._close(_r(421, f"4.4.2 {self.config.hostname} Error: timeout exceeded"))

    def connection_lost(self) -> None:
        """The connection is gone; nothing more will be sent."""
        self.state = ServerState.CLOSED
        self._in.clear()

    # -- internals ------------------------------------------------------------------

    def _reset_transaction(self) -> None:
        self.sender: Mailbox | None = None
        self.in_transaction = False
        self.recipients: list[Mailbox] = []
        self._smtputf8 = False
        self._body_type: str | None = None
        self._paths: list[str] = []
        self._mail_parameters: tuple[str, ...] = ()
        self._rcpt_parameters: list[tuple[str, ...]] = []
        self._data: list[bytes] = []
        self._held_octets = 0
        self._chunked = False
        self._data_size = 0
        self._body: DataDecoder | None = None
        self._bdat_used = False

    def _reply(self, reply: Reply | bytes) -> None:
        if self._replacement is not None:
            reply, self._replacement = self._replacement, None
        self._out.append(reply if isinstance(reply, bytes) else reply.to_bytes())

    def _error(self, reply: Reply) -> None:
        self._errors += 1
        cfg = self.config
        if self._errors >= cfg.max_errors and self.state is not ServerState.CLOSED:
            self._reply(reply)
            too_many = _r(421, f"4.7.0 {cfg.hostname} Error: too many errors")
            self._reject("CONNECT", too_many, self._first_recipient())
            self._close(too_many)
        elif self._errors > cfg.soft_error_limit and cfg.error_sleep > 0:
            self._delayed = reply
            self.state = ServerState.SLEEP
            self._events.append(Delay(cfg.error_sleep))
        else:
            self._reply(reply)

    def _first_recipient(self) -> Mailbox | None:
        return self.recipients[0] if self.recipients else None

    def _reject(self, stage: str, reply: Reply, recipient: Mailbox | None) -> None:
        self._events.append(Rejected(stage, reply, self.sender, recipient, self.helo))

    def _close(self, reply: Reply) -> None:
        self._reply(reply)
        self.state = ServerState.CLOSED
        self._in.clear()
        self._events.append(Close())

    def _hold(self, what: _Held, verb: str, argument: str, line: bytes = b"") -> None:
        """Wait for :meth:`proceed` or :meth:`override` (``intercept``)."""
        self._held = what
        self._held_line = line
        self.state = ServerState.HELD
        text = line.decode("utf-8", "replace")
        self._events.append(CommandRead(verb, argument, text))

    def _act(self) -> None:
        """Do what was held."""
        held, line = self._held, self._held_line
        self.state = ServerState.COMMAND
        if held is _Held.GREETING:
            self._reply(_greeting(self.config.hostname, self.config.software))
        elif held is _Held.COMMAND:
            self._command(line)
        elif held is _Held.AUTH_LINE:
            self.state = ServerState.AUTH_INPUT
            self._auth_input(line)
        elif held is _Held.BDAT:
            self._bdat_done(hold_end=self._replacement is None)
        else:
            self._end_of_data()

    def _run(self) -> None:
        while self.state in (
            ServerState.COMMAND,
            ServerState.AUTH_INPUT,
            ServerState.DATA,
            ServerState.BDAT,
        ):
            if self.state is ServerState.DATA:
                if not self._data_bytes():
                    return
                continue
            if self.state is ServerState.BDAT:
                if not self._bdat_bytes():
                    return
                continue
            limit = MAX_AUTH_LINE if self.state is ServerState.AUTH_INPUT else MAX_COMMAND_LINE
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
                if self.state is ServerState.AUTH_INPUT:
                    self.state = ServerState.COMMAND
                self._error(_r(500, "5.5.6 Line too long"))
                continue
            if self.state is ServerState.AUTH_INPUT:
                if self.intercept:
                    self._hold(_Held.AUTH_LINE, "AUTH", line.decode("utf-8", "replace"), line)
                else:
                    self._auth_input(line)
            elif self.intercept and not self._chunk_follows(line):
                verb, _, argument = line.decode("utf-8", "replace").partition(" ")
                self._hold(_Held.COMMAND, verb.upper(), argument, line)
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
        cfg = self.config
        if esmtp:
            first = cfg.ehlo_greeting.format(
                hostname=cfg.hostname, helo=domain, client=self.client_address
            )
            self._reply(Reply.of(250, first, *self.advertised()))
        else:
            self._reply(_r(250, cfg.hostname))

    def _do_ehlo(self, argument: str) -> None:
        self._greet(argument, esmtp=True)

    def _do_helo(self, argument: str) -> None:
        self._greet(argument, esmtp=False)

    def _do_mail(self, argument: str) -> None:
        if self.helo is None:
            raise CommandSyntaxError(503, "5.5.1 Error: send HELO/EHLO first")
        if self.in_transaction:
            raise CommandSyntaxError(503, "5.5.1 Error: nested MAIL command")
        if self.config.auth_required and self.authenticated is None:
            raise CommandSyntaxError(530, "5.7.0 Authentication required")
        lenient = self.config.lenient
        parsed = parse_mail(argument, strict=not lenient)
        params = parsed.params
        if params and not self.esmtp:
            raise CommandSyntaxError(555, "5.5.4 Parameters need EHLO")
        smtputf8 = "SMTPUTF8" in params
        body_type = params.get("BODY")
        size = params.get("SIZE")
        limit = self._size_limit()
        if size is not None and size.isdigit() and limit is not None and int(size) > limit:
            too_big = _r(552, "5.3.4 Message size exceeds fixed limit")
            self._events.append(Rejected("MAIL", too_big, parsed.mailbox, None, self.helo))
            raise CommandSyntaxError(552, "5.3.4 Message size exceeds fixed limit")
        if not lenient:
            body_type = self._check_mail_parameters(parsed)
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
        self._body_type = body_type.upper() if body_type else None
        self._paths = [parsed.text]
        self._mail_parameters = parsed.words
        self._reply(_MAIL_OK)

    def _check_mail_parameters(self, parsed: PathArgument) -> str | None:
        """Refuse a parameter of an extension not offered, or a bad value; the BODY type."""
        body_type = None
        for key, value in parsed.params.items():
            if key == "SIZE":
                if value is None or not value.isdigit():
                    raise CommandSyntaxError(501, "5.5.4 Bad SIZE parameter")
            elif key == "BODY":
                body_type = (value or "").upper()
                if body_type not in ("7BIT", "8BITMIME") and not (
                    body_type == "BINARYMIME" and self.offers("BINARYMIME") is not None
                ):
                    raise CommandSyntaxError(501, "5.5.4 Bad BODY parameter")
            elif key == "SMTPUTF8":
                if value is not None:
                    raise CommandSyntaxError(501, "5.5.4 SMTPUTF8 takes no value")
            elif key == "AUTH":
                pass  # RFC 4954 §5: may be ignored
            elif key == "RET" and self.offers("DSN") is not None:
                if value is None or value.upper() not in ("FULL", "HDRS"):
                    raise CommandSyntaxError(501, "5.5.4 Bad RET parameter")
            elif key == "ENVID" and self.offers("DSN") is not None:
                if not value:
                    raise CommandSyntaxError(501, "5.5.4 Bad ENVID parameter")
            else:
                raise CommandSyntaxError(555, f"5.5.4 Unsupported parameter {key}")
        return body_type

    def _do_rcpt(self, argument: str) -> None:
        if not self.in_transaction:
            raise CommandSyntaxError(503, "5.5.1 Error: need MAIL command")
        lenient = self.config.lenient
        parsed = parse_rcpt(argument, strict=not lenient)
        if not lenient:
            self._check_rcpt_parameters(parsed)
        mailbox = parsed.mailbox
        assert mailbox is not None
        if mailbox.needs_smtputf8 and not self._smtputf8 and not lenient:
            raise CommandSyntaxError(553, "5.6.7 Non-ASCII address needs SMTPUTF8")
        if len(self.recipients) >= self.config.max_recipients:
            self._reject("RCPT", _r(452, "4.5.3 Error: too many recipients"), mailbox)
            raise CommandSyntaxError(452, "4.5.3 Error: too many recipients")
        local = mailbox.domain is None or mailbox.domain.lower() in self.config.local_domains
        if not local and not (self.relay_allowed or self.authenticated is not None):
            self._reject("RCPT", _r(554, "5.7.1 Relay access denied"), mailbox)
            raise CommandSyntaxError(554, "5.7.1 Relay access denied")
        self.recipients.append(mailbox)
        self._paths.append(parsed.text)
        self._rcpt_parameters.append(parsed.words)
        self._reply(_RCPT_OK)

    def _check_rcpt_parameters(self, parsed: PathArgument) -> None:
        if not parsed.params:
            return
        if self.offers("DSN") is None:
            raise CommandSyntaxError(555, "5.5.4 Unsupported RCPT parameters")
        for key, value in parsed.params.items():
            if key == "NOTIFY":
                notify = set((value or "").upper().split(","))
                if not notify <= _DSN_NOTIFY or ("NEVER" in notify and len(notify) > 1):
                    raise CommandSyntaxError(501, "5.5.4 Bad NOTIFY parameter")
            elif key == "ORCPT":
                if not value or ";" not in value:
                    raise CommandSyntaxError(501, "5.5.4 Bad ORCPT parameter")
            else:
                raise CommandSyntaxError(555, f"5.5.4 Unsupported parameter {key}")

    def _do_data(self, argument: str) -> None:
        if argument:
            raise CommandSyntaxError(501, "5.5.4 Syntax: DATA")
        if not self.in_transaction:
            raise CommandSyntaxError(503, "5.5.1 Error: need MAIL command")
        if not self.recipients:
            raise CommandSyntaxError(554, "5.5.1 Error: no valid recipients")
        if self._bdat_used:
            raise CommandSyntaxError(503, "5.5.1 Error: DATA after BDAT")
        if self._body_type == "BINARYMIME":
            raise CommandSyntaxError(503, "5.5.1 Error: BINARYMIME needs BDAT")
        self._body = self._decoder(stuffed=True)
        self.state = ServerState.DATA
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
        if self.tls:
            raise CommandSyntaxError(503, "5.5.1 Error: TLS already active")
        if self.offers("STARTTLS") is None:
            raise CommandSyntaxError(502, "5.5.1 Error: command not implemented")
        if argument:
            raise CommandSyntaxError(501, "5.5.4 Syntax: STARTTLS")
        self._reply(_r(220, "2.0.0 Ready to start TLS"))
        # RFC 3207 §4.2 / CVE-2011-0411: nothing pipelined after STARTTLS counts.
        self._in.clear()
        self.state = ServerState.WAIT_TLS
        self._events.append(ServerStartTLS())

    # -- AUTH (RFC 4954) ------------------------------------------------------------

    def _do_auth(self, argument: str) -> None:
        cfg = self.config
        offered = self.offers("AUTH")
        if offered is None:
            if cfg.extensions is None and cfg.auth_enabled and not self.tls:
                raise CommandSyntaxError(
                    538, "5.7.11 Encryption required for requested authentication mechanism"
                )
            raise CommandSyntaxError(503, "5.5.1 Error: authentication not enabled")
        if not self.esmtp:
            raise CommandSyntaxError(503, "5.5.1 Error: send EHLO first")
        if self.authenticated is not None:
            raise CommandSyntaxError(503, "5.5.1 Error: already authenticated")
        if self.in_transaction:
            raise CommandSyntaxError(503, "5.5.1 Error: MAIL transaction in progress")
        mechanism, _, initial = argument.partition(" ")
        mechanism = mechanism.upper()
        initial = initial.strip()
        mechanisms = {m.upper() for m in offered}
        if mechanism not in ("PLAIN", "LOGIN") or mechanism not in mechanisms:
            raise CommandSyntaxError(504, "5.5.4 Unrecognized authentication type")
        self._auth_mechanism = mechanism
        self._auth_username = None
        if mechanism == "PLAIN":
            if initial:
                self._auth_plain(initial)
            else:
                self.state = ServerState.AUTH_INPUT
                self._reply(Reply(334, ("",)))
        elif initial:
            self._auth_username = self._decode(initial)
            if self._auth_username is not None:
                self.state = ServerState.AUTH_INPUT
                self._reply(Reply(334, ("UGFzc3dvcmQ6",)))
        else:
            self.state = ServerState.AUTH_INPUT
            self._reply(Reply(334, ("VXNlcm5hbWU6",)))

    def _decode(self, text: str) -> str | None:
        try:
            raw = b"" if text == "=" else decode_base64(text)
            return raw.decode("utf-8")
        except ValueError:  # not base64 (decode_base64), or not UTF-8
            self.state = ServerState.COMMAND
            self._error(_r(501, "5.5.2 Cannot decode response"))
            return None

    def _auth_input(self, line: bytes) -> None:
        text = line.decode("ascii", "replace").strip()
        if text == "*":
            self.state = ServerState.COMMAND
            self._auth_username = None
            self._error(_r(501, "5.7.0 Authentication cancelled"))
            return
        if self._auth_mechanism == "PLAIN":
            self.state = ServerState.COMMAND
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
            self.state = ServerState.COMMAND
            self._error(_r(501, "5.5.2 Invalid PLAIN response"))
            return
        self._request_auth(parts[1], parts[2])

    def _request_auth(self, username: str, password: str) -> None:
        self._auth_username = username
        self.state = ServerState.WAIT_AUTH
        self._events.append(AuthRequest(self._auth_mechanism, username, password))

    # -- DATA and BDAT: codec.data.DataDecoder reads and checks the body ---------

    def _decoder(self, *, stuffed: bool) -> DataDecoder:
        return DataDecoder(
            self._accept,
            self._refused,
            stuffed=stuffed,
            lenient=self.config.lenient,
            raw=self._body_type == "BINARYMIME",
        )

    def _data_bytes(self) -> bool:
        """Consume what is buffered of the body; True when the message ended."""
        body = self._body
        assert body is not None
        if not body.read(self._in):
            return False
        if self.intercept:
            self._hold(_Held.END, END_OF_DATA, "")
        else:
            self._end_of_data()
        return True

    def _refused(self) -> None:
        """The body is refused (its decoder's ``problem``): drop what is held."""
        self._data = []
        self._abort_parts()

    def _abort_parts(self) -> None:
        """The parts of the body handed over (:class:`BodyData`) are void, once."""
        if self._chunked:
            self._chunked = False
            self._events.append(DataAborted())

    def _accept(self, seg: bytes) -> None:
        """Decoded body octets: count them, hold them, hand them over past ``body_chunk``."""
        self._data_size += len(seg)
        limit = self._size_limit()
        if limit is not None and self._data_size > limit:
            assert self._body is not None
            self._body.refuse(_r(552, "5.3.4 Message size exceeds fixed limit"))
            return
        self._data.append(seg)
        self._held_octets += len(seg)
        chunk = self.body_chunk
        if chunk is not None and self._held_octets > chunk:
            self._chunked = True
            data = b"".join(self._data)
            self._data = []
            self._held_octets = 0
            self._events.append(BodyData(self._envelope(), data))

    def _end_of_data(self) -> None:
        body = self._body
        assert body is not None
        if body.hops >= self.config.max_hops:
            body.refuse(_r(554, "5.4.6 Too many hops (mail loop?)"))
        if body.problem is not None:
            problem = body.problem
            self._reject("END-OF-MESSAGE", problem, self._first_recipient())
            self._reset_transaction()
            self.state = ServerState.COMMAND
            self._error(problem)
            return
        data = b"".join(self._data)
        self._data = []
        self.state = ServerState.WAIT_STORE
        self._events.append(MessageReceived(self._envelope(), data))

    def _do_bdat(self, argument: str) -> None:
        if self.offers("CHUNKING") is None:
            raise CommandSyntaxError(500, "5.5.2 Error: command not recognized")
        match = _BDAT.match(argument)
        if match is None:
            raise CommandSyntaxError(501, "5.5.4 Syntax: BDAT size [LAST]")
        # RFC 3030 §2: the chunk is read whole, whatever the reply will be.
        refusal = None
        if not self.in_transaction:
            refusal = _r(503, "5.5.1 Error: need MAIL command")
        elif not self.recipients:
            refusal = _r(554, "5.5.1 Error: no valid recipients")
        if refusal is None and self._body is None:
            self._body = self._decoder(stuffed=False)
        self._bdat_refusal = refusal
        self._bdat_left = int(match.group(1))
        self._bdat_last = match.group(2) is not None
        self._bdat_used = True
        self.state = ServerState.BDAT
        self._bdat_line = f"BDAT {argument}"

    def _chunk_follows(self, line: bytes) -> bool:
        """A BDAT command whose chunk will be read: held once that is done."""
        verb, _, argument = line.partition(b" ")
        return (
            verb.upper() == b"BDAT"
            and _BDAT.match(argument.decode("ascii", "replace")) is not None
            and self.offers("CHUNKING") is not None
        )

    def _bdat_bytes(self) -> bool:
        """Consume what is buffered of the chunk; True once it is read whole."""
        take = min(self._bdat_left, len(self._in))
        if take:
            chunk = bytes(self._in[:take])
            del self._in[:take]
            self._bdat_left -= take
            if self._bdat_refusal is None and self._body is not None:
                self._body.write(chunk)
        if self._bdat_left:
            return False
        if self.intercept:
            line = self._bdat_line
            self._hold(_Held.BDAT, "BDAT", line[5:], line.encode("utf-8"))
        else:
            self._bdat_done(hold_end=False)
        return True

    def _bdat_done(self, *, hold_end: bool) -> None:
        """The chunk is read: answer it, or end the message with the LAST one."""
        self.state = ServerState.COMMAND
        refusal, self._bdat_refusal = self._bdat_refusal, None
        body = self._body
        if refusal is None and not self._bdat_last and body is not None:
            refusal = body.problem
        if refusal is not None:
            if self.in_transaction:
                self._reject("END-OF-MESSAGE", refusal, self._first_recipient())
            self._abort_parts()
            self._reset_transaction()
            self._error(refusal)
            return
        if not self._bdat_last:
            self._reply(_r(250, f"2.0.0 Ok: {self._data_size} octets so far"))
            return
        assert body is not None
        body.close()
        if hold_end:
            self._hold(_Held.END, END_OF_DATA, "")
        else:
            self._end_of_data()

    def _envelope(self) -> ServerEnvelope:
        if not self.esmtp:
            protocol = "SMTP"
        else:
            protocol = (
                ("UTF8SMTP" if self._smtputf8 else "ESMTP")
                + ("S" if self.tls else "")
                + ("A" if self.authenticated is not None else "")
            )
        return ServerEnvelope(
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
            paths=tuple(self._paths),
            mail_parameters=self._mail_parameters,
            rcpt_parameters=tuple(self._rcpt_parameters),
        )
