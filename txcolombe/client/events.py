"""What the client machine tells its driver: one class per event, no I/O.

:meth:`~txcolombe.client.machine.ClientMachine.next_event` returns these.
A send (:meth:`~txcolombe.client.machine.ClientMachine.start_transaction`)
is named by the handle it returned, and every event about it carries that
handle: a driver maps handles to its callers (a ``Deferred``, a body) and
never needs to know in which order the machine runs them. Each handle ends
with exactly one :class:`TransactionDone` or :class:`TransactionRefused`,
unless a :class:`SessionFailed` ends the whole session first.
"""

from __future__ import annotations

from dataclasses import dataclass

from txcolombe.codec.errors import SMTPError
from txcolombe.codec.extensions import Extensions
from txcolombe.codec.reply import Reply

#: Names one send of :meth:`~txcolombe.client.machine.ClientMachine.start_transaction`.
Handle = int


class Event:
    """Base class of what :meth:`ClientMachine.next_event` returns."""


@dataclass(frozen=True)
class Ready(Event):
    """The session is set up: transactions run from now on."""

    extensions: Extensions
    tls: bool


@dataclass(frozen=True)
class StartTLS(Event):
    """The server said 220 to STARTTLS: start TLS, then call ``tls_started``."""


@dataclass(frozen=True)
class BodyWanted(Event):
    """Send the body of ``handle`` now (``send_body``, then ``end_body``).

    ``again`` is True when another transaction of the same send follows
    (its recipients are split over several, RFC 5321 §4.5.3.1.8): the
    driver must then be able to produce the same body once more.
    """

    handle: Handle
    again: bool = False


@dataclass(frozen=True)
class BodyRefused(Event):
    """The server refused a BDAT chunk of ``handle``: stop producing its body.

    The machine has ended the transaction (RSET) already; a
    :class:`TransactionRefused` follows. No more body is to be sent.
    """

    handle: Handle


@dataclass(frozen=True)
class TransactionDone(Event):
    """The message of ``handle`` was accepted, for some recipients at least.

    :ivar accepted: each recipient the message was delivered to, with the
        server's reply to its RCPT.
    :ivar refused: each refused recipient with the reply that refused it.
        A recipient in neither was not tried (the session ended first).
    :ivar reply: the reply to the end of data (of the first transaction).
    :ivar parts: when the recipients were split over several transactions,
        each delivered transaction's own result; empty for one transaction.
    """

    handle: Handle
    accepted: dict[str, Reply]
    refused: dict[str, Reply]
    reply: Reply
    parts: tuple[TransactionDone, ...] = ()


@dataclass(frozen=True)
class TransactionRefused(Event):
    """The message of ``handle`` was not accepted; the session goes on.

    (Named so as not to be confused with the exception
    :class:`txcolombe.TransactionFailed`, a 554 reply.)
    """

    handle: Handle
    error: SMTPError


@dataclass(frozen=True)
class SessionFailed(Event):
    """The session cannot go on; every send not yet reported fails with
    ``error``, and a :class:`Closed` follows."""

    error: SMTPError


@dataclass(frozen=True)
class Closed(Event):
    """The conversation is over: close the transport.

    ``clean`` is False when the transport must be aborted rather than closed
    gracefully (e.g. in the middle of a body).
    """

    clean: bool = True
