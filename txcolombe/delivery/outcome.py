"""What every delivery path reports, per recipient: :func:`txcolombe.deliver`,
the relay's smarthost and MX modes alike. Delivered (where, with which
reply, over which TLS and why) or a temporary or permanent failure, with
every address tried for its domain; and the rules that read one
transaction's result per recipient (:func:`recipient_verdict`), name the
sender's own failures (:func:`local_reason`) and give the RFC 3463 status
whose class matches the outcome (:func:`with_class`)."""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import NamedTuple

from twisted.internet.defer import CancelledError

from txcolombe.client.receipt import Receipt, TLSInfo
from txcolombe.codec.errors import (
    AuthenticationError,
    ConnectionFailed,
    DNSFailure,
    EightBitUnsupported,
    MessageTooLarge,
    NameResolutionFailed,
    NoMailExchanger,
    NoSuchDomain,
    PolicyViolation,
    RecipientsRefused,
    RoutingError,
    SMTPError,
    Step,
    TLSError,
    UsageError,
    UTF8Unsupported,
    error_for_reply,
)
from txcolombe.codec.reply import Reply
from txcolombe.delivery.mtasts import Mode
from txcolombe.delivery.tlspolicy import TLSLevel, TLSPolicy

__all__ = [
    "LOCAL_REASONS",
    "Attempt",
    "DeliveryResult",
    "DeliveryStatus",
    "Outcome",
    "TLSStatus",
    "Verdict",
    "error_verdict",
    "failed",
    "local_reason",
    "recipient_verdict",
    "with_class",
]


class DeliveryStatus(enum.Enum):
    """What became of one recipient."""

    DELIVERED = "delivered"
    TEMPORARY = "temporary failure"
    """Not delivered; trying again later may succeed."""
    PERMANENT = "permanent failure"
    """Not delivered, and never will be as addressed: bounce it."""

    @property
    def status_class(self) -> int:
        """The RFC 3463 class of a status for this outcome: 2, 4 or 5."""
        return _CLASSES[self]


_CLASSES = {DeliveryStatus.DELIVERED: 2, DeliveryStatus.TEMPORARY: 4, DeliveryStatus.PERMANENT: 5}


def with_class(code: tuple[int, int, int] | None, status: DeliveryStatus) -> tuple[int, int, int]:
    """``code`` in the class of ``status`` (a temporary failure never reports a
    5.x.x, nor a bounce a 4.x.x); ``X.0.0`` for no code."""
    klass = status.status_class
    return (klass, 0, 0) if code is None else (klass, code[1], code[2])


@dataclass(frozen=True)
class TLSStatus:
    """The TLS a session reached, under which policy, and why.

    :ivar level: none (plaintext), encrypted (certificate not verified) or
        verified (chain and exchanger name checked).
    :ivar policy: the policy applied to the domain (``verify`` under an
        MTA-STS ``enforce`` policy).
    :ivar reason: a sentence saying why this level.
    :ivar mta_sts: the mode of the domain's MTA-STS policy, if it has one.
    :ivar session: the TLS version and cipher, under TLS.
    """

    level: TLSLevel
    policy: TLSPolicy
    reason: str
    mta_sts: Mode | None = None
    session: TLSInfo | None = None


@dataclass(frozen=True)
class Attempt:
    """One address tried for a domain.

    :ivar host: the exchanger's name (or the address literal).
    :ivar address: the IP address connected to.
    :ivar error: why it failed, or None when a transaction ran there.
    :ivar tls: the TLS reached, when a session was set up.
    """

    host: str
    address: str
    error: SMTPError | None
    tls: TLSStatus | None = None


