"""The ``Received:`` trace header a server adds (RFC 5321 §4.4, RFC 3848)."""

from __future__ import annotations

import functools
import ipaddress
from datetime import UTC, datetime
from email.utils import format_datetime

from txcolombe.server.machine import ServerEnvelope


def received_header(
    envelope: ServerEnvelope, hostname: str, queue_id: str, when: float, software: str = "txcolombe"
) -> bytes:
    """One ``Received:`` field, folded, ending in CRLF.

    ``for <rcpt>`` names the recipient only when there is exactly one (the
    others would learn of each other otherwise). The TLS protocol and cipher,
    when known, are named as Postfix does (``(using TLSv1.3 with cipher ...)``).
    """
    date = _date(int(when))
    lines = [f"Received: from {envelope.helo}{_tcp_info(envelope.client_address)}"]
    if envelope.tls_details:
        lines.append(f"\t(using {envelope.tls_details})")
    lines.append(f"\tby {hostname} ({software}) with {envelope.protocol} id {queue_id}")
    if len(envelope.recipients) == 1:
        rcpt = str(envelope.recipients[0])
        if rcpt.isascii() or envelope.smtputf8:
            lines.append(f"\tfor <{rcpt}>")
    lines[-1] += f"; {date}"
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


def _tcp_info(client_address: str) -> str:
    """`` ([address])``; nothing for a client with no IP address (a UNIX socket's)."""
    try:
        ipaddress.ip_address(client_address)
    except ValueError:
        return ""
    return f" ([{client_address}])"


@functools.lru_cache(maxsize=4)
def _date(second: int) -> str:
    """The RFC 5322 date of a second (messages arriving in the same second share it)."""
    return format_datetime(datetime.fromtimestamp(second, UTC))
