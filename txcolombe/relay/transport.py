"""How queued mail leaves the relay: to a smarthost, or to the recipients' MX.

A :class:`Transport` routes each recipient to a destination key and sends one
message to a group of recipients of one destination, answering with one
:class:`Outcome` per recipient. :class:`SmarthostTransport` keeps a pool of
txcolombe :class:`~txcolombe.session.Session`\\ s: each is reused for message
after message, with the messages pipelined; at most ``concurrency`` at a
time, closed after ``idle_timeout`` seconds of idleness.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet.defer import CancelledError, Deferred, DeferredList, fail, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from txcolombe.address import Mailbox
from txcolombe.auth import Authentication
from txcolombe.errors import (
    AuthenticationError,
    ConnectionFailed,
    EightBitUnsupported,
    MessageTooLarge,
    NameResolutionFailed,
    RecipientsRefused,
    RoutingError,
    SMTPError,
    Step,
    TLSError,
    UsageError,
    UTF8Unsupported,
)
from txcolombe.machine import TLSMode
from txcolombe.protocol import Timeouts
from txcolombe.receipt import Receipt
from txcolombe.reply import Reply
from txcolombe.session import Session, connect

log = Logger(namespace="txcolombe.relay")


class Status(enum.Enum):
    DELIVERED = "delivered"
    DEFERRED = "deferred"
    FAILED = "failed"


@dataclass(frozen=True)
class Outcome:
    """What became of one recipient in one attempt.

    :ivar text: the remote reply (``550 5.1.1 ...``) or our description.
    :ivar status_code: the RFC 3463 code for DSNs.
    :ivar local: why the failure is the relay's own (one of :data:`LOCAL_REASONS`),
        not the message's; "" when it is the message's (or no failure).
    """

    status: Status
    text: str
    status_code: str
    relay: str = ""
    local: str = ""


#: The relay's own failures, by reason, with the RFC 3463 code they defer with.
LOCAL_REASONS = {
    "auth": "4.7.0",  # our credentials or SASL set-up (534, 535, 538, 454, 530)
    "tls": "4.7.0",  # TLS to the next hop
    "dns": "4.4.3",  # resolving the next hop
    "connection": "4.4.1",  # reaching the next hop
    "session": "4.4.2",  # the smarthost refused the session (greeting, EHLO)
    "config": "4.3.5",  # a configuration the relay cannot use (bad port, ...)
    "shutdown": "4.3.2",  # abandoned because the relay is stopping
    "software": "4.3.0",  # an unexpected error in the relay
}

#: Usage errors that are about the message, not about the relay: the next hop
#: can never take this message as it is. It is bounced (RFC 6531 §3.2 for
#: SMTPUTF8: an MTA rejects or bounces, it does not downgrade), with the
#: RFC 3463 code of each.
_MESSAGE_ERRORS = {UTF8Unsupported: "5.6.7", EightBitUnsupported: "5.6.3", MessageTooLarge: "5.3.4"}

#: Steps before the first transaction: a reply there is about the session.
_SETUP_STEPS = (Step.CONNECT, Step.GREETING, Step.EHLO, Step.HELO, Step.STARTTLS, Step.TLS)


def local_reason(error: BaseException, *, smarthost: bool = False) -> str:
    """Why ``error`` is the relay's own failure rather than the message's;
    "" when it is the message's.

    The relay's own failures (its credentials, TLS, the network, DNS, its
    configuration) must never bounce a message: they would bounce every
    message, and then every bounce (Postfix's ``smtp_sasl_auth_soft_bounce``).
    With ``smarthost``, a refusal of the session itself (greeting, EHLO) is
    ours too: every message would meet it.
    """
    if isinstance(error, CancelledError):
        return "shutdown"
    if not isinstance(error, SMTPError):
        return "software"
    if isinstance(error, AuthenticationError) or error.step is Step.AUTH:
        return "auth"
    if isinstance(error, TLSError):
        return "tls"
    if isinstance(error, RoutingError) and not smarthost:
        return ""  # about the recipients' domain: deliver() has classified it
    if isinstance(error, NameResolutionFailed):
        return "dns"
    if isinstance(error, ConnectionFailed):
        return "connection"
    if isinstance(error, tuple(_MESSAGE_ERRORS)):
        return ""
    if isinstance(error, UsageError):
        return "config"
    if smarthost and error.step in _SETUP_STEPS:
        return "session"
    return ""


def outcome_from_reply(reply: Reply, relay: str) -> Outcome:
    if reply.code < 400:
        status = Status.DELIVERED
    elif reply.code < 500:
        status = Status.DEFERRED
    else:
        status = Status.FAILED
    enhanced = reply.enhanced_status
    if enhanced is not None:
        code = ".".join(map(str, enhanced))
    else:
        code = {Status.DELIVERED: "2.0.0", Status.DEFERRED: "4.0.0", Status.FAILED: "5.0.0"}[status]
    return Outcome(status, str(reply), code, relay)


def outcome_from_error(error: BaseException, relay: str, *, smarthost: bool = False) -> Outcome:
    """The outcome of an attempt that failed with ``error``: deferred when the
    failure is temporary or the relay's own (:func:`local_reason`)."""
    reason = local_reason(error, smarthost=smarthost)
    if reason:
        text = str(error) or type(error).__name__
        if reason == "shutdown":
            text = "delivery abandoned: cancelled"
        elif reason == "software":
            text = f"local error: {type(error).__name__}: {text}"
        code = LOCAL_REASONS[reason]
        if isinstance(error, SMTPError) and error.enhanced_status is not None:
            code = "4." + ".".join(map(str, error.enhanced_status[1:]))
        return Outcome(Status.DEFERRED, text, code, relay, local=reason)
    assert isinstance(error, SMTPError)
    if error.reply is not None:
        out = outcome_from_reply(error.reply, relay)
        if error.temporary and out.status is Status.FAILED:
            return Outcome(Status.DEFERRED, out.text, "4" + out.status_code[1:], relay)
        return out
    if error.temporary:
        return Outcome(Status.DEFERRED, str(error), "4.4.1", relay)
    for kind, code in _MESSAGE_ERRORS.items():
        if isinstance(error, kind):
            return Outcome(Status.FAILED, f"{error} (next hop {relay})", code, relay)
    return Outcome(Status.FAILED, str(error), "5.3.0", relay)


@dataclass(frozen=True)
class Declared:
    """What a message's originator declared on MAIL that the next hop must
    see as it was (the relay passes it through).

    :ivar body_type: the client's BODY: "7BIT" (also for none: the next hop
        gets no BODY parameter) or "8BITMIME"; None for a message made here
        (a bounce), which says BODY=8BITMIME when offered.
    :ivar smtputf8: the client said SMTPUTF8.
    :ivar utf8_headers: with SMTPUTF8, the header has UTF-8 (RFC 6532):
        the next hop must offer SMTPUTF8.
    """

    body_type: str | None = None
    smtputf8: bool = False
    utf8_headers: bool = False


#: A message made by the relay itself.
LOCAL = Declared()


class Transport(Protocol):
    """Where the queue manager sends mail."""

    def route(self, recipient: Mailbox) -> str:
        """The destination key of ``recipient`` (recipients are grouped by it)."""

    def send(
        self,
        destination: str,
        sender: Mailbox | None,
        recipients: Sequence[Mailbox],
        data: bytes,
        declared: Declared = LOCAL,
    ) -> Deferred[dict[str, Outcome]]:
        """Send one message to recipients of one destination; never fails."""

    def close(self) -> Deferred[None]:
        """Close idle connections."""


@dataclass(frozen=True)
class Smarthost:
    """Where and how to reach the smarthost."""

    host: str
    port: int = 587
    tls: TLSMode = TLSMode.REQUIRED
    authentication: Authentication | None = None
    trust_root: Any = None
    domain: str | None = None
    timeouts: Timeouts = field(default_factory=Timeouts)


class SmarthostTransport:
    """Every recipient goes to one smarthost, over a few pipelined sessions.

    A message is handed to the open session with the fewest transactions
    under way; the session queues it behind them and pipelines its MAIL,
    RCPT and DATA with the previous final dot, so a stream of messages
    costs about one round trip each. Another session is opened (at most
    ``concurrency``) only when every open one has :data:`PIPELINE_DEPTH`
    transactions queued. Sessions idle for ``idle_timeout`` seconds QUIT.
    """

    def __init__(
        self,
        smarthost: Smarthost,
        *,
        reactor: Any,
        concurrency: int = 10,
        idle_timeout: float = 30.0,
    ) -> None:
        self.smarthost = smarthost
        self.reactor = reactor
        self.idle_timeout = idle_timeout
        self.concurrency = max(1, concurrency)
        self._pool: list[_Connection] = []
        self.connections = 0
        self.relay = f"{smarthost.host}[{smarthost.port}]"

    def route(self, recipient: Mailbox) -> str:
        return self.relay

    def send(
        self,
        destination: str,
        sender: Mailbox | None,
        recipients: Sequence[Mailbox],
        data: bytes,
        declared: Declared = LOCAL,
    ) -> Deferred[dict[str, Outcome]]:
        conn = self._pick()
        conn.queued += 1
        conn.stop_idle_timer()
        if conn.session is not None:
            sent = _send_on(conn.session, sender, recipients, data, declared)
        else:
            sent = conn.ready().addCallback(_send_on, sender, recipients, data, declared)
        return sent.addBoth(self._outcomes, conn, recipients)

    def _pick(self) -> _Connection:
        best = min(self._pool, key=lambda c: c.queued, default=None)
        if best is None or (best.queued >= PIPELINE_DEPTH and len(self._pool) < self.concurrency):
            best = _Connection(self)
            self._pool.append(best)
        return best

    def _connect(self) -> Deferred[Session]:
        host = self.smarthost
        self.connections += 1
        return connect(
            host.host, port=host.port, tls_mode=host.tls, domain=host.domain,
            trust_root=host.trust_root, authentication=host.authentication,
            timeouts=host.timeouts, reactor=self.reactor,
            # The relay logs one line per delivery; the per-exchange debug
            # trace would cost more than the transactions at its volume.
            trace=False,
        )  # fmt: skip

    def _gone(self, conn: _Connection) -> None:
        if conn in self._pool:
            self._pool.remove(conn)

    def _outcomes(
        self, result: Receipt | Failure, conn: _Connection, recipients: Sequence[Mailbox]
    ) -> dict[str, Outcome]:
        conn.queued -= 1
        if conn.queued == 0:
            conn.start_idle_timer()
        names = [str(r) for r in recipients]
        relay = self.relay
        if isinstance(result, Failure):
            error = result.value if result.value is not None else RuntimeError(str(result))
            if isinstance(error, RecipientsRefused):
                return {
                    name: outcome_from_reply(error.refused[name], relay)
                    if name in error.refused
                    else outcome_from_error(error, relay, smarthost=True)
                    for name in names
                }
            return dict.fromkeys(names, outcome_from_error(error, relay, smarthost=True))
        out: dict[str, Outcome] = {}
        accepted = outcome_from_reply(result.reply, relay)
        for name in names:
            if name in result.accepted:
                out[name] = accepted
            elif name in result.refused:
                out[name] = outcome_from_reply(result.refused[name], relay)
            else:
                out[name] = Outcome(Status.DEFERRED, "no reply for recipient", "4.0.0", relay)
        return out

    def close(self) -> Deferred[None]:
        """QUIT the idle sessions, drop the busy ones."""
        closing = []
        for conn in list(self._pool):
            closing.append(conn.close())
        self._pool.clear()
        return DeferredList(closing, consumeErrors=True).addCallback(lambda _: None)


#: Transactions queued on a session before another session is opened.
PIPELINE_DEPTH = 16


class _Connection:
    """One pooled session to the smarthost, from its connection attempt on."""

    def __init__(self, transport: SmarthostTransport) -> None:
        self.transport = transport
        self.session: Session | None = None
        self.queued = 0
        self._idle: IDelayedCall | None = None
        self._waiting: list[Deferred[Session]] = []
        self._error: Failure | None = None
        self._attempt = transport._connect()
        self._attempt.addCallbacks(self._connected, self._failed)

    def ready(self) -> Deferred[Session]:
        """Fires with the session once it is set up (or fails as the attempt did)."""
        if self._error is not None:
            return fail(self._error)
        d: Deferred[Session] = Deferred()
        self._waiting.append(d)
        return d

    def _connected(self, session: Session) -> None:
        self.session = session
        session.closed.addBoth(self._closed)
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(session)
        if self.queued == 0:
            self.start_idle_timer()

    def _failed(self, failure: Failure) -> None:
        self._error = failure
        self.transport._gone(self)
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.errback(failure)

    def _closed(self, _: object) -> None:
        self.stop_idle_timer()
        self.transport._gone(self)

    def start_idle_timer(self) -> None:
        if self._idle is None and self.session is not None:
            self._idle = self.transport.reactor.callLater(self.transport.idle_timeout, self._expire)

    def stop_idle_timer(self) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None

    def _expire(self) -> None:
        self._idle = None
        self.transport._gone(self)
        if self.session is not None:
            self.session.quit()

    def close(self) -> Deferred[None]:
        self.stop_idle_timer()
        if self.session is None:
            self._attempt.cancel()
            return succeed(None)
        if self.queued:
            self.session.abort()
            return self.session.closed
        return self.session.quit()


def _send_on(
    session: Session,
    sender: Mailbox | None,
    recipients: Sequence[Mailbox],
    data: bytes,
    declared: Declared,
) -> Deferred[Receipt]:
    # Small bodies are written at once by txcolombe.body (no reactor turn).
    return session.send(sender, list(recipients), data, **_send_options(declared))


def _send_options(declared: Declared) -> dict[str, Any]:
    """The keyword arguments of Session.send and deliver() for ``declared``."""
    return {
        "body_type": declared.body_type,
        "smtputf8": declared.smtputf8,
        "utf8_headers": declared.utf8_headers,
    }


class MXTransport:
    """Each recipient domain to its own exchangers, through ``txcolombe.deliver``."""

    def __init__(self, *, reactor: Any, domain: str | None = None, **options: Any) -> None:
        self.reactor = reactor
        self.domain = domain
        self.options = options

    def route(self, recipient: Mailbox) -> str:
        return (recipient.domain or "").lower()

    def send(
        self,
        destination: str,
        sender: Mailbox | None,
        recipients: Sequence[Mailbox],
        data: bytes,
        declared: Declared = LOCAL,
    ) -> Deferred[dict[str, Outcome]]:
        return Deferred.fromCoroutine(self._send(destination, sender, recipients, data, declared))

    async def _send(
        self,
        destination: str,
        sender: Mailbox | None,
        recipients: Sequence[Mailbox],
        data: bytes,
        declared: Declared,
    ) -> dict[str, Outcome]:
        names = [str(r) for r in recipients]
        from txcolombe.deliver import deliver

        try:
            result = await deliver(
                sender, names, data, domain=self.domain, reactor=self.reactor,
                **_send_options(declared), **self.options,
            )  # fmt: skip
        except Exception as error:
            return dict.fromkeys(names, outcome_from_error(error, destination))
        return {name: _mx_outcome(result.get(name), destination) for name in names}

    def close(self) -> Deferred[None]:
        return Deferred.fromCoroutine(_nothing())


async def _nothing() -> None:
    return None


def _mx_outcome(outcome: Any, destination: str) -> Outcome:
    """Read one per-recipient outcome of ``deliver()`` (duck-typed until its API settles)."""
    if outcome is None:
        return Outcome(Status.DEFERRED, "no outcome for recipient", "4.0.0", destination)
    relay = str(getattr(outcome, "mx", None) or getattr(outcome, "host", None) or destination)
    reply = getattr(outcome, "reply", None)
    error = getattr(outcome, "error", None)
    if isinstance(error, BaseException):
        out = outcome_from_error(error, relay)
    elif isinstance(reply, Reply):
        out = outcome_from_reply(reply, relay)
    else:
        return Outcome(Status.DEFERRED, f"unreadable outcome {outcome!r}", "4.0.0", relay)
    # deliver() has the last word on the class (e.g. a null MX is permanent).
    if getattr(outcome, "delivered", False):
        return Outcome(Status.DELIVERED, out.text, out.status_code, relay)
    if getattr(outcome, "permanent", False) and out.status is not Status.FAILED:
        return Outcome(Status.FAILED, out.text, "5" + out.status_code[1:], relay)
    if getattr(outcome, "temporary", False) and out.status is not Status.DEFERRED:
        return Outcome(Status.DEFERRED, out.text, "4" + out.status_code[1:], relay)
    return out