@dataclass(frozen=True)
class Outcome:
    """What became of one recipient.

    :ivar recipient: the recipient as given.
    :ivar domain: its routing domain (A-labels, or the address literal).
    :ivar status: delivered, or a temporary or permanent failure.
    :ivar mx: the exchanger that delivered or refused it, if one did.
    :ivar address: that exchanger's IP address.
    :ivar reply: delivered: the reply to the end of data (it holds the queue
        id); refused: the server's refusal.
    :ivar error: why it failed (None when delivered).
    :ivar tls: the TLS of the session that delivered or refused it.
    :ivar receipt: the transaction's receipt, when delivered.
    :ivar attempts: every address tried for its domain, in order.
    :ivar port: the exchanger's port.
    :ivar local: why the failure is the sender's own (one of
        :data:`LOCAL_REASONS`: its credentials, TLS, the network, its
        configuration) rather than the message's; "" when it is not. Only a
        relay sets it: such a failure defers, it never bounces.
    """

    recipient: str
    domain: str
    status: DeliveryStatus
    mx: str | None = None
    address: str | None = None
    reply: Reply | None = None
    error: SMTPError | None = None
    tls: TLSStatus | None = None
    receipt: Receipt | None = None
    attempts: tuple[Attempt, ...] = ()
    port: int | None = None
    local: str = ""

    @property
    def delivered(self) -> bool:
        return self.status is DeliveryStatus.DELIVERED

    @property
    def temporary(self) -> bool:
        return self.status is DeliveryStatus.TEMPORARY

    @property
    def permanent(self) -> bool:
        return self.status is DeliveryStatus.PERMANENT

    @property
    def enhanced_status(self) -> tuple[int, int, int] | None:
        """The RFC 3463 status for bounces and logs: the server's, else the
        one of a routing failure (RFC 3463 §3.5, RFC 8461 §5: 5.1.2 no such
        domain, 4.4.3 DNS failure, 4.4.4/5.4.4 unroutable, 4.7.5 MTA-STS), or
        for a failure of the sender's own, its :data:`LOCAL_REASONS` code;
        always in the class of :attr:`status`."""
        code = self._known_status()
        return None if code is None else with_class(code, self.status)

    def _known_status(self) -> tuple[int, int, int] | None:
        error = self.error
        if self.local:
            known = error.enhanced_status if error is not None else None
            return known or LOCAL_REASONS[self.local]
        if self.reply is not None and self.reply.enhanced_status is not None:
            return self.reply.enhanced_status
        if error is None:
            return (2, 0, 0) if self.delivered else None
        if isinstance(error, NoSuchDomain):
            return (5, 1, 2)
        if isinstance(error, DNSFailure):
            return (4, 4, 3)
        if isinstance(error, NoMailExchanger):
            return (4, 4, 4) if error.temporary else (5, 4, 4)
        if isinstance(error, PolicyViolation):
            return (4, 7, 5)
        for kind, code in _MESSAGE_ERRORS.items():
            if isinstance(error, kind):
                return code
        return error.enhanced_status

    @property
    def status_code(self) -> str:
        """:attr:`enhanced_status` as text for DSNs and logs, never empty: with
        no code known, ``X.0.0`` after a reply, else 4.4.1 (no answer) or
        5.3.0 (other mail system failure)."""
        code = self.enhanced_status
        if code is None:
            if self.reply is not None or self.delivered:
                code = with_class(None, self.status)
            else:
                code = (4, 4, 1) if self.temporary else (5, 3, 0)
        return ".".join(map(str, code))

    @property
    def text(self) -> str:
        """What to log and report: the server's reply, else the error's text
        (for a failure of the sender's own, the error even after a reply)."""
        if self.reply is not None and not self.local:
            return str(self.reply)
        if self.error is not None:
            return str(self.error) or type(self.error).__name__
        return ""

    @property
    def queue_id(self) -> str | None:
        return self.reply.queue_id if self.delivered and self.reply is not None else None


class DeliveryResult(Mapping[str, Outcome]):
    """Each recipient (as given) with its :class:`Outcome`, in the given order."""

    def __init__(self, outcomes: Mapping[str, Outcome]) -> None:
        self._outcomes = dict(outcomes)

    def __getitem__(self, recipient: str) -> Outcome:
        return self._outcomes[recipient]

    def __iter__(self) -> Iterator[str]:
        return iter(self._outcomes)

    def __len__(self) -> int:
        return len(self._outcomes)

    def _with(self, status: DeliveryStatus) -> list[str]:
        return [rcpt for rcpt, outcome in self._outcomes.items() if outcome.status is status]

    @property
    def delivered(self) -> list[str]:
        return self._with(DeliveryStatus.DELIVERED)

    @property
    def temporary(self) -> list[str]:
        """Recipients to try again later."""
        return self._with(DeliveryStatus.TEMPORARY)

    @property
    def permanent(self) -> list[str]:
        """Recipients to bounce."""
        return self._with(DeliveryStatus.PERMANENT)

    @property
    def complete(self) -> bool:
        """True when every recipient was delivered."""
        return all(outcome.delivered for outcome in self._outcomes.values())

    def __repr__(self) -> str:
        shown = ", ".join(f"{rcpt}: {o.status.value}" for rcpt, o in self._outcomes.items())
        return f"DeliveryResult({shown})"


class Verdict(NamedTuple):
    """What one transaction says of one recipient."""

    status: DeliveryStatus
    reply: Reply | None
    """Delivered: the reply to the end of data; refused: the RCPT reply."""
    error: SMTPError | None


