"""A reusable SMTP session: connect, greet, upgrade and authenticate once, then
run transactions one after another (colombe's ``Sendmail_with_starttls.many``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import astuple
from types import TracebackType
from typing import Any, NamedTuple

from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.interfaces import (
    IAddress,
    IConnector,
    IOpenSSLClientConnectionCreator,
    IProtocol,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.ssl import Certificate, trustRootFromCertificates
from twisted.internet.task import Cooperator
from twisted.python.failure import Failure

from txcolombe.client.body import Body, check_body, known_length
from txcolombe.client.connect import (
    Destination,
    Host,
    IOpenSSLTrustRoot,
    connect_error,
    connect_tcp,
    default_domain,
    endpoint_for,
    tls_options,
    wrap_tls,
)
from txcolombe.client.machine import ClientMachine, Envelope, TLSMode, Trace
from txcolombe.client.options import (
    DEFAULT_TIMEOUTS,
    ConnectOptions,
    MessageOptions,
    Timeouts,
    TrustRoot,
    default_reactor,
    either,
)
from txcolombe.client.protocol import SMTPClientProtocol
from txcolombe.client.receipt import Receipt, TLSInfo
from txcolombe.client.signing import DKIM, signed_producer
from txcolombe.codec.address import Mailbox, parse_domain, parse_sender
from txcolombe.codec.dsn import DSN, Recipient, recipient_options
from txcolombe.codec.errors import (
    AuthenticationError,
    InvalidArgument,
    SMTPError,
    Step,
    UsageError,
)
from txcolombe.codec.extensions import Extensions
from txcolombe.codec.sasl import Authentication, refuse_without_tls, resolve_token

__all__ = ["Session", "TrustRoot", "check_message", "connect", "open_session"]


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
        options: MessageOptions | None = None,
        dkim: DKIM = None,
    ) -> Deferred[Receipt]:
        """Send one message; fires with its :class:`Receipt`.

        Delivers to every accepted recipient and lists the refused ones in
        the receipt; fails with :class:`~txcolombe.codec.errors.RecipientsRefused`
        when none is accepted (or, with ``all_or_nothing``, when any is
        refused), sending no DATA. After a failed transaction the session
        stays usable unless the error says the connection is gone. Several
        sends may be queued at once: they run in order, pipelined.

        Cancelling the Deferred: a send still queued just leaves the queue;
        one started ends with RSET if its DATA has not left yet (the session
        stays usable for the next); one whose DATA or body is under way can
        only be stopped by aborting the connection.

        ``all_or_nothing``, ``dsn``, ``requiretls``, ``chunking``, ``binary``,
        ``body_type``, ``smtputf8`` and ``utf8_headers`` are those of
        :class:`~txcolombe.client.options.MessageOptions`; ``options`` gives
        them as one object instead.

        :param reset_first: send RSET before MAIL (pipelined when the server
            allows): checks that a connection that sat idle is still alive
            before the message is at stake.
        :param dkim: a :class:`~txcolombe.codec.dkim.DKIMSigner` or several: the
            body is signed when its turn comes (read twice, or spooled
            first), so no SIZE is declared; ``sendmail`` and ``Pool.send``
            sign before MAIL and declare it.
        :raises ExtensionUnavailable: (as a failure) an option needs an
            extension the server lacks; nothing is sent for the message.
        """
        try:
            keywords = (
                all_or_nothing,
                dsn,
                requiretls,
                chunking,
                binary,
                body_type,
                smtputf8,
                utf8_headers,
            )
            # Most sends ask nothing special: one frozen object serves them all.
            given = _DEFAULT_OPTIONS if keywords == _DEFAULTS else MessageOptions(*keywords)
            message = either(given, options)
            checked = check_message(sender, recipients, body, dsn=message.dsn)
        except SMTPError as error:
            return fail(error)
        return self.send_message(sender, checked, body, message, reset_first=reset_first, dkim=dkim)

    def send_message(
        self,
        sender: str | Mailbox | None,
        recipients: Iterable[str | Mailbox | Recipient],
        body: Body,
        message: MessageOptions,
        *,
        reset_first: bool = False,
        dkim: DKIM = None,
    ) -> Deferred[Receipt]:
        """:meth:`send` with its options as one object, for arguments already
        checked by :func:`check_message` (the pool, :func:`~txcolombe.client.api.sendmail`
        and ``deliver()`` check them once, before any connection)."""
        try:
            mailboxes, rcpt_options = recipient_options(recipients, message.dsn)
            producer = signed_producer(body, dkim, cooperator=self._cooperator)
            envelope = Envelope(
                parse_sender(sender),
                mailboxes,
                size=known_length(producer),
                all_or_nothing=message.all_or_nothing,
                rcpt_options=rcpt_options,
                dsn=message.dsn,
                requiretls=message.requiretls,
                chunking=message.chunking,
                binary=message.binary,
                reset_first=reset_first,
                body_type=message.body_type,
                smtputf8=message.smtputf8,
                utf8_headers=message.utf8_headers,
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


_DEFAULT_OPTIONS = MessageOptions()
_DEFAULTS = astuple(_DEFAULT_OPTIONS)

#: The types check_message takes (tuples: ``A | B`` would build a union each call).
_SENDER_TYPES = (str, Mailbox)
_RECIPIENT_TYPES = (str, Mailbox, Recipient)


def check_message(
    sender: object,
    recipients: object,
    body: object,
    *,
    dsn: object = None,
) -> tuple[str | Mailbox | Recipient, ...]:
    """Validate a message's arguments before anything is connected or sent.

    Parses the sender and every recipient, checks the body's kind (without
    reading it) and the DSN options. :func:`txcolombe.client.api.sendmail`,
    :func:`~txcolombe.client.api.submit`, :meth:`Session.send` and
    :meth:`txcolombe.client.pool.Pool.send` call it first, so a caller's mistake
    never opens a connection.

    :returns: the recipients as a tuple (an iterator is consumed once here:
        pass the tuple on instead).
    :raises UsageError: the first mistake found (:class:`InvalidArgument`
        for a wrong type, :class:`InvalidAddress` for a bad address).
    """
    if sender is not None and not isinstance(sender, _SENDER_TYPES):
        raise InvalidArgument(
            f"the sender must be a str, a Mailbox or None, not {type(sender).__name__}"
        )
    if isinstance(recipients, _RECIPIENT_TYPES):
        recipients = [recipients]
    if not isinstance(recipients, Iterable):
        raise InvalidArgument(
            f"the recipients must be an iterable, not {type(recipients).__name__}"
        )
    items = tuple(recipients)
    for item in items:
        if not isinstance(item, _RECIPIENT_TYPES):
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


class _ProtocolFactory(Factory):
    """Hands out the one protocol instance made for this connection."""

    noisy = False

    def __init__(self, protocol: SMTPClientProtocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        return self._protocol


class _DirectFactory(ClientFactory):
    """The one protocol of a :func:`connect_tcp` attempt, and the attempt's outcome:
    ``connected`` just before the protocol gets its transport, ``failed``
    with the reason when no connection was made."""

    noisy = False

    def __init__(
        self,
        protocol: SMTPClientProtocol,
        connected: Callable[[], None],
        failed: Callable[[Failure], None],
    ) -> None:
        self._protocol = protocol
        self._connected = connected
        self._failed = failed

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        self._connected()
        return self._protocol

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        self._failed(reason)


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
    max_recipients: int | None = 100,
    options: ConnectOptions | None = None,
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
    :param max_recipients: recipients per transaction at most (100 by
        default, RFC 5321 §4.5.3.1.8); a send with more runs as several
        transactions on the connection, with one receipt. None: no limit of
        ours (the server's LIMITS RCPTMAX and 452 replies still apply).
    :param options: all of the above but ``reactor`` as one
        :class:`~txcolombe.client.options.ConnectOptions` instead.
    """
    try:
        chosen = either(
            ConnectOptions(
                port,
                tls_mode,
                domain,
                tls,
                trust_root,
                authentication,
                timeouts,
                endpoint,
                trace,
                max_recipients,
            ),
            options,
        )
    except SMTPError as error:
        return fail(error)
    return open_session(destination, chosen, reactor)


