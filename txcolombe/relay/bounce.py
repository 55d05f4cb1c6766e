"""Delivery status notifications (RFC 3464, RFC 3462 multipart/report).

:func:`build_dsn` writes the whole report as bytes with CRLF line ends: a
human-readable part, the ``message/delivery-status`` part (Reporting-MTA,
Arrival-Date, and per recipient Final-Recipient, Action, Status,
Remote-MTA, Diagnostic-Code) and the original headers
(``text/rfc822-headers``) or the whole original (``message/rfc822``).
It is sent from the null reverse-path, so it is never bounced itself.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime


@dataclass(frozen=True)
class RecipientReport:
    """One recipient's line in the report.

    :ivar action: ``failed`` or ``delayed`` (RFC 3464 §2.3.3).
    :ivar status: the RFC 3463 code, e.g. ``5.1.1``.
    :ivar diagnostic: the remote server's reply, e.g. ``550 5.1.1 No such user``.
    :ivar remote_mta: the server that answered, if any.
    """

    recipient: str
    action: str
    status: str
    diagnostic: str
    remote_mta: str | None = None


def _date(when: float) -> str:
    return format_datetime(datetime.fromtimestamp(when, UTC))


def _address_type(address: str) -> str:
    return "rfc822" if address.isascii() else "utf-8"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def original_headers(data: bytes) -> bytes:
    """The header section of a message (with its CRLF line ends)."""
    end = data.find(b"\r\n\r\n")
    return data[: end + 2] if end >= 0 else data


def build_dsn(
    *,
    reporting_mta: str,
    queue_id: str,
    original_sender: str,
    arrival: float,
    now: float,
    reports: Sequence[RecipientReport],
    original: bytes,
    attach_full: bool = False,
) -> bytes:
    """The bytes of a DSN for ``reports`` (all failed, or all delayed)."""
    delayed = all(r.action == "delayed" for r in reports)
    boundary = f"{queue_id}.{secrets.token_hex(8)}/{reporting_mta}"
    subject = (
        "Delayed Mail (still being retried)" if delayed else "Undelivered Mail Returned to Sender"
    )
    utf8 = not all(r.recipient.isascii() for r in reports) or not original_sender.isascii()
    head = [
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
        f"To: <{original_sender}>",
        f"Subject: {subject}",
        f"Date: {_date(now)}",
        f"Message-ID: <{queue_id}.{secrets.token_hex(4)}.dsn@{reporting_mta}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
        "",
        f"This is the mail system at host {reporting_mta}.",
        "",
    ]
    if delayed:
        head += [
            "Your message could not be delivered yet to the recipients below.",
            "It is still being retried; you do not need to send it again.",
        ]
    else:
        head += [
            "I'm sorry to have to inform you that your message could not",
            "be delivered to one or more recipients. It's attached below.",
        ]
    head.append("")
    for r in reports:
        head.append(f"<{r.recipient}>: {_one_line(r.diagnostic)}")
    status_type = "message/global-delivery-status" if utf8 else "message/delivery-status"
    head += [
        "",
        f"--{boundary}",
        f"Content-Type: {status_type}",
        "",
        f"Reporting-MTA: dns; {reporting_mta}",
        f"X-Queue-ID: {queue_id}",
        f"Arrival-Date: {_date(arrival)}",
    ]
    for r in reports:
        head += [
            "",
            f"Final-Recipient: {_address_type(r.recipient)}; {r.recipient}",
            f"Action: {r.action}",
            f"Status: {r.status}",
        ]
        if r.remote_mta:
            head.append(f"Remote-MTA: dns; {r.remote_mta}")
        head.append(f"Diagnostic-Code: smtp; {_one_line(r.diagnostic)}")
    if attach_full:
        content_type, attached = "message/rfc822", original
    else:
        content_type, attached = "text/rfc822-headers", original_headers(original)
    head += ["", f"--{boundary}", f"Content-Type: {content_type}", "", ""]
    text = "\r\n".join(head).encode("utf-8")
    if attached and not attached.endswith(b"\r\n"):
        attached += b"\r\n"
    return text + attached + f"\r\n--{boundary}--\r\n".encode()
