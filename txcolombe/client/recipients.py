"""Large recipient lists: one send over as many transactions as the server needs.

RFC 5321 §4.5.3.1.8 makes servers take at least 100 recipients per
transaction and lets them refuse more with 452 (§4.5.3.1.10: or with 552,
which a client treats as temporary); RFC 9422's LIMITS extension
advertises RCPTMAX (and RCPTDOMAINMAX, distinct domains per transaction).
The machine takes each transaction's recipients with :func:`take_batch`,
puts back those a "too many recipients" reply deferred, and merges what the
transactions of one send gave with :class:`Tally`. Pure data, no I/O.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from txcolombe.client.events import Handle, TransactionDone, TransactionRefused
from txcolombe.codec.address import Mailbox
from txcolombe.codec.errors import RecipientsRefused, SMTPError
from txcolombe.codec.extensions import Extensions
from txcolombe.codec.reply import Reply

#: Recipients per transaction unless told otherwise: the minimum every
#: server must accept (RFC 5321 §4.5.3.1.8).
DEFAULT_MAX_RECIPIENTS = 100


def server_limits(extensions: Extensions) -> dict[str, int]:
    """The LIMITS a server advertised (RFC 9422), e.g. ``{"RCPTMAX": 50}``.

    Malformed or non-positive values are ignored, as unknown names are.
    """
    limits: dict[str, int] = {}
    for item in extensions.get("LIMITS", ()):
        name, sep, value = item.partition("=")
        if sep and value.isascii() and value.isdigit() and int(value) > 0:
            limits[name.upper()] = int(value)
    return limits


def too_many_recipients(reply: Reply) -> bool:
    """A reply to RCPT that says the transaction has reached its recipient limit.

    452 or 552 (RFC 5321 §4.5.3.1.10) with the enhanced status x.5.3 (RFC
    3463: too many recipients) or, without one, saying so in its text. A
    452 4.3.1 (out of storage) is an ordinary temporary refusal.
    """
    if reply.code not in (452, 552):
        return False
    if reply.enhanced_status is not None:
        return reply.enhanced_status[1:] == (5, 3)
    return "too many recipients" in reply.text.lower()


def as_temporary(reply: Reply) -> Reply:
    """A "too many recipients" 552 read as the 452 it should have been (§4.5.3.1.10)."""
    if reply.code != 552:
        return reply
    lines = tuple(line.replace("5.5.3", "4.5.3", 1) for line in reply.lines)
    return Reply.of(452, *lines)


def take_batch(
    todo: deque[int],
    recipients: Sequence[Mailbox],
    limit: int | None,
    domain_limit: int | None = None,
) -> list[int]:
    """Take the next transaction's recipients (indices into ``recipients``) off ``todo``.

    At most ``limit`` of them, in order, from at most ``domain_limit``
    distinct domains; a recipient of one domain too many stays in ``todo``
    for a later transaction.
    """
    batch: list[int] = []
    domains: set[str | None] = set()
    skipped: list[int] = []
    while todo and (limit is None or len(batch) < limit):
        index = todo.popleft()
        domain = recipients[index].domain
        key = domain.lower() if domain is not None else None
        if domain_limit is not None and key not in domains and len(domains) >= domain_limit:
            skipped.append(index)
            continue
        domains.add(key)
        batch.append(index)
    todo.extendleft(reversed(skipped))
    return batch


@dataclass
class Tally:
    """What the transactions of one send have given, merged into one result."""

    parts: list[TransactionDone] = field(default_factory=list)
    #: Each failed transaction: its recipients, its error, its refused RCPTs.
    failures: list[tuple[list[str], SMTPError, dict[str, Reply]]] = field(default_factory=list)

    def delivered(self, part: TransactionDone) -> None:
        self.parts.append(part)

    def failed(self, names: list[str], error: SMTPError, refused: dict[str, Reply]) -> None:
        self.failures.append((names, error, dict(refused)))

    def result(self, handle: Handle) -> TransactionDone | TransactionRefused:
        """The send's one event: done if any transaction delivered the message."""
        if self.parts:
            return self.done(handle)
        errors = [error for _, error, _ in self.failures]
        if len(errors) == 1:
            return TransactionRefused(handle, errors[0])
        # A failure of the message itself (MAIL, DATA refused) says more
        # than the recipients refused in other transactions.
        whole = next((e for e in errors if not isinstance(e, RecipientsRefused)), None)
        if whole is not None:
            return TransactionRefused(handle, whole)
        refused: dict[str, Reply] = {}
        for _, _, rcpt_refused in self.failures:
            refused.update(rcpt_refused)
        return TransactionRefused(handle, RecipientsRefused("no recipient was accepted", refused))

    def done(self, handle: Handle) -> TransactionDone:
        """What was delivered so far, every recipient with the reply that decided it."""
        if len(self.parts) == 1 and not self.failures:
            return self.parts[0]
        accepted: dict[str, Reply] = {}
        refused: dict[str, Reply] = {}
        for part in self.parts:
            accepted.update(part.accepted)
            refused.update(part.refused)
        for names, error, rcpt_refused in self.failures:
            refused.update(rcpt_refused)
            if error.reply is not None and not isinstance(error, RecipientsRefused):
                # The transaction failed as a whole: its reply is each one's.
                for name in names:
                    refused.setdefault(name, error.reply)
        refused = {name: reply for name, reply in refused.items() if name not in accepted}
        first = self.parts[0]
        return TransactionDone(handle, accepted, refused, first.reply, tuple(self.parts))
