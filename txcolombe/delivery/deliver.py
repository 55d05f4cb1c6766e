"""Direct delivery: find each recipient domain's mail exchangers and hand the
message to them (:func:`deliver`).

For each domain, concurrently (bounded by ``max_concurrency``):

1. find the exchangers (:mod:`txcolombe.delivery.routing`, :mod:`txcolombe.delivery.dns`):
   address literal, MX records by preference with equal ones shuffled, the
   implicit MX, null MX, NXDOMAIN and SERVFAIL;
2. apply the domain's MTA-STS policy (:mod:`txcolombe.delivery.mtasts`), if any;
3. try the exchangers' addresses in order, within Postfix's caps (5
   addresses, 2 sessions), under the TLS policy (:mod:`txcolombe.delivery.tlspolicy`);
   a failed connection, greeting, EHLO or TLS moves to the next address, as
   does a 4xx to the transaction; a 5xx to the transaction is final;
4. report, per recipient, delivered (exchanger, address, reply, TLS level
   and why) or a temporary or permanent failure with its error.

The body goes to several domains at once and, after a failure, to the next
exchanger, so it must be replayable (:mod:`txcolombe.client.replay`): bytes,
messages and regular files are used as they are; any other body is first
copied, in constant memory, to an anonymous temporary file.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import random
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    DeferredSemaphore,
    succeed,
)
from twisted.internet.interfaces import IResolver, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from txcolombe.client.body import Body, check_body
from txcolombe.client.connect import Host, Identity, IOpenSSLTrustRoot, connect_error
from txcolombe.client.machine import TLSMode
from txcolombe.client.options import DEFAULT_TIMEOUTS, MessageOptions, Timeouts
from txcolombe.client.receipt import Receipt
from txcolombe.client.replay import ReplayableBody
from txcolombe.client.session import Session, connect
from txcolombe.client.signing import DKIM, signed_replayable, signers
from txcolombe.codec.address import Mailbox, parse_domain, parse_sender
from txcolombe.codec.dkim import DKIMSigner
from txcolombe.codec.dsn import DSN, Recipient
from txcolombe.codec.errors import (
    ConnectionFailed,
    MailLoop,
    NoMailExchanger,
    NullMX,
    PolicyViolation,
    RecipientsRefused,
    RoutingError,
    SMTPError,
    STARTTLSRefused,
    Step,
    UsageError,
    error_for_reply,
)
from txcolombe.codec.reply import Reply
from txcolombe.codec.sasl import Authentication, refuse_without_tls
from txcolombe.delivery.deliverer import Deliverer, Idle, default_deliverer
from txcolombe.delivery.dns import (
    DEFAULT_DNS_TIMEOUT,
    lookup_addresses,
    lookup_mx,
)
from txcolombe.delivery.eyeballs import RacingEndpoint
from txcolombe.delivery.mtasts import MTASTS, CachedPolicy, Mode
from txcolombe.delivery.outcome import (
    Attempt,
    DeliveryResult,
    DeliveryStatus,
    Outcome,
    TLSStatus,
    error_verdict,
    recipient_verdict,
)
from txcolombe.delivery.routing import (
    DEFAULT_MAX_ADDRESSES,
    DEFAULT_MAX_SESSIONS,
    NULL_MX_REPLY,
    AddressPreference,
    Budget,
    DomainRecipients,
    IPAddress,
    Next,
    Target,
    after_session_error,
    after_transaction_error,
    below_self,
    connected,
    group_recipients,
    implicit_exchanger,
    is_null_mx,
    literal_address,
    loop_reply,
    order_addresses,
    order_exchangers,
    recipient_key,
)
from txcolombe.delivery.tlspolicy import CheckedTLS, TLSLevel, TLSPolicy

__all__ = [
    "Attempt",
    "DeliveryResult",
    "DeliveryStatus",
    "Outcome",
    "TLSStatus",
    "deliver",
]

log = Logger(namespace="txcolombe.deliver")

#: Domains delivered to at the same time, by default.
DEFAULT_MAX_CONCURRENCY = 10

_default_mta_sts: MTASTS | None = None


def default_mta_sts() -> MTASTS:
    """The process-wide MTA-STS policy source (an in-memory cache) that
    ``deliver(..., mta_sts=True)`` uses."""
    global _default_mta_sts
    if _default_mta_sts is None:
        _default_mta_sts = MTASTS()
    return _default_mta_sts


# -- delivery ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Options:
    sender: Mailbox | None
    tls_policy: TLSPolicy
    mta_sts: MTASTS | None
    trust_root: IOpenSSLTrustRoot | None
    mta_sts_trust_root: IOpenSSLTrustRoot | None
    authentication: Authentication | None
    ehlo: str | None
    timeouts: Timeouts
    reactor: Any
    resolver: IResolver
    port: int
    max_addresses: int
    max_sessions: int
    address_preference: AddressPreference
    dns_timeout: Sequence[float]
    rng: random.Random | None
    message: MessageOptions
    local_names: frozenset[str]
    local_addresses: frozenset[IPAddress]
    deliverer: Deliverer
    dkim: list[DKIMSigner]
    max_recipients: int | None


def deliver(
    sender: str | Mailbox | None,
    recipients: Iterable[str | Mailbox | Recipient] | str | Mailbox | Recipient,
    body: Body,
    *,
    domain: str | None = None,
    tls_policy: TLSPolicy | str = TLSPolicy.MAY,
    mta_sts: bool | MTASTS = True,
    trust_root: IOpenSSLTrustRoot | None = None,
    mta_sts_trust_root: IOpenSSLTrustRoot | None = None,
    authentication: Authentication | None = None,
    timeouts: Timeouts = DEFAULT_TIMEOUTS,
    reactor: Any = None,
    resolver: IResolver | None = None,
    port: int = 25,
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    max_addresses: int = DEFAULT_MAX_ADDRESSES,
    max_sessions: int = DEFAULT_MAX_SESSIONS,
    address_preference: AddressPreference | str = AddressPreference.IPV6,
    dns_timeout: Sequence[float] = DEFAULT_DNS_TIMEOUT,
    rng: random.Random | None = None,
    dsn: DSN | None = None,
    requiretls: bool = False,
    local_identities: Iterable[str] = (),
    deliverer: Deliverer | None = None,
    dkim: DKIM = None,
    body_type: str | None = None,
    smtputf8: bool = False,
    utf8_headers: bool = False,
    max_recipients: int | None = 100,
) -> Deferred[DeliveryResult]:
    """Deliver a message to each recipient's domain, through its exchangers.

    One transaction per domain, domains in parallel (``max_concurrency`` at
    a time). See the module documentation and ``docs/deliver.md``.

    :param domain: the EHLO name (default: this host's FQDN).
    :param tls_policy: ``"none"``, ``"may"`` (the default), ``"encrypt"`` or
        ``"verify"`` (:class:`~txcolombe.delivery.tlspolicy.TLSPolicy`).
    :param mta_sts: apply MTA-STS policies (True: with a process-wide
        in-memory cache), or not, or through this :class:`~txcolombe.delivery.mtasts.MTASTS`.
    :param trust_root: roots for the exchangers' certificates (default: the
        platform's).
    :param mta_sts_trust_root: roots for the MTA-STS policy hosts'
        certificates (default: the platform's). Kept apart from
        ``trust_root``: policy hosts are public web servers, so a private
        ``trust_root`` must not make their policies unverifiable.
    :param authentication: credentials, if the exchangers want them; sent
        only under TLS (and then a failed handshake is never retried in
        plaintext).
    :param resolver: the ``IResolver`` for MX, A, AAAA and TXT lookups
        (default: the system's, through ``twisted.names``).
    :param port: the exchangers' port; 25 except in tests.
    :param max_addresses: addresses tried per domain (Postfix: 5).
    :param max_sessions: servers that may answer per domain (Postfix: 2).
    :param address_preference: which family an exchanger's addresses start with.
    :param dns_timeout: the retransmission delays of each DNS query.
    :param rng: the randomness that orders MX records of equal preference.
    :param dsn: delivery status notification options (RFC 3461: RET, ENVID,
        NOTIFY, ORCPT for each recipient), as for ``Session.send``; a
        recipient given as a :class:`~txcolombe.codec.dsn.Recipient` carries its
        own NOTIFY and ORCPT (its address is its key in the result).
    :param requiretls: ask each exchanger for REQUIRETLS (RFC 8689).
    :param local_identities: our own host names and IP addresses (RFC 5321
        §5.1): MX records at or below our own preference are dropped, and
        when we are the best exchanger the domain fails with
        :class:`~txcolombe.codec.errors.MailLoop` (554 5.4.6) instead of looping.
    :param deliverer: the :class:`~txcolombe.delivery.deliverer.Deliverer` whose
        caches, limits and memory of dead hosts this delivery shares (default:
        the process-wide one).
    :param body_type: the BODY the message came with, as for ``Session.send``
        (a relay passes it on).
    :param smtputf8: the message came with SMTPUTF8, as for ``Session.send``.
    :param utf8_headers: the header has UTF-8 (RFC 6532), as for ``Session.send``.
    :param max_recipients: recipients per transaction at most, as for
        :func:`~txcolombe.connect` (a domain's recipients over it go in further
        transactions on the same connection).
    :param dkim: a :class:`~txcolombe.codec.dkim.DKIMSigner` or several (one
        signature each): the body is signed once, before any connection.
    :returns: a Deferred firing with a :class:`DeliveryResult`; it fails
        only for the caller's mistakes (:class:`~txcolombe.codec.errors.UsageError`,
        e.g. an invalid sender or an unreadable body). Cancelling it aborts
        every connection.
    """
    try:
        if isinstance(recipients, str | Mailbox | Recipient):
            recipients = [recipients]
        recipient_list = list(recipients)
        if not recipient_list:
            raise UsageError("no recipients")
        check_body(body)
        policy = TLSPolicy.parse(tls_policy)
        refuse_without_tls(
            authentication, "tls_policy='none'" if policy is TLSPolicy.NONE else None
        )
        if max_concurrency < 1:
            raise UsageError("max_concurrency must be at least 1")
        if not 0 < port < 65536:
            raise UsageError(f"invalid port {port}")
        Budget(max_addresses, max_sessions)  # validates the caps
        preference = AddressPreference(address_preference)
        agent = deliverer if deliverer is not None else default_deliverer()
        chosen_reactor = agent.reactor(reactor)
        options = _Options(
            sender=parse_sender(sender),
            tls_policy=policy,
            mta_sts=(default_mta_sts() if mta_sts is True else mta_sts or None),
            trust_root=trust_root,
            mta_sts_trust_root=mta_sts_trust_root,
            authentication=authentication,
            ehlo=parse_domain(domain) if domain is not None else None,
            timeouts=timeouts,
            reactor=chosen_reactor,
            resolver=agent.resolver(resolver, chosen_reactor),
            port=port,
            max_addresses=max_addresses,
            max_sessions=max_sessions,
            address_preference=preference,
            dns_timeout=tuple(dns_timeout),
            rng=rng,
            message=MessageOptions(
                dsn=dsn,
                requiretls=requiretls,
                body_type=body_type,
                smtputf8=smtputf8,
                utf8_headers=utf8_headers,
            ),
            deliverer=agent,
            dkim=signers(dkim),
            max_recipients=max_recipients,
            **_identities(local_identities),
        )
    except ValueError as error:
        usage = error if isinstance(error, UsageError) else UsageError(str(error))
        failed: Deferred[DeliveryResult] = Deferred()
        failed.errback(usage)
        return failed
    return Deferred.fromCoroutine(_deliver(options, recipient_list, body, max_concurrency))


def _identities(identities: Iterable[str]) -> dict[str, Any]:
    """Split our identities into host names and IP addresses."""
    names: set[str] = set()
    addresses: set[IPAddress] = set()
    for identity in identities:
        literal = literal_address(identity) or _ip(identity)
        if literal is not None:
            addresses.add(literal)
        else:
            names.add(parse_domain(identity).lower())
    return {"local_names": frozenset(names), "local_addresses": frozenset(addresses)}


def _ip(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


async def _deliver(
    options: _Options,
    recipients: list[str | Mailbox | Recipient],
    body: Body,
    max_concurrency: int,
) -> DeliveryResult:
    grouping = group_recipients(recipients)
    outcomes: dict[str, Outcome] = {}
    for rcpt, error in grouping.invalid.items():
        domain = rcpt.rpartition("@")[2] if "@" in rcpt else ""
        outcomes[rcpt] = Outcome(rcpt, domain, DeliveryStatus.PERMANENT, error=error)
    if not grouping.domains:
        return _in_order(recipients, outcomes)
    replayable = await signed_replayable(body, options.dkim)
    try:
        semaphore = DeferredSemaphore(max_concurrency)
        tasks = [
            semaphore.run(_domain_task, options, group, replayable) for group in grouping.domains
        ]
        # Cancelling the DeferredList cancels every task; each then fails
        # with CancelledError, which is raised below.
        settled = await DeferredList(tasks, consumeErrors=True)
    finally:
        replayable.close()
    for ok, result in settled:
        if not ok:
            cast(Failure, result).raiseException()
        outcomes.update(result)
    return _in_order(recipients, outcomes)


def _in_order(
    recipients: list[str | Mailbox | Recipient], outcomes: dict[str, Outcome]
) -> DeliveryResult:
    """The outcomes in the order the recipients were given (duplicates once)."""
    keys = dict.fromkeys(recipient_key(recipient) for recipient in recipients)
    return DeliveryResult({key: outcomes[key] for key in keys if key in outcomes})


def _domain_task(
    options: _Options, group: DomainRecipients, body: ReplayableBody
) -> Deferred[dict[str, Outcome]]:
    agent = options.deliverer

    def shaped() -> Deferred[dict[str, Outcome]]:
        names = [key for key, _ in group.recipients]
        run = _DomainDelivery(options, group, body).run
        return agent.shaped(
            group.domain,
            names,
            lambda: Deferred.fromCoroutine(run()),
            options.resolver,
            options.reactor,
        )

    return agent.for_domain(group.domain, shaped)


class _DomainDelivery:
    """One domain: route, then try addresses until the recipients are settled."""

    def __init__(self, options: _Options, group: DomainRecipients, body: ReplayableBody) -> None:
        self.options = options
        self.domain = group.domain
        self.body = body
        self.pending: dict[str, Mailbox] = dict(group.recipients)
        self.recipient_options = group.options
        self.outcomes: dict[str, Outcome] = {}
        self.attempts: list[Attempt] = []
        self.budget = Budget(options.max_addresses, options.max_sessions)
        self.policy = options.tls_policy
        self.sts: CachedPolicy | None = None
        self.last_error: SMTPError | None = None
        self.deferred_replies: dict[str, Reply] = {}
        self.lookup_errors: list[RoutingError] = []

    @property
    def sts_mode(self) -> Mode | None:
        return self.sts.policy.mode if self.sts is not None else None

    async def run(self) -> dict[str, Outcome]:
        try:
            await self._run()
        except CancelledError:
            raise
        except SMTPError as error:
            self._settle_all(error)
        except Exception as error:
            log.failure("delivering to {domain}", domain=self.domain)
            message = f"internal error delivering to {self.domain}: {error!r}"
            self._settle_all(SMTPError(message, temporary=True))
        return self.outcomes

    async def _run(self) -> None:
        literal = literal_address(self.domain)
        if literal is not None and literal in self.options.local_addresses:
            self._loop()
        elif literal is not None:
            await self._try_targets([(str(literal), [literal])])
        else:
            hosts = await self._exchangers()
            if hosts is None:
                return
            await self._try_hosts(hosts)
        self._finish()

    # -- routing ---------------------------------------------------------------

    async def _exchangers(self) -> list[str] | None:
        """The exchangers to try, in order; None once the domain is settled."""
        options = self.options
        sts: Deferred[CachedPolicy | None] = succeed(None)
        if options.mta_sts is not None:
            sts = options.mta_sts.lookup(
                self.domain,
                resolver=options.resolver,
                reactor=options.reactor,
                trust_root=options.mta_sts_trust_root,
                dns_timeout=options.dns_timeout,
            )
        try:
            records = await lookup_mx(options.resolver, self.domain, options.dns_timeout)
        except RoutingError as error:
            _abandon(sts)
            self._settle_all(error)
            return None
        except BaseException:
            _abandon(sts)
            raise
        if is_null_mx(records):
            _abandon(sts)
            self._settle_all(
                NullMX(f"{self.domain} accepts no mail (null MX)", reply=NULL_MX_REPLY)
            )
            return None
        kept = below_self(records, options.local_names)
        if kept is None or (not records and self.domain in options.local_names):
            _abandon(sts)
            self._loop()
            return None
        hosts = order_exchangers(kept, options.rng) or implicit_exchanger(self.domain)
        self.sts = await sts
        return self._apply_sts(hosts)

    def _apply_sts(self, hosts: list[str]) -> list[str] | None:
        if self.sts is None or self.sts.policy.mode is Mode.NONE:
            return hosts
        policy = self.sts.policy
        unmatched = [host for host in hosts if not policy.matches(host)]
        if policy.mode is Mode.TESTING:
            for host in unmatched:
                log.warn(
                    "MTA-STS testing: {host} (an exchanger of {domain}) matches no mx of its"
                    " policy; enforce mode would not use it",
                    host=host,
                    domain=self.domain,
                )
            return hosts
        self.policy = TLSPolicy.VERIFY
        allowed = [host for host in hosts if policy.matches(host)]
        if unmatched:
            log.info(
                "MTA-STS enforce: skipping {hosts} for {domain} (not in its policy)",
                hosts=", ".join(unmatched),
                domain=self.domain,
            )
        if not allowed:
            self._settle_all(
                PolicyViolation(
                    f"no exchanger of {self.domain} ({', '.join(hosts)}) matches its MTA-STS"
                    f" policy ({', '.join(policy.mx)})"
                )
            )
            return None
        return allowed

    async def _try_hosts(self, hosts: list[str]) -> None:
        options = self.options
        for host in hosts:
            if not self.pending or self.budget.exhausted:
                return
            try:
                answer = await lookup_addresses(options.resolver, host, options.dns_timeout)
            except RoutingError as error:
                log.info("skipping exchanger {host}: {error}", host=host, error=error)
                self.lookup_errors.append(error)
                continue
            if not answer:
                if answer.error is not None:
                    self.lookup_errors.append(answer.error)
                log.info("skipping exchanger {host}: it has no address", host=host)
                continue
            addresses = options.deliverer.usable(
                order_addresses(answer.ipv6, answer.ipv4, options.address_preference)
            )
            if not addresses:
                log.info("skipping exchanger {host}: no address of the family used", host=host)
                continue
            if options.local_addresses.intersection(addresses):
                # This exchanger is us: the rest are no more preferred.
                log.info("{host} of {domain} is this host", host=host, domain=self.domain)
                if host == hosts[0]:
                    self._loop()
                return
            if await self._try_targets([(host, addresses)]):
                return

    async def _try_targets(self, hosts: list[tuple[str, Sequence[IPAddress]]]) -> bool:
        """Try each address (two of different families raced, when the
        Deliverer says so); True once the domain is settled or must stop."""
        agent = self.options.deliverer
        for host, addresses in hosts:
            waiting = [address for address in addresses if not self._skipped(host, address)]
            while waiting:
                if not self.pending or self.budget.exhausted:
                    return True
                first = waiting.pop(0)
                race = [Target(host, first)]
                if (
                    agent.settings.happy_eyeballs
                    and waiting
                    and waiting[0].version != first.version
                ):
                    race.append(Target(host, waiting.pop(0)))
                race = [target for target in race if self.budget.take(target)]
                if not race:
                    continue
                verdict = await agent.for_host(host, functools.partial(self._attempt, race))
                if verdict is Next.STOP:
                    return True
        return not self.pending

    def _attempt(self, race: list[Target]) -> Deferred[Next]:
        return Deferred.fromCoroutine(self._try(race))

    def _skipped(self, host: str, address: IPAddress) -> bool:
        """True when the Deliverer remembers ``address`` as dead: not tried."""
        options = self.options
        reason = options.deliverer.dead(options.reactor, address, options.port)
        if reason is None:
            return False
        error = ConnectionFailed(
            f"{host} [{address}] skipped: it timed out recently ({reason})", step=Step.CONNECT
        )
        self.attempts.append(Attempt(host, str(address), error))
        self.last_error = error
        return True

    # -- one address ------------------------------------------------------------

    def _endpoint(self, address: IPAddress) -> IStreamClientEndpoint:
        options = self.options
        return options.deliverer.endpoint(
            options.reactor, address, options.port, options.timeouts.connect
        )

    def _racing(self, race: list[Target]) -> RacingEndpoint[Target]:
        attempts = [(target, self._endpoint(target.address)) for target in race]
        return RacingEndpoint(
            attempts, self.options.reactor, self.options.deliverer.settings.attempt_delay
        )

    def _lost_race(self, racing: RacingEndpoint[Target]) -> None:
        """Record the attempts that lost a race by failing."""
        options = self.options
        for target, failure in racing.failures:
            error = connect_error(failure, Host(str(target.address), target.address), options.port)
            self.attempts.append(Attempt(target.host, str(target.address), error))
            options.deliverer.failed(options.reactor, target.address, options.port, error)
        racing.failures.clear()

    def _session_key(self, target: Target) -> Hashable:
        """What a kept session must have been opened with to serve this delivery."""
        options = self.options
        return (
            target.host.lower(),
            target.address,
            options.port,
            self.policy,
            options.ehlo,
            Identity(options.trust_root),
            Identity(options.authentication),
        )

    async def _reuse(self, race: list[Target]) -> Next | None:
        """Deliver over a session kept by the Deliverer, if one fits; None if none
        does (or the one that did had gone stale)."""
        options = self.options
        for target in race:
            key = self._session_key(target)
            while (idle := options.deliverer.take_idle(options.reactor, key)) is not None:
                log.debug(
                    "{domain}: reusing the session to {host} [{address}]",
                    domain=self.domain,
                    host=target.host,
                    address=str(target.address),
                )
                self.budget.session()
                checker, plaintext_note = idle.extra
                tls = self._tls_status(idle.session, checker, plaintext_note)
                verdict = await self._transaction(target, idle, tls)
                if verdict is not None:
                    return verdict
        return None

    async def _try(self, race: list[Target]) -> Next:
        reused = await self._reuse(race)
        if reused is not None:
            return reused
        options = self.options
        target = race[0]
        policy = self.policy
        plaintext_note: str | None = None
        while True:
            checker: CheckedTLS | None = None
            mode = TLSMode.NONE
            if policy is not TLSPolicy.NONE and plaintext_note is None:
                mode = policy.tls_mode
                checker = CheckedTLS(
                    target.host,
                    trust_root=options.trust_root,
                    enforce=policy.enforces_certificate,
                )
            racing = self._racing(race) if len(race) > 1 else None
            try:
                session: Session = await connect(
                    target.address,
                    port=options.port,
                    tls_mode=mode,
                    domain=options.ehlo,
                    tls=checker,
                    authentication=options.authentication,
                    timeouts=options.timeouts,
                    reactor=options.reactor,
                    endpoint=racing if racing is not None else self._endpoint(target.address),
                    max_recipients=options.max_recipients,
                )
            except SMTPError as error:
                if racing is not None:
                    # Every attempt failed: the last one's error is ``error``.
                    racing.failures.pop()
                    self._lost_race(racing)
                    target = race[-1]
                self.attempts.append(Attempt(target.host, str(target.address), error))
                options.deliverer.failed(options.reactor, target.address, options.port, error)
                self.last_error = error
                log.info(
                    "{domain}: {host} [{address}] failed: {error}",
                    domain=self.domain,
                    host=target.host,
                    address=str(target.address),
                    error=error,
                )
                if connected(error) and plaintext_note is None:
                    self.budget.session()
                if (
                    policy is TLSPolicy.MAY
                    and checker is not None
                    and options.authentication is None
                    and (checker.handshake_failed or isinstance(error, STARTTLSRefused))
                ):
                    plaintext_note = f"STARTTLS failed ({error}); retried in plaintext"
                    continue
                verdict = after_session_error(error)
                if verdict is Next.STOP:
                    self._settle_all(error)
                return verdict
            if racing is not None:
                self._lost_race(racing)
                assert racing.winner is not None
                target = racing.winner
                race = [target]  # a plaintext retry goes to the address that answered
            if plaintext_note is None:
                self.budget.session()
            tls = self._tls_status(session, checker, plaintext_note)
            fresh = await self._transaction(target, Idle(session, (checker, plaintext_note)), tls)
            assert fresh is not None  # only a reused session can be stale
            return fresh

    def _tls_status(
        self, session: Session, checker: CheckedTLS | None, plaintext_note: str | None
    ) -> TLSStatus:
        policy = self.policy
        prefix = "MTA-STS enforce: " if self.sts_mode is Mode.ENFORCE else ""
        info = session.tls
        if info is None or checker is None:
            if policy is TLSPolicy.NONE:
                reason = "TLS policy none: STARTTLS not attempted"
            elif plaintext_note is not None:
                reason = plaintext_note
            else:
                reason = "the server does not offer STARTTLS"
            status = TLSStatus(TLSLevel.NONE, policy, prefix + reason, self.sts_mode, None)
        elif checker.verified:
            reason = f"certificate verified for {checker.hostname}"
            status = TLSStatus(TLSLevel.VERIFIED, policy, prefix + reason, self.sts_mode, info)
        else:
            reason = f"{checker.problem or 'certificate not checked'} (policy {policy.value})"
            status = TLSStatus(TLSLevel.ENCRYPTED, policy, prefix + reason, self.sts_mode, info)
        if self.sts_mode is Mode.TESTING and status.level is not TLSLevel.VERIFIED:
            log.warn(
                "MTA-STS testing: {host} of {domain} would fail under enforce: {reason}",
                host=checker.hostname if checker is not None else "?",
                domain=self.domain,
                reason=status.reason,
            )
        return status

    async def _transaction(self, target: Target, idle: Idle, tls: TLSStatus) -> Next | None:
        """One transaction; None when a reused session turned out to be closed
        before the message went out (then a new connection is opened)."""
        options = self.options
        session = idle.session
        sent = [self.recipient_options.get(key, mailbox) for key, mailbox in self.pending.items()]
        keep = False
        try:
            receipt = await session.send_message(
                options.sender, sent, self.body.producer(), options.message
            )
        except SMTPError as error:
            if idle.uses > 1 and _stale(error):
                self.budget.sessions -= 1
                return None
            self.attempts.append(Attempt(target.host, str(target.address), error, tls))
            self.last_error = error
            verdict = self._failed_transaction(target, tls, error)
        else:
            self.attempts.append(Attempt(target.host, str(target.address), None, tls))
            self._receipt(target, tls, receipt)
            verdict = Next.NEXT_ADDRESS if self.pending else Next.STOP
            key = self._session_key(target)
            keep = options.deliverer.keep_idle(options.reactor, key, idle, self.domain)
        finally:
            if not keep:
                with contextlib.suppress(Exception):
                    await session.quit()
        return verdict

    def _receipt(self, target: Target, tls: TLSStatus, result: Receipt | RecipientsRefused) -> None:
        """Settle what the transaction settled; a recipient refused for now
        keeps its place for the next exchanger."""
        for key, mailbox in list(self.pending.items()):
            verdict = recipient_verdict(result, str(mailbox))
            if verdict is None:
                continue
            if verdict.status is DeliveryStatus.TEMPORARY:
                assert verdict.reply is not None
                self.deferred_replies[key] = verdict.reply  # try the next exchanger
                continue
            receipt = result if isinstance(result, Receipt) else None
            self._settle(
                key, verdict.status, target=target, reply=verdict.reply, error=verdict.error,
                tls=tls, receipt=receipt if verdict.status is DeliveryStatus.DELIVERED else None,
            )  # fmt: skip

    def _failed_transaction(self, target: Target, tls: TLSStatus, error: SMTPError) -> Next:
        if isinstance(error, RecipientsRefused):
            self._receipt(target, tls, error)
            # A recipient neither accepted nor refused (all-or-nothing, a
            # pipelined failure) keeps its place for the next exchanger.
            return Next.NEXT_ADDRESS if self.pending else Next.STOP
        verdict = after_transaction_error(error)
        if verdict is Next.STOP:
            status = error_verdict(error).status
            for key in list(self.pending):
                self._settle(key, status, target=target, reply=error.reply, error=error, tls=tls)
        return verdict

    # -- outcomes ---------------------------------------------------------------------

    def _settle(
        self,
        key: str,
        status: DeliveryStatus,
        *,
        target: Target | None = None,
        reply: Reply | None = None,
        error: SMTPError | None = None,
        tls: TLSStatus | None = None,
        receipt: Receipt | None = None,
    ) -> None:
        self.pending.pop(key, None)
        self.deferred_replies.pop(key, None)
        self.outcomes[key] = Outcome(
            recipient=key,
            domain=self.domain,
            status=status,
            mx=target.host if target is not None else None,
            address=str(target.address) if target is not None else None,
            port=self.options.port if target is not None else None,
            reply=reply,
            error=error,
            tls=tls,
            receipt=receipt,
            attempts=tuple(self.attempts),
        )

    def _loop(self) -> None:
        reply = loop_reply(self.domain)
        self._settle_all(MailLoop(f"mail for {self.domain} loops back to myself", reply=reply))

    def _settle_all(self, error: SMTPError, status: DeliveryStatus | None = None) -> None:
        if status is None:
            status = DeliveryStatus.TEMPORARY if error.temporary else DeliveryStatus.PERMANENT
        for key in list(self.pending):
            self._settle(key, status, reply=error.reply, error=error)

    def _finish(self) -> None:
        """Settle what no exchanger settled."""
        if not self.pending:
            return
        for key in list(self.pending):
            reply = self.deferred_replies.get(key)
            if reply is not None:
                deferred = error_for_reply(reply, Step.RCPT, "recipient deferred")
                self._settle(key, DeliveryStatus.TEMPORARY, reply=reply, error=deferred)
        if not self.pending:
            return
        if self.last_error is not None:
            # Every exchanger tried failed before or during the transaction
            # in a way the next one might not: try again later, even after
            # a 5xx greeting (Postfix's smtp_skip_5xx_greeting).
            self._settle_all(self.last_error, DeliveryStatus.TEMPORARY)
            return
        temporary = any(e.temporary for e in self.lookup_errors) or not self.lookup_errors
        details = "; ".join(str(e) for e in self.lookup_errors) or "no exchanger left to try"
        self._settle_all(
            NoMailExchanger(
                f"no exchanger of {self.domain} has a usable address: {details}",
                temporary=temporary,
            )
        )


def _stale(error: SMTPError) -> bool:
    """A kept connection the server had closed: nothing of the message was sent."""
    return isinstance(error, ConnectionFailed) and not getattr(error, "maybe_delivered", False)


def _abandon(deferred: Deferred[Any]) -> None:
    """Cancel a lookup whose result is no longer wanted, quietly."""
    deferred.addErrback(lambda _: None)
    deferred.cancel()