def open_session(
    destination: Destination, options: ConnectOptions, reactor: Any = None
) -> Deferred[Session]:
    """:func:`connect` with its options as one object."""
    port, tls_mode, authentication = options.port, options.tls_mode, options.authentication
    try:
        options.check()
        refuse_without_tls(authentication, "tls_mode=NONE" if tls_mode is TLSMode.NONE else None)
        host = Host.parse(destination)
        ehlo = parse_domain(options.domain) if options.domain is not None else default_domain()
        trust_root = _trust_root(options.trust_root)
    except SMTPError as error:
        return fail(error)
    if reactor is None:
        reactor = default_reactor()
    timeouts, endpoint = options.timeouts, options.endpoint
    creator = None
    if tls_mode is not TLSMode.NONE:
        creator = tls_options(host, tls=options.tls, trust_root=trust_root)

    def new_protocol(credentials: Authentication | None) -> SMTPClientProtocol:
        def new_machine(local_name: str, trace: Trace | None) -> ClientMachine:
            return ClientMachine(
                ehlo or local_name,
                tls=tls_mode,
                authentication=credentials,
                trace=trace,
                server_host=host.name,
                server_port=port,
                max_recipients=options.max_recipients,
            )

        return SMTPClientProtocol(
            new_machine,
            reactor=reactor,
            timeouts=timeouts,
            tls=creator,
            peer=f"{host.name}:{port}",
            trace=options.trace,
        )

    implicit = creator if tls_mode is TLSMode.IMPLICIT else None
    try:
        if endpoint is None and (host.ip is None or implicit is not None):
            endpoint = endpoint_for(
                reactor, host, port, implicit_tls=implicit, timeout=timeouts.connect
            )
        elif endpoint is not None and implicit is not None:
            endpoint = wrap_tls(implicit, endpoint, reactor)
    except SMTPError as error:
        return fail(error)
    # No endpoint left: an address without implicit TLS, reached with connect_tcp
    # (STARTTLS upgrades that TCP transport itself).
    target = _Target(reactor, host, port, endpoint, timeouts.connect)
    if authentication is not None and authentication.token_provider is not None:
        return _with_token(authentication, new_protocol, target)
    return _connect(target, new_protocol(authentication))


