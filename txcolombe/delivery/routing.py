"""Where a message for a domain goes: RFC 5321 §5.1 and RFC 7505, without I/O.

Every rule :func:`txcolombe.delivery.deliver` follows to turn recipients into
connection attempts lives here, as plain functions over plain values, so the
tests can check each one in memory:

- recipients are grouped by domain (A-labels, case-insensitive), address
  literals being their own destination;
- MX records are sorted by preference, equal preferences shuffled;
- a domain without MX records is its own (implicit) exchanger;
- a lone MX whose exchange is the root (``0 .``) is a null MX: no mail;
- each exchanger's addresses are interleaved by family and the whole list is
  capped (Postfix's ``smtp_mx_address_limit``, 5 by default);
- what a failed attempt means: try the next address, or stop.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import zip_longest

from txcolombe.codec.address import Mailbox, parse_domain, parse_recipient
from txcolombe.codec.dsn import Recipient
from txcolombe.codec.errors import (
    ConnectionFailed,
    InvalidAddress,
    RecipientsRefused,
    SMTPError,
    Step,
    UsageError,
)
from txcolombe.codec.reply import Reply

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Postfix's ``smtp_mx_address_limit``: addresses tried per delivery.
DEFAULT_MAX_ADDRESSES = 5
#: Postfix's ``smtp_mx_session_limit``: servers that may greet us per delivery.
DEFAULT_MAX_SESSIONS = 2

#: RFC 7505 §4.2 / RFC 3463 (RFC 7505 §4.3): what a null MX amounts to.
NULL_MX_REPLY = Reply.of(556, "5.1.10 Recipient address has null MX")


class AddressPreference(enum.Enum):
    """Which address family an exchanger's addresses start with."""

    IPV6 = "ipv6"
    IPV4 = "ipv4"


@dataclass(frozen=True, order=True)
class MX:
    """One MX record: ``exchange`` is a lower-case name without the final dot,
    ``""`` for the root (a null MX)."""

    preference: int
    exchange: str

    @classmethod
    def of(cls, preference: int, exchange: str) -> MX:
        """Normalise an exchange name as DNS gives it (``Mx1.Example.org.``)."""
        name = exchange.strip().rstrip(".").lower()
        return cls(preference, name)

    @property
    def null(self) -> bool:
        return self.exchange == ""


@dataclass(frozen=True)
class DomainRecipients:
    """The recipients of one domain, in the order they were given.

    :ivar domain: the A-label domain in lower case, or an address literal
        (``[192.0.2.1]``, ``[IPv6:2001:db8::1]``).
    :ivar recipients: each recipient as given (the key of the result) and parsed.
    :ivar options: the per-recipient DSN options (:class:`~txcolombe.codec.dsn.Recipient`)
        of the recipients given with them, by key.
    """

    domain: str
    recipients: tuple[tuple[str, Mailbox], ...]
    options: Mapping[str, Recipient] = field(default_factory=dict)


@dataclass(frozen=True)
class Grouping:
    """Recipients grouped by domain, and those that cannot be routed at all."""

    domains: tuple[DomainRecipients, ...]
    invalid: Mapping[str, UsageError] = field(default_factory=dict)


def domain_key(domain: str) -> str:
    """The routing key of a domain: A-labels in lower case, or the normalised
    address literal.

    :raises InvalidAddress: not a valid domain or literal.
    """
    parsed = parse_domain(domain)
    return parsed if parsed.startswith("[") else parsed.lower()


def recipient_key(recipient: str | Mailbox | Recipient) -> str:
    """The key of a recipient in a delivery's result: its address as given."""
    return str(recipient.address if isinstance(recipient, Recipient) else recipient)


def group_recipients(recipients: Iterable[str | Mailbox | Recipient]) -> Grouping:
    """Group ``recipients`` by domain, keeping the first of duplicates.

    A recipient that does not parse, or ``Postmaster`` without a domain
    (which names no destination), lands in :attr:`Grouping.invalid`.
    """
    groups: dict[str, list[tuple[str, Mailbox]]] = {}
    options: dict[str, dict[str, Recipient]] = {}
    seen: set[tuple[str, str]] = set()
    invalid: dict[str, UsageError] = {}
    for recipient in recipients:
        key = recipient_key(recipient)
        given = recipient.address if isinstance(recipient, Recipient) else recipient
        try:
            mailbox = parse_recipient(given)
            if mailbox.domain is None:
                raise InvalidAddress("Postmaster without a domain names no destination")
            domain = domain_key(mailbox.domain)
        except UsageError as error:
            invalid[key] = error
            continue
        # The local part is the destination's business: only the domain is
        # folded to lower case when recognising duplicates.
        identity = (mailbox.local, domain)
        if identity in seen or key in invalid:
            continue
        seen.add(identity)
        groups.setdefault(domain, []).append((key, mailbox))
        if isinstance(recipient, Recipient):
            options.setdefault(domain, {})[key] = dataclasses.replace(recipient, address=mailbox)
    return Grouping(
        tuple(
            DomainRecipients(domain, tuple(items), options.get(domain, {}))
            for domain, items in groups.items()
        ),
        invalid,
    )


