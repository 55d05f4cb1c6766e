"""A reusable SMTP session: connect, greet, upgrade and authenticate once, then
run transactions one after another (colombe's ``Sendmail_with_starttls.many``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from types import TracebackType
from typing import Any

from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.interfaces import (
    IAddress,
    IOpenSSLClientConnectionCreator,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, trustRootFromCertificates
from twisted.internet.task import Cooperator
from twisted.python.failure import Failure

from txcolombe.address import Mailbox, parse_domain, parse_sender
from txcolombe.auth import Authentication, resolve_token
from txcolombe.body import Body, body_producer, check_body, known_length
from txcolombe.connect import (
    Destination,
    Host,
    connect_error,
    default_domain,
    endpoint_for,
    tls_options,
    wrap_tls,
)
from txcolombe.dsn import DSN, Recipient, recipient_options
from txcolombe.errors import (
    AuthenticationError,
    InvalidArgument,
    SMTPError,
    Step,
    UsageError,
)
from txcolombe.extensions import Extensions
from txcolombe.machine import ClientMachine, Envelope, TLSMode
from txcolombe.protocol import DEFAULT_TIMEOUTS, SMTPClientProtocol, Timeouts
from txcolombe.receipt import Receipt, TLSInfo

#: A trust root, or the path of a PEM file of CA certificates.
TrustRoot = IOpenSSLTrustRoot | str | os.PathLike[str]


class Session:
    """A connected SMTP session, ready for transactions.

    Get one from :func:`connect`. Use it as an async context manager to QUIT
    at the end: ``async with await connect(...) as session: ...``.
    """

    def __init__(
        self,
        protocol: SMTPClientProtocol,
        host: Host,
        port: int,
        cooperator: Cooperator | None = None,
    ) -> None:
        self._protocol = protocol
        self._cooperator = cooperator
        self.host = host
        self.port = port

    @property
    def extensions(self) -> Extensions:
        """What the server advertised (after STARTTLS, if used)."""
        return self._protocol.machine.extensions

    @property
    def tls(self) -> TLSInfo | None:
        """The TLS session, or None for plaintext."""
        return self._protocol.tls_info

    @property
    def usable(self) -> bool:
        """True while the session can run transactions."""
        return self._protocol.usable

    @property
    def closed(self) -> Deferred[None]:
        """Fires when the connection is gone."""
        return self._protocol.closed

    def send(
        self,
        sender: str | Mailbox | None,
        recipients: Iterable[str | Mailbox | Recipient],
        body: Body,
        *,
        all_or_nothing: bool = False,
        dsn: DSN | None = None,
        requiretls: bool = False,
        chunking: bool | None = None,
        binary: bool = False,
        reset_first: bool = False,
        body_type: str | None = None,
        smtputf8: bool = False,
        utf8_headers: bool = False,
    ) -> Deferred[Receipt]:
        """Send one message; fires with its :class:`Receipt`.

        Delivers to every accepted recipient and lists the refused ones in
        the receipt; fails with :class:`~txcolombe.errors.RecipientsRefused`
        when none is accepted (or, with ``all_or_nothing``, when any is
        refused), sending no DATA. After a failed transaction the session
        stays usable unless the error says the connection is gone. Several
        sends may be queued at once: they run in order, pipelined.

        Cancelling the Deferred: a send still queued just leaves the queue;
        one started ends with RSET if its DATA has not left yet (the session
        stays usable for the next); one whose DATA or body is under way can
        only be stopped by aborting the connection.

        :param dsn: delivery status notification options (RFC 3461); a
            :class:`~txcolombe.dsn.Recipient` sets them for one recipient.
        :param requiretls: ask for REQUIRETLS (RFC 8689).
        :param chunking: BDAT (RFC 3030): None uses it when offered with
            PIPELINING, True requires it, False never uses it.
        :param binary: send the body untouched with BODY=BINARYMIME.
        :param reset_first: send RSET before MAIL (pipelined when the server
            allows): checks that a connection that sat idle is still alive
            before the message is at stake.
        :param body_type: the BODY the message came with, for a relay to
            pass on: None (the default) or "8BITMIME" say BODY=8BITMIME when
            the server offers it; "7BIT" sends no BODY parameter.
        :param smtputf8: the message came with SMTPUTF8: say it when the
            server offers it (a non-ASCII address always needs it).
        :param utf8_headers: the header has UTF-8 (RFC 6532): a server
            without SMTPUTF8 gets nothing (:class:`~txcolombe.errors.UTF8Unsupported`).
        :raises ExtensionUnavailable: (as a failure) an option needs an
            extension the server lacks; nothing is sent for the message.
        """
        try:
            if body_type not in (None, "7BIT", "8BITMIME"):
                raise UsageError(f"body_type is None, '7BIT' or '8BITMIME', not {body_type!r}")
            recipients = check_message(sender, recipients, body, dsn=dsn)
            mailboxes, options = recipient_options(recipients, dsn)
            producer = body_producer(body, cooperator=self._cooperator)
            envelope = Envelope(
                parse_sender(sender),
                mailboxes,
                size=known_length(producer),
                all_or_nothing=all_or_nothing,
                rcpt_options=options,
                dsn=dsn,
                requiretls=requiretls,
                chunking=chunking,
                binary=binary,
                reset_first=reset_first,
                body_type=body_type,
                smtputf8=smtputf8,
                utf8_headers=utf8_headers,
            )
        except SMTPError as error:
            return fail(error)
        return self._protocol.send(envelope, producer)

    def quit(self) -> Deferred[None]:
        """QUIT and close; fires when the connection is gone."""
        return self._protocol.quit()

    def abort(self) -> None:
        """Drop the connection at once."""
        self._protocol.abort()

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.quit()


def check_message(
    sender: object,
    recipients: object,
    body: object,
    *,
    dsn: object = None,
) -> tuple[str | Mailbox | Recipient, ...]:
    """Validate a message's arguments before anything is connected or sent.

    Parses the sender and every recipient, checks the body's kind (without
    reading it) and the DSN options. :func:`txcolombe.api.sendmail`,
    :func:`~txcolombe.api.submit`, :meth:`Session.send` and
    :meth:`txcolombe.pool.Pool.send` call it first, so a caller's mistake
    never opens a connection.

    :returns: the recipients as a tuple (an iterator is consumed once here:
        pass the tuple on instead).
    :raises UsageError: the first mistake found (:class:`InvalidArgument`
        for a wrong type, :class:`InvalidAddress` for a bad address).
    """
    if sender is not None and not isinstance(sender, str | Mailbox):
        raise InvalidArgument(
            f"the sender must be a str, a Mailbox or None, not {type(sender).__name__}"
        )
    if isinstance(recipients, str | Mailbox | Recipient):
        recipients = [recipients]
    if not isinstance(recipients, Iterable):
        raise InvalidArgument(
            f"the recipients must be an iterable, not {type(recipients).__name__}"
        )
    items = tuple(recipients)
    for item in items:
        if not isinstance(item, str | Mailbox | Recipient):
            raise InvalidArgument(
                f"a recipient must be a str, a Mailbox or a Recipient, not {type(item).__name__}"
            )
    if not items:
        raise UsageError("a message needs at least one recipient")
    if dsn is not None and not isinstance(dsn, DSN):
        raise InvalidArgument(f"dsn must be a DSN or None, not {type(dsn).__name__}")
    parse_sender(sender)
    recipient_options(items, dsn)
    check_body(body)
    return items


def _trust_root(trust_root: object) -> IOpenSSLTrustRoot | None:
    """``trust_root`` as given, or the certificates of a PEM file named by a path."""
    if trust_root is None:
        return None
    adapted: IOpenSSLTrustRoot | None = IOpenSSLTrustRoot(trust_root, None)
    if adapted is not None:  # a trust root, or a Certificate (adapted by Twisted)
        return adapted
    if not isinstance(trust_root, str | os.PathLike):
        raise InvalidArgument(
            "trust_root must be an IOpenSSLTrustRoot or a PEM file's path,"
            f" not {type(trust_root).__name__}"
        )
    try:
        with open(trust_root, "rb") as file:
            pem = file.read()
    except OSError as error:
        raise InvalidArgument(
            f"cannot read the trust root {trust_root!s}: {error.strerror}"
        ) from None
    marker = b"-----BEGIN CERTIFICATE-----"
    blocks = [marker + part for part in pem.split(marker)[1:]]
    try:
        certificates = [Certificate.loadPEM(block) for block in blocks]
    except Exception as error:
        raise InvalidArgument(
            f"the trust root {trust_root!s} holds an invalid certificate: {error}"
        ) from None
    if not certificates:
        raise InvalidArgument(f"the trust root {trust_root!s} holds no PEM certificate")
    root: IOpenSSLTrustRoot = trustRootFromCertificates(certificates)  # type: ignore[no-untyped-call]
    return root


def _check_connection(
    port: object,
    tls_mode: object,
    domain: object,
    tls: object,
    authentication: object,
    timeouts: object,
) -> None:
    """Refuse wrong types among :func:`connect`'s arguments."""
    if isinstance(port, bool) or not isinstance(port, int):
        raise InvalidArgument(f"the port must be an int, not {type(port).__name__}")
    if not 0 < port < 65536:
        raise InvalidArgument(f"invalid port {port}: not between 1 and 65535")
    if not isinstance(tls_mode, TLSMode):
        raise InvalidArgument(f"tls_mode must be a TLSMode, not {type(tls_mode).__name__}")
    if domain is not None and not isinstance(domain, str):
        raise InvalidArgument(f"the domain must be a str or None, not {type(domain).__name__}")
    if tls is not None and not IOpenSSLClientConnectionCreator.providedBy(tls):
        raise InvalidArgument(
            "tls must provide IOpenSSLClientConnectionCreator (optionsForClientTLS),"
            f" not {type(tls).__name__}"
        )
    if authentication is not None and not isinstance(authentication, Authentication):
        raise InvalidArgument(
            f"authentication must be an Authentication, not {type(authentication).__name__}"
        )
    if not isinstance(timeouts, Timeouts):
        raise InvalidArgument(f"timeouts must be a Timeouts, not {type(timeouts).__name__}")