class _Target(NamedTuple):
    """Where a session connects: through ``endpoint``, or (None) to the
    address ``host`` with :func:`~txcolombe.client.connect.connect_tcp`."""

    reactor: Any
    host: Host
    port: int
    endpoint: IStreamClientEndpoint | None
    timeout: float


def _with_token(
    authentication: Authentication,
    new_protocol: Callable[[Authentication], SMTPClientProtocol],
    target: _Target,
) -> Deferred[Session]:
    """Ask the token provider for a fresh OAuth token, then connect."""

    async def run() -> Session:
        try:
            credentials = await resolve_token(authentication)
        except SMTPError:
            raise
        except Exception as error:
            raise AuthenticationError(
                f"the OAuth token provider failed: {error}", step=Step.AUTH
            ) from error
        return await _connect(target, new_protocol(credentials))

    return Deferred.fromCoroutine(run())


def _connect(target: _Target, protocol: SMTPClientProtocol) -> Deferred[Session]:
    """Connect ``protocol``; fires with the session once it is set up."""
    host, port = target.host, target.port
    connected = False
    attempt: Deferred[IProtocol] | None = None
    connector: IConnector | None = None

    def cancel(_: Deferred[Session]) -> None:
        if connected:
            protocol.abort()
        elif attempt is not None:
            attempt.cancel()
        elif connector is not None:
            connector.stopConnecting()

    result: Deferred[Session] = Deferred(cancel)

    def on_connected(_: object = None) -> None:
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

    if target.endpoint is not None:
        attempt = target.endpoint.connect(_ProtocolFactory(protocol))
        attempt.addCallbacks(on_connected, on_failed)
        return result
    try:
        connector = connect_tcp(
            target.reactor,
            host,
            port,
            _DirectFactory(protocol, on_connected, on_failed),
            timeout=target.timeout,
        )
    except Exception as error:
        on_failed(Failure(error))  # type: ignore[no-untyped-call]
    return result