def literal_address(domain: str) -> IPAddress | None:
    """The IP address of an address literal (``[192.0.2.1]``), else None."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    inner = domain[1:-1]
    if inner[:5].lower() == "ipv6:":
        inner = inner[5:]
    try:
        return ipaddress.ip_address(inner)
    except ValueError:
        return None


def is_null_mx(records: Sequence[MX]) -> bool:
    """True when the domain declares that it accepts no mail (RFC 7505 §3).

    A null MX is an MX whose exchange is the root. RFC 7505 forbids other MX
    records beside it; if a domain has some anyway, the null ones are only
    skipped (they have no address) and the others are used.
    """
    return bool(records) and all(record.null for record in records)


def order_exchangers(records: Sequence[MX], rng: random.Random | None = None) -> list[str]:
    """The exchangers to try, in order (RFC 5321 §5.1).

    Lowest preference first; records of equal preference in random order
    (taken from ``rng``, for tests); null exchanges dropped; a name listed
    twice is tried once, at its most preferred place.
    """
    chooser = rng if rng is not None else random.SystemRandom()
    by_preference: dict[int, list[str]] = {}
    # Sorting first makes the shuffle depend only on rng, not on the
    # order in which the DNS happened to list the records.
    for record in sorted(records):
        if not record.null:
            by_preference.setdefault(record.preference, []).append(record.exchange)
    ordered: list[str] = []
    for preference in sorted(by_preference):
        names = by_preference[preference]
        chooser.shuffle(names)
        ordered.extend(name for name in names if name not in ordered)
    return ordered


def loop_reply(domain: str) -> Reply:
    """The reply a mail loop amounts to, worded as Postfix words it."""
    return Reply.of(554, f"5.4.6 mail for {domain} loops back to myself")


def below_self(records: Sequence[MX], local_names: frozenset[str]) -> list[MX] | None:
    """RFC 5321 §5.1: keep only the MX records more preferred than our own.

    ``local_names`` are our own host names (lower case, no final dot). None
    when we are (one of) the best exchangers: sending would loop.
    """
    ours = [record.preference for record in records if record.exchange in local_names]
    if not ours:
        return list(records)
    kept = [record for record in records if record.preference < min(ours)]
    return kept or None


def implicit_exchanger(domain: str) -> list[str]:
    """RFC 5321 §5.1: without MX records the domain itself is the exchanger,
    as if it had an MX of preference 0."""
    return [domain]


def order_addresses(
    ipv6: Sequence[IPAddress],
    ipv4: Sequence[IPAddress],
    preference: AddressPreference = AddressPreference.IPV6,
) -> list[IPAddress]:
    """One exchanger's addresses, alternating families (RFC 8305 §4) from the
    preferred one, so a capped list still holds both families."""
    first, second = (ipv6, ipv4) if preference is AddressPreference.IPV6 else (ipv4, ipv6)
    ordered: list[IPAddress] = []
    for pair in zip_longest(first, second):
        ordered.extend(address for address in pair if address is not None)
    return ordered


@dataclass(frozen=True)
class Target:
    """One address to try: ``host`` is the exchanger's name (what its
    certificate must name), or the literal for an address literal."""

    host: str
    address: IPAddress


class Budget:
    """Postfix's two caps on one delivery: addresses tried and sessions held.

    An address counts when it is tried; a session when a server answered
    the connection (even with a refusal).
    """

    def __init__(
        self,
        max_addresses: int = DEFAULT_MAX_ADDRESSES,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
    ) -> None:
        if max_addresses < 1 or max_sessions < 1:
            raise UsageError("max_addresses and max_sessions must be at least 1")
        self.max_addresses = max_addresses
        self.max_sessions = max_sessions
        self.addresses = 0
        self.sessions = 0
        self._tried: set[IPAddress] = set()

    @property
    def exhausted(self) -> bool:
        return self.addresses >= self.max_addresses or self.sessions >= self.max_sessions

    def take(self, target: Target) -> bool:
        """Count ``target`` as tried; False when it must not be (cap reached,
        or the same address was tried already under another name)."""
        if self.exhausted or target.address in self._tried:
            return False
        self._tried.add(target.address)
        self.addresses += 1
        return True

    def session(self) -> None:
        """A server answered: one session used."""
        self.sessions += 1


def connected(error: SMTPError) -> bool:
    """False when ``error`` means no server answered at that address at all."""
    return not (isinstance(error, ConnectionFailed) and error.step is Step.CONNECT)


class Next(enum.Enum):
    """What a failed attempt means for the recipients still pending."""

    NEXT_ADDRESS = "try the next address"
    STOP = "stop: the outcome is final"


def after_session_error(error: SMTPError) -> Next:
    """A failure before the transaction (connection, greeting, EHLO, TLS):
    RFC 5321 §5.1 says try the next address, whatever the reply class.

    A caller's mistake (e.g. authentication over no TLS) stays one.
    """
    if isinstance(error, UsageError):
        return Next.STOP
    return Next.NEXT_ADDRESS


def after_transaction_error(error: SMTPError) -> Next:
    """A failure of the transaction itself (MAIL, RCPT, DATA, the body).

    A 5xx is the domain's answer: stop. A 4xx or a connection lost before
    the end of data may go better at the next exchanger (Postfix does the
    same). A connection lost after the final dot may have delivered the
    message: stop rather than deliver it twice. A caller's mistake stops.
    """
    if isinstance(error, UsageError):
        return Next.STOP
    if getattr(error, "maybe_delivered", False):
        return Next.STOP
    if isinstance(error, RecipientsRefused):
        return Next.NEXT_ADDRESS if any(r.temporary for r in error.refused.values()) else Next.STOP
    return Next.NEXT_ADDRESS if error.temporary else Next.STOP


def split_refused(
    refused: Mapping[str, Reply],
) -> tuple[dict[str, Reply], dict[str, Reply]]:
    """RCPT refusals as (temporary, permanent): 4xx recipients may be tried at
    the next exchanger, 5xx ones are final."""
    temporary = {rcpt: reply for rcpt, reply in refused.items() if reply.temporary}
    permanent = {rcpt: reply for rcpt, reply in refused.items() if not reply.temporary}
    return temporary, permanent