def recipient_verdict(result: Receipt | SMTPError, recipient: str) -> Verdict | None:
    """What a transaction's ``result`` (its receipt, or the error it failed
    with) says of ``recipient`` (its address as sent); None when it says
    nothing of it (a recipient neither accepted nor refused: all-or-nothing
    mode, a pipelined failure). A 4xx refusal is temporary, any other final."""
    if isinstance(result, Receipt) and recipient in result.accepted:
        # A send split over transactions: the end-of-data reply (its queue id)
        # of the transaction that took this recipient.
        part = next((p for p in result.parts if recipient in p.accepted), result)
        return Verdict(DeliveryStatus.DELIVERED, part.reply, None)
    if isinstance(result, Receipt | RecipientsRefused):
        reply = result.refused.get(recipient)
        if reply is None:
            return None
        status = DeliveryStatus.TEMPORARY if reply.temporary else DeliveryStatus.PERMANENT
        return Verdict(status, reply, error_for_reply(reply, Step.RCPT, "recipient refused"))
    return error_verdict(result)


def error_verdict(error: SMTPError) -> Verdict:
    """What a transaction that failed with ``error`` says of every recipient."""
    status = DeliveryStatus.TEMPORARY if error.temporary else DeliveryStatus.PERMANENT
    return Verdict(status, error.reply, error)


#: The sender's own failures, by reason, with the RFC 3463 code they defer with.
LOCAL_REASONS: dict[str, tuple[int, int, int]] = {
    "auth": (4, 7, 0),  # our credentials or SASL set-up (534, 535, 538, 454, 530)
    "tls": (4, 7, 0),  # TLS to the next hop
    "dns": (4, 4, 3),  # resolving the next hop
    "connection": (4, 4, 1),  # reaching the next hop
    "session": (4, 4, 2),  # the smarthost refused the session (greeting, EHLO)
    "config": (4, 3, 5),  # a configuration the sender cannot use (bad port, ...)
    "shutdown": (4, 3, 2),  # abandoned because the sender is stopping
    "software": (4, 3, 0),  # an unexpected error in the sender
}

#: Usage errors that are about the message, not about the sender: the next
#: hop can never take this message as it is. It is bounced (RFC 6531 §3.2 for
#: SMTPUTF8: an MTA rejects or bounces, it does not downgrade), with the
#: RFC 3463 code of each.
_MESSAGE_ERRORS: dict[type[UsageError], tuple[int, int, int]] = {
    UTF8Unsupported: (5, 6, 7),
    EightBitUnsupported: (5, 6, 3),
    MessageTooLarge: (5, 3, 4),
}

#: Steps before the first transaction: a reply there is about the session.
_SETUP_STEPS = (Step.CONNECT, Step.GREETING, Step.EHLO, Step.HELO, Step.STARTTLS, Step.TLS)


def local_reason(error: BaseException, *, smarthost: bool = False) -> str:
    """Why ``error`` is the sender's own failure rather than the message's;
    "" when it is the message's.

    A relay's own failures (its credentials, TLS, the network, DNS, its
    configuration) must never bounce a message: they would bounce every
    message, and then every bounce (Postfix's ``smtp_sasl_auth_soft_bounce``).
    With ``smarthost``, a refusal of the session itself (greeting, EHLO) is
    the relay's too: every message would meet it.
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


def failed(
    recipient: str,
    error: BaseException,
    *,
    smarthost: bool = False,
    domain: str | None = None,
    mx: str | None = None,
    port: int | None = None,
) -> Outcome:
    """The outcome for ``recipient`` of an attempt that failed as a whole with
    ``error``: temporary when the failure is, or when it is the sender's own
    (:func:`local_reason`; then any exception, a cancellation or a bug too)."""
    domain = recipient.rpartition("@")[2] if domain is None else domain
    reason = local_reason(error, smarthost=smarthost)
    if not isinstance(error, SMTPError):
        text = (
            "delivery abandoned: cancelled"
            if reason == "shutdown"
            else f"local error: {type(error).__name__}: {str(error) or type(error).__name__}"
        )
        wrapped = SMTPError(text, temporary=True)
        wrapped.__cause__ = error
        error = wrapped
    temporary = (
        bool(reason) or error.temporary or (error.reply is not None and error.reply.temporary)
    )
    status = DeliveryStatus.TEMPORARY if temporary else DeliveryStatus.PERMANENT
    return Outcome(
        recipient, domain, status, mx, reply=error.reply, error=error, port=port, local=reason
    )