class _ProtocolFactory(Factory):
    """Hands out the one protocol instance made for this connection."""

    noisy = False

    def __init__(self, protocol: SMTPClientProtocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        return self._protocol


def connect(
    destination: Destination,
    *,
    port: int = 25,
    tls_mode: TLSMode = TLSMode.OPPORTUNISTIC,
    domain: str | None = None,
    tls: IOpenSSLClientConnectionCreator | None = None,
    trust_root: TrustRoot | None = None,
    authentication: Authentication | None = None,
    timeouts: Timeouts = DEFAULT_TIMEOUTS,
    reactor: Any = None,
    endpoint: IStreamClientEndpoint | None = None,
    trace: bool = True,
) -> Deferred[Session]:
    """Connect to ``destination`` and set the session up; fires with a :class:`Session`.

    :param tls_mode: STARTTLS when offered (the default), STARTTLS required,
        implicit TLS, or none.
    :param domain: the EHLO name; default: this host's FQDN, else the
        address literal of our end of the connection.
    :param tls: TLS client options used as they are.
    :param trust_root: roots to verify the server's certificate against its
        name (default: the platform's trust store), or the path of a PEM file
        of CA certificates.
    :param authentication: credentials, sent only under TLS.
    :param endpoint: connect through this endpoint instead of TCP to
        ``destination`` (TLS-wrapped for implicit TLS); ``destination`` still
        names the server for certificate checks.
    :param trace: log the SMTP conversation at debug level (credentials
        masked); False saves its cost where volume is high (a relay).
    """
    try:
        _check_connection(port, tls_mode, domain, tls, authentication, timeouts)
        if tls_mode is TLSMode.NONE and authentication is not None:
            raise UsageError("authentication is never sent without TLS")
        host = Host.parse(destination)
        ehlo = parse_domain(domain) if domain is not None else default_domain()
        trust_root = _trust_root(trust_root)
    except SMTPError as error:
        return fail(error)
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    creator = None
    if tls_mode is not TLSMode.NONE:
        creator = tls_options(host, tls=tls, trust_root=trust_root)

    machine = ClientMachine(
        ehlo or "",
        tls=tls_mode,
        authentication=authentication,
        server_host=host.name,
        server_port=port,
    )
    protocol = SMTPClientProtocol(
        machine,
        reactor=reactor,
        timeouts=timeouts,
        tls=creator,
        peer=f"{host.name}:{port}",
        trace=trace,
    )
    implicit = creator if tls_mode is TLSMode.IMPLICIT else None
    try:
        if endpoint is None:
            endpoint = endpoint_for(
                reactor, host, port, implicit_tls=implicit, timeout=timeouts.connect
            )
        elif implicit is not None:
            endpoint = wrap_tls(implicit, endpoint, reactor)
    except SMTPError as error:
        return fail(error)
    if authentication is not None and authentication.token_provider is not None:
        return _with_token(authentication, machine, endpoint, protocol, host, port)
    return _connect(endpoint, protocol, host, port)


def _with_token(
    authentication: Authentication,
    machine: ClientMachine,
    endpoint: IStreamClientEndpoint,
    protocol: SMTPClientProtocol,
    host: Host,
    port: int,
) -> Deferred[Session]:
    """Ask the token provider for a fresh OAuth token, then connect."""

    async def run() -> Session:
        try:
            machine.authentication = await resolve_token(authentication)
        except SMTPError:
            raise
        except Exception as error:
            raise AuthenticationError(
                f"the OAuth token provider failed: {error}", step=Step.AUTH
            ) from error
        return await _connect(endpoint, protocol, host, port)

    return Deferred.fromCoroutine(run())


def _connect(
    endpoint: IStreamClientEndpoint,
    protocol: SMTPClientProtocol,
    host: Host,
    port: int,
) -> Deferred[Session]:
    connected = False

    def cancel(_: Deferred[Session]) -> None:
        if connected:
            protocol.abort()
        else:
            attempt.cancel()

    result: Deferred[Session] = Deferred(cancel)

    def on_connected(_: object) -> None:
        nonlocal connected
        connected = True
        protocol.ready.addCallbacks(on_ready, on_failed)

    def on_ready(_: object) -> None:
        if not result.called:
            # Bodies are produced on the session's own reactor (a fake clock in tests).
            reactor = protocol.reactor
            cooperator = Cooperator(scheduler=lambda work: reactor.callLater(0, work))
            result.callback(Session(protocol, host, port, cooperator))

    def on_failed(failure: Failure) -> None:
        if result.called:
            return
        if isinstance(failure.value, SMTPError | CancelledError):
            result.errback(failure)
        else:
            result.errback(connect_error(failure, host, port))

    attempt = endpoint.connect(_ProtocolFactory(protocol))
    attempt.addCallbacks(on_connected, on_failed)
    return result
