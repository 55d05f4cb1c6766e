"""Every failure txcolombe reports, as one exception hierarchy.

Callers catch at the level they need: :class:`SMTPError` for everything, a
family (:class:`AuthenticationError`, :class:`TemporaryFailure`, ...) or one
exact case (:class:`AuthenticationFailed`). Each error carries the server's
reply when there is one (code, enhanced status, text), the :class:`Step` that
failed, and whether retrying later may succeed (:attr:`SMTPError.temporary`).

"Whose fault" is part of the type: :class:`UsageError` is the caller's,
:class:`ProtocolError` the server's, :class:`ConnectionFailed` the network's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from txcolombe.codec.step import Step

if TYPE_CHECKING:
    from txcolombe.codec.reply import Reply


__all__ = [
    "AuthenticationError",
    "AuthenticationFailed",
    "AuthenticationRejected",
    "AuthenticationRequired",
    "AuthenticationUnavailable",
    "CommandRejected",
    "ConnectTimeout",
    "ConnectionFailed",
    "ConnectionLost",
    "ConnectionRefused",
    "DNSFailure",
    "EightBitUnsupported",
    "EncryptionRequired",
    "ExtensionUnavailable",
    "InsufficientStorage",
    "InvalidAddress",
    "InvalidArgument",
    "InvalidBody",
    "InvalidChallenge",
    "InvalidCredentials",
    "MTASTSError",
    "MailLoop",
    "MailboxBusy",
    "MailboxNameInvalid",
    "MailboxUnavailable",
    "MalformedReply",
    "MessageTooLarge",
    "NameResolutionFailed",
    "NoMailExchanger",
    "NoSuchDomain",
    "NullMX",
    "ParametersNotAccommodated",
    "ParametersNotRecognized",
    "PermanentFailure",
    "PolicyViolation",
    "ProcessingError",
    "ProtocolError",
    "RecipientsRefused",
    "ReplyError",
    "ReplyTooLong",
    "ResponseTimeout",
    "RoutingError",
    "SMTPError",
    "STARTTLSRefused",
    "STARTTLSUnavailable",
    "ServiceUnavailable",
    "Step",
    "StorageExceeded",
    "TLSError",
    "TLSFailure",
    "TemporaryFailure",
    "TransactionFailed",
    "TransactionLimit",
    "UTF8Unsupported",
    "UnexpectedResponse",
    "UnsupportedMechanism",
    "UsageError",
    "UserNotLocal",
    "WeakMechanism",
    "error_for_reply",
]


class SMTPError(Exception):
    """Base class of every error raised or returned by txcolombe.

    :ivar reply: the server's reply that caused it, if any.
    :ivar step: the step of the conversation that failed, if known.
    :ivar temporary: True when the same operation may succeed later (4xx
        replies, network trouble); False when it will not (5xx, bad input).
    """

    temporary: bool = False

    def __init__(
        self,
        message: str,
        *,
        reply: Reply | None = None,
        step: Step | None = None,
        temporary: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reply = reply
        self.step = step
        if temporary is not None:
            self.temporary = temporary

    @property
    def code(self) -> int | None:
        """The reply code (e.g. 550), or None when no reply caused this."""
        return self.reply.code if self.reply is not None else None

    @property
    def enhanced_status(self) -> tuple[int, int, int] | None:
        """The RFC 3463 enhanced status code (e.g. ``(5, 1, 1)``), if any."""
        return self.reply.enhanced_status if self.reply is not None else None

    @property
    def text(self) -> str | None:
        """The server's text, without code and enhanced status."""
        return self.reply.text if self.reply is not None else None

    def __str__(self) -> str:
        parts = [self.message]
        if self.step is not None:
            parts.append(f"(at {self.step.value})")
        if self.reply is not None:
            parts.append(f"server said: {self.reply}")
        return " ".join(parts)


# -- the caller's fault -------------------------------------------------------


class UsageError(SMTPError, ValueError):
    """The caller asked for something invalid; nothing was sent for it."""


class InvalidAddress(UsageError):
    """A mailbox, domain or path is malformed or holds CR, LF or NUL."""


class InvalidArgument(UsageError, TypeError):
    """An argument has the wrong type or an impossible value (a ``str`` port,
    an unreadable trust root file); also a ``TypeError`` for callers that
    caught that before."""


class InvalidCredentials(UsageError):
    """The :class:`~txcolombe.codec.sasl.Authentication` is incomplete or malformed
    (no password nor token, CR/LF in the username, ...)."""


class InvalidBody(UsageError):
    """The message body cannot be sent as it is (e.g. a line over 998 octets).

    The transaction is abandoned without the final dot, so the server
    stores nothing half-formed.
    """


