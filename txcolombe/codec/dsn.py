"""Delivery status notification requests (RFC 3461) and their wire forms.

:class:`DSN` holds the per-message options (RET, ENVID) and the defaults for
each recipient (NOTIFY, ORCPT); :class:`Recipient` overrides them for one
address. Nothing here does I/O: the machine turns these into MAIL and RCPT
parameters when the server advertises DSN.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from txcolombe.codec.address import Mailbox, parse_recipient
from txcolombe.codec.errors import UsageError


class Notify(enum.Enum):
    """When the recipient's server should send a notification."""

    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    DELAY = "DELAY"
    NEVER = "NEVER"


class Return(enum.Enum):
    """What a failure notification carries: the full message or its headers."""

    FULL = "FULL"
    HDRS = "HDRS"


def xtext(value: str) -> str:
    """RFC 3461 §4 xtext: "+", "=" and anything outside "!".."~" as ``+XX``."""
    out = []
    for byte in value.encode("utf-8"):
        if 33 <= byte <= 126 and byte not in (0x2B, 0x3D):
            out.append(chr(byte))
        else:
            out.append(f"+{byte:02X}")
    return "".join(out)


def notify_parameter(notify: frozenset[Notify]) -> str:
    """``NOTIFY=...``; NEVER cannot be combined with the others."""
    if Notify.NEVER in notify and len(notify) > 1:
        raise UsageError("NOTIFY=NEVER cannot be combined with other conditions")
    order = [Notify.SUCCESS, Notify.FAILURE, Notify.DELAY, Notify.NEVER]
    return "NOTIFY=" + ",".join(n.value for n in order if n in notify)


@dataclass(frozen=True)
class RecipientOptions:
    """The DSN parameters of one RCPT."""

    notify: frozenset[Notify] | None = None
    orcpt: str | None = None

    def parameters(self) -> str:
        params = ""
        if self.notify:
            params += " " + notify_parameter(self.notify)
        if self.orcpt is not None:
            params += f" ORCPT=rfc822;{xtext(self.orcpt)}"
        return params


#: The options of a recipient that has none: frozen, so one serves them all.
_NO_OPTIONS = RecipientOptions()


@dataclass(frozen=True)
class DSN:
    """DSN options for one message.

    :ivar ret: whether a failure notification returns the full message or
        only its headers.
    :ivar envid: an envelope identifier echoed in notifications (printable
        ASCII, at most 100 characters).
    :ivar notify: the default NOTIFY conditions for every recipient.
    :ivar orcpt: send each recipient's address as ORCPT (the original
        recipient), so notifications name it even after forwarding.
    """

    ret: Return | None = None
    envid: str | None = None
    notify: frozenset[Notify] | None = None
    orcpt: bool = False

    def __post_init__(self) -> None:
        if self.envid is not None and (
            not 0 < len(self.envid) <= 100 or not all(33 <= ord(c) <= 126 for c in self.envid)
        ):
            raise UsageError("ENVID must be 1 to 100 printable ASCII characters")
        if self.notify is not None:
            notify_parameter(self.notify)

    def mail_parameters(self) -> str:
        params = ""
        if self.ret is not None:
            params += f" RET={self.ret.value}"
        if self.envid is not None:
            params += f" ENVID={xtext(self.envid)}"
        return params


@dataclass(frozen=True)
class Recipient:
    """A recipient with its own DSN options: ``Recipient("bob@example.org",
    notify={Notify.FAILURE, Notify.DELAY})``."""

    address: str | Mailbox
    notify: Iterable[Notify] | None = None
    orcpt: str | None = None


def recipient_options(
    recipients: Iterable[str | Mailbox | Recipient], dsn: DSN | None
) -> tuple[tuple[Mailbox, ...], tuple[RecipientOptions, ...]]:
    """Parse recipients and give each its DSN options (empty when none apply)."""
    mailboxes: list[Mailbox] = []
    options: list[RecipientOptions] = []
    for item in recipients:
        if isinstance(item, Recipient):
            mailbox = parse_recipient(item.address)
            notify = frozenset(item.notify) if item.notify is not None else None
            orcpt = item.orcpt
        else:
            mailbox = parse_recipient(item)
            notify, orcpt = None, None
        if dsn is not None:
            notify = notify if notify is not None else dsn.notify
            if orcpt is None and dsn.orcpt:
                orcpt = str(mailbox)
        if notify is not None:
            notify_parameter(notify)
        mailboxes.append(mailbox)
        plain = notify is None and orcpt is None
        options.append(_NO_OPTIONS if plain else RecipientOptions(notify, orcpt))
    return tuple(mailboxes), tuple(options)
