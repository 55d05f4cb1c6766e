"""What :func:`txcolombe.delivery.deliver` reports: per recipient, delivered (where,
with which reply, over which TLS and why) or a temporary or permanent
failure, with every address tried for its domain."""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from txcolombe.client.receipt import Receipt, TLSInfo
from txcolombe.codec.errors import (
    DNSFailure,
    NoMailExchanger,
    NoSuchDomain,
    PolicyViolation,
    SMTPError,
)
from txcolombe.codec.reply import Reply
from txcolombe.delivery.mtasts import Mode
from txcolombe.delivery.tlspolicy import TLSLevel, TLSPolicy

__all__ = ["Attempt", "DeliveryResult", "DeliveryStatus", "Outcome", "TLSStatus"]


class DeliveryStatus(enum.Enum):
    """What became of one recipient."""

    DELIVERED = "delivered"
    TEMPORARY = "temporary failure"
    """Not delivered; trying again later may succeed."""
    PERMANENT = "permanent failure"
    """Not delivered, and never will be as addressed: bounce it."""


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
        domain, 4.4.3 DNS failure, 4.4.4/5.4.4 unroutable, 4.7.5 MTA-STS)."""
        if self.reply is not None and self.reply.enhanced_status is not None:
            return self.reply.enhanced_status
        error = self.error
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
        return error.enhanced_status

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
