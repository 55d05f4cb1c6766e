"""The two functions most users need: :func:`sendmail` and :func:`submit`.

Each is a thin layer over :func:`txcolombe.client.session.connect`: connect, send
one message, QUIT. The result fires on the reply that decides the outcome
(the final 250, or the error); QUIT and close follow in the background.
Keep a :class:`~txcolombe.client.session.Session` instead to send several messages
over one connection.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from txcolombe.client.body import Body
from txcolombe.client.connect import Destination
from txcolombe.client.machine import TLSMode
from txcolombe.client.options import DEFAULT_TIMEOUTS, ConnectOptions, MessageOptions, Timeouts
from txcolombe.client.receipt import Receipt
from txcolombe.client.session import Session, TrustRoot, check_message, open_session
from txcolombe.client.signing import DKIM, signed_body, signers
from txcolombe.codec.address import Mailbox
from txcolombe.codec.dsn import DSN, Recipient
from txcolombe.codec.errors import SMTPError
from txcolombe.codec.sasl import Authentication

log = Logger(namespace="txcolombe")

SMTP_PORT = 25
SUBMISSIONS_PORT = 465
SUBMISSION_PORT = 587


def sendmail(
    destination: Destination,
    sender: str | Mailbox | None,
    recipients: Iterable[str | Mailbox | Recipient],
    body: Body,
    *,
    port: int = SMTP_PORT,
    domain: str | None = None,
    tls: IOpenSSLClientConnectionCreator | None = None,
    trust_root: TrustRoot | None = None,
    authentication: Authentication | None = None,
    starttls: bool = True,
    all_or_nothing: bool = False,
    dsn: DSN | None = None,
    requiretls: bool = False,
    chunking: bool | None = None,
    binary: bool = False,
    timeouts: Timeouts = DEFAULT_TIMEOUTS,
    reactor: Any = None,
    endpoint: IStreamClientEndpoint | None = None,
    dkim: DKIM = None,
    max_recipients: int | None = 100,
) -> Deferred[Receipt]:
    """Deliver a message straight to ``destination`` (port 25 by default).

    STARTTLS is used whenever the server offers it, with the certificate
    verified against ``destination`` (on ``trust_root`` if given), unless
    ``tls`` gives other options. ``authentication`` is optional and never
    sent in clear: without STARTTLS it fails with
    :class:`~txcolombe.codec.errors.STARTTLSUnavailable`. ``starttls=False`` keeps
    the session in plaintext (and so forbids authentication).

    ``dsn``, ``requiretls``, ``chunking`` and ``binary`` are as for
    :meth:`txcolombe.client.session.Session.send`. ``dkim`` is one
    :class:`~txcolombe.codec.dkim.DKIMSigner` or several (one signature each): the
    body is signed before the connection is made. ``max_recipients`` (100)
    caps the recipients of one transaction: more go in further transactions
    on the same connection, with one :class:`Receipt`.

    :returns: a Deferred that fires with a :class:`Receipt`, or fails with
        an :class:`~txcolombe.codec.errors.SMTPError`. Cancelling it aborts the
        connection.
    """
    mode = TLSMode.OPPORTUNISTIC if starttls else TLSMode.NONE
    return _send_one(
        destination, sender, recipients, body,
        ConnectOptions(
            port, mode, domain, tls, trust_root, authentication, timeouts, endpoint,
            max_recipients=max_recipients,
        ),
        MessageOptions(all_or_nothing, dsn, requiretls, chunking, binary),
        reactor,
        dkim,
    )  # fmt: skip


def submit(
    destination: Destination,
    sender: str | Mailbox | None,
    recipients: Iterable[str | Mailbox | Recipient],
    body: Body,
    *,
    port: int = SUBMISSIONS_PORT,
    starttls: bool | None = None,
    domain: str | None = None,
    tls: IOpenSSLClientConnectionCreator | None = None,
    trust_root: TrustRoot | None = None,
    authentication: Authentication | None = None,
    all_or_nothing: bool = False,
    dsn: DSN | None = None,
    requiretls: bool = False,
    chunking: bool | None = None,
    binary: bool = False,
    timeouts: Timeouts = DEFAULT_TIMEOUTS,
    reactor: Any = None,
    endpoint: IStreamClientEndpoint | None = None,
    dkim: DKIM = None,
    max_recipients: int | None = 100,
) -> Deferred[Receipt]:
    """Hand a message to a submission server (an authority) for delivery.

    Port 465 (the default) speaks TLS from the first byte; port 587 uses
    STARTTLS, which is then required. Any other port uses implicit TLS
    unless ``starttls=True``. ``authentication`` is sent only under TLS.
    ``dkim`` signs the message as for :func:`sendmail`.

    :returns: a Deferred that fires with a :class:`Receipt`, or fails with
        an :class:`~txcolombe.codec.errors.SMTPError`.
    """
    if starttls is None:
        starttls = port == SUBMISSION_PORT
    mode = TLSMode.REQUIRED if starttls else TLSMode.IMPLICIT
    return _send_one(
        destination, sender, recipients, body,
        ConnectOptions(
            port, mode, domain, tls, trust_root, authentication, timeouts, endpoint,
            max_recipients=max_recipients,
        ),
        MessageOptions(all_or_nothing, dsn, requiretls, chunking, binary),
        reactor,
        dkim,
    )  # fmt: skip


def _send_one(
    destination: Destination,
    sender: str | Mailbox | None,
    recipients: Iterable[str | Mailbox | Recipient],
    body: Body,
    options: ConnectOptions,
    message: MessageOptions,
    reactor: Any,
    dkim: DKIM,
) -> Deferred[Receipt]:
    try:
        recipients = check_message(sender, recipients, body, dsn=message.dsn)
        signing = signers(dkim)
    except SMTPError as error:
        return fail(error)
    if not signing:
        # Callbacks, not a coroutine: no signing pass to wait for, and this
        # is every message's path when each one has its own connection.
        try:
            connected = open_session(destination, options, reactor)
        except Exception:  # what a bug raises still goes to the Deferred
            return fail()
        # Cancelling the result cancels what is under way: the connection
        # attempt or session set-up, else the send (Twisted forwards it).
        result: Deferred[Receipt] = Deferred(lambda _: connected.cancel())
        connected.addCallback(_send_then_quit, sender, recipients, body, message)
        connected.addBoth(_settle, result)
        return result

    async def signed() -> Receipt:
        async with signed_body(body, signing) as signed_message:
            session: Session = await open_session(destination, options, reactor)
            return await _send_then_quit(session, sender, recipients, signed_message, message)

    return Deferred.fromCoroutine(signed())


def _send_then_quit(
    session: Session,
    sender: str | Mailbox | None,
    recipients: tuple[str | Mailbox | Recipient, ...],
    body: Body,
    message: MessageOptions,
) -> Deferred[Receipt]:
    """Send the one message, then QUIT whatever its outcome.

    QUIT is asked for at once: it follows the message's last command (with
    PIPELINING, it leaves with the final dot). The reply that decided the
    outcome is reported as soon as it comes: QUIT and close go on in the
    background, bounded by the quit timeout.
    """
    sent = session.send_message(sender, recipients, body, message)
    session.quit().addErrback(_quit_failed, session)
    return sent


def _settle(outcome: object, result: Deferred[Receipt]) -> None:
    """Hand the outcome to the caller's Deferred, unless it was cancelled."""
    if result.called:
        return
    if isinstance(outcome, Failure):
        result.errback(outcome)
    else:
        result.callback(outcome)  # type: ignore[arg-type]


def _quit_failed(failure: Failure, session: Session) -> None:
    """A QUIT that failed after the outcome was known changes nothing: log it."""
    log.debug(
        "QUIT to {host}:{port} failed after the message's outcome: {error}",
        host=session.host.name,
        port=session.port,
        error=failure.value,
    )