class EightBitUnsupported(UsageError):
    """8-bit data for a server that does not advertise 8BITMIME."""


class UTF8Unsupported(UsageError):
    """A non-ASCII local part or a UTF-8 header for a server that does not offer SMTPUTF8."""


class MessageTooLarge(UsageError):
    """The message is larger than the SIZE the server advertised."""


class ExtensionUnavailable(UsageError):
    """The caller requires an extension the server does not offer (DSN,
    REQUIRETLS, CHUNKING, BINARYMIME); nothing was sent for the message.

    :ivar extension: the EHLO keyword that is missing.
    """

    def __init__(self, extension: str, message: str | None = None) -> None:
        super().__init__(message or f"the server does not offer {extension}", step=Step.MAIL)
        self.extension = extension


# -- connecting --------------------------------------------------------------


class ConnectionFailed(SMTPError):
    """The connection could not be made or was lost.

    :ivar maybe_delivered: True when this happened after the final dot and
        before its reply: the server may have accepted the message, so a
        retry may deliver it twice.
    """

    temporary = True
    maybe_delivered: bool = False


class NameResolutionFailed(ConnectionFailed):
    """The destination's name could not be resolved."""


class ConnectionRefused(ConnectionFailed):
    """The destination refused the TCP connection."""


class ConnectTimeout(ConnectionFailed):
    """No TCP connection within the connect timeout."""


class ConnectionLost(ConnectionFailed):
    """The connection closed before the conversation ended."""


class ResponseTimeout(ConnectionFailed):
    """The server did not answer within the timeout for this step."""


class TransactionLimit(SMTPError):
    """The connection has had as many transactions as the server takes
    (LIMITS MAILMAX, RFC 9422): nothing of this message was sent; another
    connection may take it."""

    temporary = True


# -- the server's fault -------------------------------------------------------


class ProtocolError(SMTPError):
    """The server broke the protocol."""

    temporary = True


class MalformedReply(ProtocolError):
    """A reply that is not SMTP: bad code, mixed codes, garbage."""


class ReplyTooLong(MalformedReply):
    """A reply line or a multi-line reply beyond the parser's bounds."""


class UnexpectedResponse(ProtocolError):
    """A well-formed reply that makes no sense at this point."""


# -- TLS ----------------------------------------------------------------------


class TLSError(SMTPError):
    """TLS could not be established or failed."""

    temporary = True


class TLSFailure(TLSError):
    """The TLS handshake failed, the certificate did not verify, or the TLS
    session broke (alert, unexpected close)."""


class STARTTLSUnavailable(TLSError):
    """TLS is required but the server does not offer STARTTLS."""


class STARTTLSRefused(TLSError):
    """The server answered STARTTLS with an error (e.g. 454)."""


# -- authentication -----------------------------------------------------------


class AuthenticationError(SMTPError):
    """Authentication could not be done or was refused."""


class AuthenticationUnavailable(AuthenticationError):
    """The server offers no AUTH, or not the requested mechanism."""


class InvalidChallenge(AuthenticationError):
    """The server's challenge is not valid base64 or not what the mechanism expects."""

    temporary = True


class UnsupportedMechanism(AuthenticationError):
    """504: the server does not support this mechanism."""


class AuthenticationRejected(AuthenticationError):
    """501: the server rejected the authentication exchange as malformed."""


class WeakMechanism(AuthenticationError):
    """534: the mechanism is too weak for the server's policy."""


class EncryptionRequired(AuthenticationError):
    """538: the server requires encryption for this mechanism."""


class AuthenticationFailed(AuthenticationError):
    """535: the credentials were refused."""


class AuthenticationRequired(AuthenticationError):
    """530: the server requires authentication for this command."""


# -- replies to the transaction --------------------------------------------------


class ReplyError(SMTPError):
    """The server answered a command with an error reply."""


class TemporaryFailure(ReplyError):
    """A 4xx reply: the same transaction may succeed later."""

    temporary = True


class ServiceUnavailable(TemporaryFailure):
    """421: the server is closing the connection."""


class MailboxBusy(TemporaryFailure):
    """450: mailbox unavailable (busy or temporarily blocked)."""


class ProcessingError(TemporaryFailure):
    """451: local error in processing."""


class InsufficientStorage(TemporaryFailure):
    """452: action not taken, insufficient system storage (or too many recipients)."""


class ParametersNotAccommodated(TemporaryFailure):
    """455: the server cannot accommodate the parameters."""


class PermanentFailure(ReplyError):
    """A 5xx reply: the same transaction will fail again."""


class MailboxUnavailable(PermanentFailure):
    """550: mailbox unavailable (not found, no access, policy)."""


class UserNotLocal(PermanentFailure):
    """551: user not local."""


