"""What the server machine tells its driver: the envelope it received and its events.

:meth:`~txcolombe.server.machine.ServerMachine.next_event` returns these; the
machine's docstring says what the driver does with each. No I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from txcolombe.codec.address import Mailbox
from txcolombe.codec.reply import Reply

GREETING = "<greeting>"
"""The pseudo-verb of :class:`CommandRead` for the greeting (``intercept`` only)."""

END_OF_DATA = "<end of data>"
"""The pseudo-verb of :class:`CommandRead` for the end of a message: the final
dot of DATA, or a ``BDAT ... LAST`` chunk (``intercept`` only)."""


@dataclass(frozen=True)
class ServerEnvelope:
    """A received message's envelope and trace information.

    :ivar protocol: the ``with`` keyword of the Received header (RFC 3848,
        RFC 6531): SMTP, ESMTP, ESMTPS, ESMTPSA, UTF8SMTPSA...
    :ivar body_type: the client's BODY parameter (7BIT, 8BITMIME, BINARYMIME) or None.
    :ivar tls_details: the TLS protocol and cipher, as the driver told them.
    :ivar paths: the reverse-path, then each forward-path, as the client
        wrote them (without angle brackets).
    :ivar mail_parameters: the MAIL parameters as written, e.g. ``("SIZE=12",)``.
    :ivar rcpt_parameters: each recipient's RCPT parameters as written.
    """

    sender: Mailbox | None
    recipients: tuple[Mailbox, ...]
    helo: str
    client_address: str
    protocol: str
    tls: bool
    authenticated: str | None
    smtputf8: bool = False
    body_type: str | None = None
    tls_details: str | None = None
    paths: tuple[str, ...] = ()
    mail_parameters: tuple[str, ...] = ()
    rcpt_parameters: tuple[tuple[str, ...], ...] = ()


class ServerEvent:
    """Base class of what :meth:`ServerMachine.next_event` returns."""


@dataclass(frozen=True)
class ServerStartTLS(ServerEvent):
    """The client asked for TLS and got 220: start TLS, then ``tls_started()``."""


@dataclass(frozen=True)
class AuthRequest(ServerEvent):
    """Check these credentials, then call ``auth_result()``."""

    mechanism: str
    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class MessageReceived(ServerEvent):
    """A complete message: store it, then call ``message_result()``.

    :ivar data: the message as received, dot-unstuffed (DATA) or as chunked
        (BDAT); after :class:`BodyData` parts, only the rest.
    """

    envelope: ServerEnvelope
    data: bytes = field(repr=False)


@dataclass(frozen=True)
class BodyData(ServerEvent):
    """Part of the body of the message being received (dot-unstuffed, whole
    lines), handed over because more than ``body_chunk`` octets are held."""

    envelope: ServerEnvelope
    data: bytes = field(repr=False)


@dataclass(frozen=True)
class DataAborted(ServerEvent):
    """The message whose parts went out as :class:`BodyData` is refused:
    forget those parts."""


@dataclass(frozen=True)
class Delay(ServerEvent):
    """Wait ``seconds``, then call ``wake()``: a client making errors."""

    seconds: float


@dataclass(frozen=True)
class Rejected(ServerEvent):
    """A policy refusal (Postfix's ``NOQUEUE: reject:``), for the log.

    :ivar stage: the command refused (CONNECT, MAIL, RCPT, DATA, END-OF-MESSAGE).
    """

    stage: str
    reply: Reply
    sender: Mailbox | None
    recipient: Mailbox | None
    helo: str | None


@dataclass(frozen=True)
class CommandRead(ServerEvent):
    """(``intercept`` only) The machine is about to act on ``verb``: call
    ``proceed()`` for its usual answer, or ``override()`` with another.

    :ivar verb: the command's first word in upper case (``"AUTH"`` for a
        line of an AUTH exchange), or :data:`GREETING` / :data:`END_OF_DATA`.
    :ivar argument: the rest of the line (the whole line in an AUTH exchange).
    :ivar line: the line as received (empty for the pseudo-verbs).
    """

    verb: str
    argument: str
    line: str


@dataclass(frozen=True)
class Close(ServerEvent):
    """Close the connection once the pending bytes are written."""
