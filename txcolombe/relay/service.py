"""Assembles the relay from its :class:`~txcolombe.relay.options.Options`:
spool, queue manager, transport, SMTP listeners, control socket, metrics."""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from OpenSSL import SSL, crypto
from twisted.application import service, strports
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import endpoints, ssl
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python import usage
from zope.interface import implementer

from txcolombe.client.machine import TLSMode
from txcolombe.client.options import default_reactor
from txcolombe.codec.address import Mailbox, parse_domain
from txcolombe.codec.errors import InvalidAddress
from txcolombe.codec.reply import Reply
from txcolombe.codec.sasl import Authentication, Mechanism
from txcolombe.relay.control import LOCK_NAME, SOCKET_NAME, ControlFactory
from txcolombe.relay.options import (
    Options,
    implicit_tls_tcp,
    listen_description,
    parse_host_port,
)
from txcolombe.relay.passwords import hash_password, load_users, verify_password
from txcolombe.relay.queue import IncomingStream, QueueManager, RetryPolicy
from txcolombe.relay.signing import RelaySigning, load_keys
from txcolombe.relay.spool import Spool
from txcolombe.relay.transport import MXTransport, Smarthost, SmarthostTransport, Transport
from txcolombe.server.machine import Rejected, ServerConfig, ServerEnvelope
from txcolombe.server.protocol import SMTPServerFactory

log = Logger(namespace="txcolombe.relay")

_DUMMY_HASH = hash_password("not a password", log_n=14)

#: The spool lock files (:data:`~txcolombe.relay.control.LOCK_NAME`) this
#: process holds, by spool directory.
_held_locks: dict[Path, int] = {}