class StorageExceeded(PermanentFailure):
    """552: exceeded storage allocation (often: message too big)."""


class MailboxNameInvalid(PermanentFailure):
    """553: mailbox name not allowed."""


class TransactionFailed(PermanentFailure):
    """554: transaction failed (or, as greeting, no SMTP service here)."""


class ParametersNotRecognized(PermanentFailure):
    """555: MAIL FROM/RCPT TO parameters not recognised or not implemented."""


class CommandRejected(PermanentFailure):
    """500-504 to a command other than AUTH: syntax error or not implemented."""


class RecipientsRefused(ReplyError):
    """No recipient was accepted (or, in all-or-nothing mode, not all were).

    :ivar refused: each refused recipient with the server's reply.
    """

    def __init__(
        self, message: str, refused: Mapping[str, Reply], *, step: Step = Step.RCPT
    ) -> None:
        self.refused = dict(refused)
        temporary = bool(self.refused) and all(r.code // 100 == 4 for r in self.refused.values())
        listing = "; ".join(f"<{rcpt}>: {reply}" for rcpt, reply in self.refused.items())
        super().__init__(f"{message}: {listing}", step=step, temporary=temporary)


_AUTH_ERRORS: dict[int, type[AuthenticationError]] = {
    501: AuthenticationRejected,
    504: UnsupportedMechanism,
    530: AuthenticationRequired,
    534: WeakMechanism,
    535: AuthenticationFailed,
    538: EncryptionRequired,
}

_REPLY_ERRORS: dict[int, type[ReplyError]] = {
    421: ServiceUnavailable,
    450: MailboxBusy,
    451: ProcessingError,
    452: InsufficientStorage,
    455: ParametersNotAccommodated,
    500: CommandRejected,
    501: CommandRejected,
    502: CommandRejected,
    503: CommandRejected,
    504: CommandRejected,
    550: MailboxUnavailable,
    551: UserNotLocal,
    552: StorageExceeded,
    553: MailboxNameInvalid,
    554: TransactionFailed,
    555: ParametersNotRecognized,
}


def error_for_reply(reply: Reply, step: Step | None, message: str | None = None) -> SMTPError:
    """The exception that a negative ``reply`` to ``step`` stands for
    (``step`` None: a reply to no command)."""
    text = message or (f"{step.value} refused" if step is not None else "unexpected reply")
    if reply.code == 421:
        return ServiceUnavailable("service not available", reply=reply, step=step)
    if step is Step.STARTTLS:
        return STARTTLSRefused("STARTTLS refused", reply=reply, step=step)
    if step is Step.AUTH and reply.code in _AUTH_ERRORS:
        return _AUTH_ERRORS[reply.code](text, reply=reply, step=step)
    if reply.code == 530:
        return AuthenticationRequired("authentication required", reply=reply, step=step)
    cls = _REPLY_ERRORS.get(reply.code)
    if cls is not None:
        return cls(text, reply=reply, step=step)
    if reply.code // 100 == 4:
        return TemporaryFailure(text, reply=reply, step=step)
    if reply.code // 100 == 5:
        return PermanentFailure(text, reply=reply, step=step)
    return UnexpectedResponse(text, reply=reply, step=step)


# -- routing a message to the recipients' domain (deliver) -----------------------


class RoutingError(SMTPError):
    """The recipients' domain could not be routed to a usable mail exchanger."""


class NoSuchDomain(RoutingError, NameResolutionFailed):
    """The recipients' domain does not exist (NXDOMAIN): a permanent failure."""

    temporary = False


class DNSFailure(RoutingError, NameResolutionFailed):
    """A DNS lookup failed for now (SERVFAIL, timeout, refused): try again later."""

    temporary = True


class NullMX(RoutingError):
    """The domain publishes a null MX (RFC 7505): it accepts no mail, ever.

    Carries a synthesised ``556 5.1.10`` reply.
    """

    temporary = False


class NoMailExchanger(RoutingError):
    """No mail exchanger of the domain has an address to connect to.

    Temporary when a lookup failed for now, permanent when every lookup
    answered that the names have no address.
    """


class MailLoop(RoutingError):
    """We are the domain's best mail exchanger, so sending would mail
    ourselves (RFC 5321 §5.1). Carries a synthesised ``554 5.4.6`` reply."""

    temporary = False


class PolicyViolation(RoutingError):
    """The domain's MTA-STS policy (mode ``enforce``) forbids every mail exchanger
    that could be tried, so nothing was sent (RFC 8461 §5: a temporary failure)."""

    temporary = True


class MTASTSError(SMTPError):
    """An MTA-STS policy could not be fetched or is invalid (RFC 8461).

    It never fails a delivery by itself: the domain is then treated as having
    no policy (or its cached policy is used).
    """

    temporary = True
