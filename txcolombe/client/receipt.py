"""What a successful transaction returns."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from txcolombe.codec.extensions import Extensions
from txcolombe.codec.reply import Reply


@dataclass(frozen=True)
class TLSInfo:
    """The TLS session a message went over."""

    version: str
    cipher: str
    implicit: bool


@dataclass(frozen=True)
class Receipt:
    """The outcome of one delivered message.

    :ivar accepted: each accepted recipient with the server's RCPT reply.
    :ivar refused: each refused recipient with the server's RCPT reply.
    :ivar reply: the server's reply to the end of data.
    :ivar tls: the TLS session used, or None for plaintext.
    :ivar extensions: what the server advertised (after STARTTLS, if used).
    :ivar parts: when the recipients were more than one transaction takes
        (RFC 5321 §4.5.3.1.8), each delivered transaction's own receipt
        (``reply`` is then the first one's); empty for one transaction.
    """

    accepted: Mapping[str, Reply]
    refused: Mapping[str, Reply]
    reply: Reply
    tls: TLSInfo | None = None
    extensions: Extensions = field(default_factory=Extensions)
    parts: tuple[Receipt, ...] = ()

    @property
    def queue_id(self) -> str | None:
        """The server's queue id for the message, if its reply names one."""
        return self.reply.queue_id