def lock_spool(spool: Path) -> None:
    """Create ``spool`` if need be and lock it exclusively for this process's life.

    Two relays on one spool would deliver every message twice and fight over
    the control socket, so the second one must stop before touching anything.
    The lock (``flock``) survives twistd's daemonising fork and is released by
    the kernel when the process ends, however it ends.

    :raises usage.UsageError: the spool is not a usable directory, or another
        process holds its lock.
    """
    key = spool.resolve()
    if key in _held_locks:
        return
    try:
        spool.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(spool / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as error:
        raise usage.UsageError(f"--spool {spool}: {error.strerror or error}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise usage.UsageError(f"--spool {spool}: another relay is running on it") from None
    _held_locks[key] = fd


def default_hostname() -> str:
    name = socket.getfqdn()
    try:
        return parse_domain(name)
    except InvalidAddress:
        return "localhost"


class RelayHandler:
    """The SMTP server's link to the queue: relay permission, AUTH, storage
    (large messages streamed to the spool), free space, rejection counts.

    :param min_free: octets of free space the spool keeps: a MAIL below it
        gets ``452 4.3.1`` (Postfix's queue_minfree).
    """

    def __init__(
        self,
        queue: QueueManager,
        networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network],
        users: dict[str, str],
        min_free: int = 0,
    ) -> None:
        self.queue = queue
        self.networks = networks
        self.users = users
        self.min_free = min_free
        self._allowed: dict[str, bool] = {}

    def set_networks(self, networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> None:
        """Trust these networks from now on (a reload): forget the cached answers."""
        self.networks = networks
        self._allowed.clear()

    def relay_allowed(self, client_address: str) -> bool:
        allowed = self._allowed.get(client_address)
        if allowed is None:
            if len(self._allowed) >= 4096:
                self._allowed.clear()
            allowed = self._allowed[client_address] = self._relay_allowed(client_address)
        return allowed

    def _relay_allowed(self, client_address: str) -> bool:
        try:
            ip = ipaddress.ip_address(client_address)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.networks)

    def check_password(self, username: str, password: str) -> Deferred[bool]:
        stored = self.users.get(username)
        if stored is None:
            # Same cost for unknown users: no timing oracle.
            return deferToThread(verify_password, _DUMMY_HASH, password).addCallback(
                lambda _: False
            )
        result: Deferred[bool] = deferToThread(verify_password, stored, password)
        return result

    def store(self, envelope: ServerEnvelope, data: bytes) -> Deferred[Reply]:
        return self.queue.accept(envelope, data).addCallback(_queued_reply)

    def open_message(self, envelope: ServerEnvelope) -> _Streamed:
        return _Streamed(self.queue.accept_stream(envelope))

    def check_mail(self, client_address: str, sender: Mailbox | None) -> Reply | None:
        if self.min_free <= 0:
            return None
        try:
            fs = os.statvfs(self.queue.spool.queue_dir)
        except OSError as error:
            log.error("cannot check the spool's free space: {error}", error=error)
            return None
        if fs.f_bavail * fs.f_frsize < self.min_free:
            return Reply.of(452, "4.3.1 Insufficient system storage")
        return None

    def rejected(self, client_address: str, event: Rejected) -> None:
        self.queue.counters.rejected += 1


def _queued_reply(queue_id: str) -> Reply:
    return Reply.of(250, f"2.0.0 Ok: queued as {queue_id}")


class _Streamed:
    """An :class:`~txcolombe.server.protocol.IncomingMessage` on the queue's stream."""

    def __init__(self, stream: IncomingStream) -> None:
        self.stream = stream

    def write(self, data: bytes) -> None:
        self.stream.write(data)

    def finish(self) -> Deferred[Reply]:
        return self.stream.finish().addCallback(_queued_reply)

    def abort(self) -> None:
        self.stream.abort()


class RelayService(service.MultiService):
    """The whole relay; children are the listeners."""

    def __init__(self, spool: Spool, queue: QueueManager) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.spool = spool
        self.queue = queue
        #: The SMTP listeners' factories, whose sessions get 421 at stop.
        self.factories: list[SMTPServerFactory] = []
        #: Re-reads what can change live; run on SIGHUP (see :func:`make_service`).
        self.reload: Callable[[], None] | None = None
        self._previous_hup: Any = None

    def startService(self) -> None:
        self.spool.start()
        self.queue.start()
        super().startService()  # type: ignore[no-untyped-call]
        if self.reload is not None:
            self._previous_hup = signal.signal(signal.SIGHUP, self._on_hup)

    def _on_hup(self, signum: int, frame: object) -> None:
        # A signal handler may interrupt the reactor anywhere: hand over.
        default_reactor().callFromThread(self._reload)

    def _reload(self) -> None:
        if self.reload is not None:
            self.reload()

    def stopService(self) -> Deferred[None]:
        if self._previous_hup is not None:
            signal.signal(signal.SIGHUP, self._previous_hup)

        async def stop() -> None:
            await super(RelayService, self).stopService()  # type: ignore[no-untyped-call]
            for factory in self.factories:
                factory.close_sessions()
            await self.queue.stop()
            await self.spool.stop()

        return Deferred.fromCoroutine(stop())


def _read_credentials(path: str, mechanism: str | None = None) -> Authentication:
    text = Path(path).read_text("utf-8").strip().splitlines()
    user, sep, password = (text[0] if text else "").partition(":")
    if not sep:
        raise usage.UsageError(f"{path}: expected one line 'user:password'")
    try:
        chosen = Mechanism(mechanism.upper()) if mechanism else None
    except ValueError:
        raise usage.UsageError(f"unknown SASL mechanism {mechanism!r}") from None
    return Authentication(user, password, mechanism=chosen)


def smarthost_from_options(options: Any, hostname: str) -> Smarthost:
    """The :class:`Smarthost` of ``--smarthost`` and its companions."""
    host, port = parse_host_port(options["smarthost"], 587, "--smarthost")
    mode_name = options["smarthost-tls"] or ("implicit" if port == 465 else "starttls")
    mode = {
        "implicit": TLSMode.IMPLICIT,
        "starttls": TLSMode.REQUIRED,
        "opportunistic": TLSMode.OPPORTUNISTIC,
        "none": TLSMode.NONE,
    }[mode_name]
    auth = None
    if options["smarthost-auth"]:
        auth = _read_credentials(options["smarthost-auth"], options.get("smarthost-auth-mechanism"))
    trust = None
    if options["smarthost-ca"]:
        trust = ssl.Certificate.loadPEM(Path(options["smarthost-ca"]).read_bytes())
    return Smarthost(host, port, mode, auth, trust, hostname)


def build_transport(options: Any, hostname: str, reactor: Any) -> Transport:
    """The transport of the options: to the smarthost, or to each domain's MX
    (shaped per site when the configuration has a ``[shaping]`` section)."""
    if options["smarthost"]:
        return SmarthostTransport(
            smarthost_from_options(options, hostname),
            reactor=reactor,
            concurrency=options["concurrency"],
        )
    mx: dict[str, Any] = {}
    if options["mx-port"]:
        mx["port"] = int(options["mx-port"])
    if options["dns-server"]:
        from twisted.names import client

        host, _, port = str(options["dns-server"]).rpartition(":")
        servers = [(host.strip("[]"), int(port))]
        mx["resolver"] = client.createResolver(servers=servers)  # type: ignore[no-untyped-call]
    # With a [shaping] section, the MX transport's Deliverer shapes each site.
    return MXTransport(reactor=reactor, domain=hostname, shaping=options.get("shaping"), **mx)


def _server_tls(options: Any) -> IOpenSSLServerConnectionCreator | None:
    """The STARTTLS context of ``--tls-cert``/``--tls-key``, or None."""
    if not options["tls-cert"]:
        return None
    pem = Path(options["tls-cert"]).read_bytes() + b"\n" + Path(options["tls-key"]).read_bytes()
    creator: IOpenSSLServerConnectionCreator = ssl.PrivateCertificate.loadPEM(pem).options()  # type: ignore[no-untyped-call]
    return creator


def server_config(
    options: Any, hostname: str, *, tls_available: bool, users: dict[str, str]
) -> ServerConfig:
    """The SMTP intake's rules and limits from the options (at start and on SIGHUP)."""
    return ServerConfig(
        hostname=hostname,
        max_size=options["max-size"],
        max_recipients=options["max-recipients"],
        tls_available=tls_available,
        auth_enabled=bool(users),
        max_errors=options["hard-error-limit"],
        soft_error_limit=options["soft-error-limit"],
        error_sleep=options["error-sleep"],
        max_connections=options["max-connections"],
        max_connections_per_client=options["max-connections-per-client"],
    )


def min_free(options: Any) -> int:
    """Free octets the spool keeps: ``--queue-minfree``, at least 1.5 x ``--max-size``."""
    return int(max(options["queue-minfree"], options["max-size"] * 3 // 2))


def reload_settings(options: Any, factory: SMTPServerFactory, handler: RelayHandler) -> None:
    """Apply what can change live (SIGHUP): the certificate and key (STARTTLS
    and the implicit-TLS listeners, :class:`CurrentCertificate`), users,
    relay networks, size, recipient, connection and error limits, the free-space
    reserve, idle timeout.

    The arguments are parsed again (so a ``--config`` file is read again) and
    every file checked first: on any mistake, one error line and the old
    settings stay. Sessions already open keep what they started with; new
    ones get the new settings, so no connection is dropped.
    """
    argv = getattr(options, "argv", None)
    fresh = options
    try:
        if argv is not None:
            fresh = Options()
            fresh.parseOptions(argv)
        tls = _server_tls(fresh)
        users = load_users(Path(fresh["users"])) if fresh["users"] else {}
        networks = [ipaddress.ip_network(n, strict=False) for n in fresh["relay-network"]]
        keys = load_keys(fresh["dkim"])
    except (usage.UsageError, OSError, ValueError, SSL.Error, crypto.Error) as error:
        log.error("reload failed, keeping the old settings: {error}", error=str(error))
        return
    factory.tls = tls
    factory.idle_timeout = fresh["idle-timeout"]
    factory.config = server_config(
        fresh, factory.config.hostname, tls_available=tls is not None, users=users
    )
    handler.users = users
    handler.min_free = min_free(fresh)
    handler.set_networks(networks)
    handler.queue.signing = RelaySigning(keys, handler.relay_allowed)
    if keys:
        log.info("DKIM keys: {keys}", keys=" ".join(str(k) for k in fresh["dkim"]))
    log.info(
        "reloaded: {users} users, relay networks {networks}, max size {max_size}",
        users=len(users), networks=" ".join(fresh["relay-network"]), max_size=fresh["max-size"],
    )  # fmt: skip


@implementer(IOpenSSLServerConnectionCreator)
class CurrentCertificate:
    """Implicit TLS with the intake's certificate of the moment: the
    factory's STARTTLS options (``factory.tls``), read for each connection,
    so that a reload's new certificate and key apply to new connections."""

    def __init__(self, factory: SMTPServerFactory) -> None:
        self.factory = factory

    def serverConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        tls = self.factory.tls
        if tls is None:  # the options refuse implicit TLS without --tls-cert
            raise SSL.Error("implicit TLS without a certificate")
        return tls.serverConnectionForTLS(tlsProtocol)


def listener(
    options: Any, description: str, factory: SMTPServerFactory, reactor: Any
) -> service.Service:
    """The listening service of one ``--listen`` description.

    An implicit-TLS one with the ``--tls-cert`` certificate is TCP with TLS
    on top (:class:`CurrentCertificate`), so that SIGHUP reloads its
    certificate too; one with a certificate of its own keeps it.
    """
    tcp = implicit_tls_tcp(description)
    if tcp is None:
        full = listen_description(options, description)
        return strports.service(full, factory, reactor=reactor)
    endpoint = endpoints.serverFromString(reactor, tcp)  # type: ignore[no-untyped-call]
    wrapped = TLSMemoryBIOFactory(CurrentCertificate(factory), False, factory)
    return StreamServerEndpointService(endpoint, wrapped)  # type: ignore[no-untyped-call]


def make_service(options: Any, reactor: Any = None) -> RelayService:
    """The relay described by ``options`` (a parsed :class:`Options`)."""
    if reactor is None:
        reactor = default_reactor()
    lock_spool(Path(options["spool"]))
    hostname = options["hostname"] or default_hostname()
    tls = _server_tls(options)
    users = load_users(Path(options["users"])) if options["users"] else {}
    networks = [ipaddress.ip_network(n, strict=False) for n in options["relay-network"]]
    transport = build_transport(options, hostname, reactor)
    spool = Spool(Path(options["spool"]), reactor=reactor)
    policy = RetryPolicy(
        min_backoff=options["min-backoff"],
        max_backoff=options["max-backoff"],
        lifetime=options["queue-lifetime"],
        delay_warning=options["delay-warning"],
    )
    queue = QueueManager(
        spool, transport, reactor=reactor, hostname=hostname, policy=policy,
        log_format=options["log-format"], bounce_full=options["bounce-full"],
        postmaster=options.get("postmaster"),
    )  # fmt: skip
    relay = RelayService(spool, queue)
    config = server_config(options, hostname, tls_available=tls is not None, users=users)
    handler = RelayHandler(queue, networks, users, min_free(options))
    queue.signing = RelaySigning(load_keys(options["dkim"]), handler.relay_allowed)
    if options["dkim"]:
        log.info("DKIM keys: {keys}", keys=" ".join(str(k) for k in options["dkim"]))
    factory = SMTPServerFactory(
        config, handler, reactor=reactor, tls=tls, idle_timeout=options["idle-timeout"],
    )  # fmt: skip
    relay.factories.append(factory)
    relay.reload = lambda: reload_settings(options, factory, handler)
    for description in options["listen"]:
        listener(options, description, factory, reactor).setServiceParent(relay)  # type: ignore[no-untyped-call]
    control_path = Path(options["spool"]) / SOCKET_NAME
    with contextlib.suppress(FileNotFoundError):
        os.unlink(control_path)
    control = StreamServerEndpointService(  # type: ignore[no-untyped-call]
        UNIXServerEndpoint(reactor, str(control_path), mode=0o600, wantPID=False),  # type: ignore[no-untyped-call]
        ControlFactory(queue),
    )
    control.setServiceParent(relay)  # type: ignore[no-untyped-call]
    if options["metrics"]:
        from txcolombe.relay.metrics import metrics_site

        strports.service(options["metrics"], metrics_site(queue), reactor=reactor).setServiceParent(  # type: ignore[no-untyped-call]
            relay
        )
    return relay
