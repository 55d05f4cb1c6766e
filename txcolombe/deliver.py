"""Direct delivery: find each recipient domain's mail exchangers and hand the
message to them (:func:`deliver`).

For each domain, concurrently (bounded by ``max_concurrency``):

1. find the exchangers (:mod:`txcolombe.routing`, :mod:`txcolombe.dns`):
   address literal, MX records by preference with equal ones shuffled, the
   implicit MX, null MX, NXDOMAIN and SERVFAIL;
2. apply the domain's MTA-STS policy (:mod:`txcolombe.mtasts`), if any;
3. try the exchangers' addresses in order, within Postfix's caps (5
   addresses, 2 sessions), under the TLS policy (:mod:`txcolombe.tlspolicy`);
   a failed connection, greeting, EHLO or TLS moves to the next address, as
   does a 4xx to the transaction; a 5xx to the transaction is final;
4. report, per recipient, delivered (exchanger, address, reply, TLS level
   and why) or a temporary or permanent failure with its error.

The body goes to several domains at once and, after a failure, to the next
exchanger, so it must be replayable (:mod:`txcolombe.replay`): bytes,
messages and regular files are used as they are; any other body is first
copied, in constant memory, to an anonymous temporary file.
"""

from __future__ import annotations

import contextlib
import ipaddress
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    DeferredSemaphore,
    succeed,
)
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IResolver, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from txcolombe.address import Mailbox, parse_domain, parse_sender
from txcolombe.auth import Authentication
from txcolombe.body import Body, check_body
from txcolombe.dns import DEFAULT_DNS_TIMEOUT, default_resolver, lookup_addresses, lookup_mx
from txcolombe.dsn import DSN
from txcolombe.errors import (
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
from txcolombe.machine import TLSMode
from txcolombe.mtasts import MTASTS, CachedPolicy, Mode
from txcolombe.outcome import Attempt, DeliveryResult, DeliveryStatus, Outcome, TLSStatus
from txcolombe.protocol import DEFAULT_TIMEOUTS, Timeouts
from txcolombe.receipt import Receipt
from txcolombe.replay import ReplayableBody
from txcolombe.reply import Reply
from txcolombe.routing import (
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
    split_refused,
)
from txcolombe.session import Session, connect
from txcolombe.tlspolicy import CheckedTLS, TLSLevel, TLSPolicy

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
    dsn: DSN | None
    requiretls: bool
    body_type: str | None
    smtputf8: bool
    utf8_headers: bool
    local_names: frozenset[str]
    local_addresses: frozenset[IPAddress]


def deliver(
    sender: str | Mailbox | None,
    recipients: Iterable[str | Mailbox] | str | Mailbox,
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
    body_type: str | None = None,
    smtputf8: bool = False,
    utf8_headers: bool = False,
) -> Deferred[DeliveryResult]:
    """Deliver a message to each recipient's domain, through its exchangers.

    One transaction per domain, domains in parallel (``max_concurrency`` at
    a time). See the module documentation and ``docs/deliver.md``.

    :param domain: the EHLO name (default: this host's FQDN).
    :param tls_policy: ``"none"``, ``"may"`` (the default), ``"encrypt"`` or
        ``"verify"`` (:class:`~txcolombe.tlspolicy.TLSPolicy`).
    :param mta_sts: apply MTA-STS policies (True: with a process-wide
        in-memory cache), or not, or through this :class:`~txcolombe.mtasts.MTASTS`.
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
        NOTIFY, ORCPT for each recipient), as for ``Session.send``.
    :param requiretls: ask each exchanger for REQUIRETLS (RFC 8689).
    :param local_identities: our own host names and IP addresses (RFC 5321
        §5.1): MX records at or below our own preference are dropped, and
        when we are the best exchanger the domain fails with
        :class:`~txcolombe.errors.MailLoop` (554 5.4.6) instead of looping.
    :param body_type: the BODY the message came with, as for ``Session.send``
        (a relay passes it on).
    :param smtputf8: the message came with SMTPUTF8, as for ``Session.send``.
    :param utf8_headers: the header has UTF-8 (RFC 6532), as for ``Session.send``.
    :returns: a Deferred firing with a :class:`DeliveryResult`; it fails
        only for the caller's mistakes (:class:`~txcolombe.errors.UsageError`,
        e.g. an invalid sender or an unreadable body). Cancelling it aborts
        every connection.
    """
    try:
        if isinstance(recipients, str | Mailbox):
            recipients = [recipients]
        recipient_list = list(recipients)
        if not recipient_list:
            raise UsageError("no recipients")
        check_body(body)
        if body_type not in (None, "7BIT", "8BITMIME"):
            raise UsageError(f"body_type is None, '7BIT' or '8BITMIME', not {body_type!r}")
        policy = TLSPolicy.parse(tls_policy)
        if authentication is not None and policy is TLSPolicy.NONE:
            raise UsageError("authentication is never sent without TLS (tls_policy='none')")
        if max_concurrency < 1:
            raise UsageError("max_concurrency must be at least 1")
        if not 0 < port < 65536:
            raise UsageError(f"invalid port {port}")
        Budget(max_addresses, max_sessions)  # validates the caps
        preference = AddressPreference(address_preference)
        options = _Options(
            sender=parse_sender(sender),
            tls_policy=policy,
            mta_sts=(default_mta_sts() if mta_sts is True else mta_sts or None),
            trust_root=trust_root,
            mta_sts_trust_root=mta_sts_trust_root,
            authentication=authentication,
            ehlo=parse_domain(domain) if domain is not None else None,
            timeouts=timeouts,
            reactor=reactor if reactor is not None else _default_reactor(),
            resolver=resolver if resolver is not None else default_resolver(),
            port=port,
            max_addresses=max_addresses,
            max_sessions=max_sessions,
            address_preference=preference,
            dns_timeout=tuple(dns_timeout),
            rng=rng,
            dsn=dsn,
            requiretls=requiretls,
            body_type=body_type,
            smtputf8=smtputf8,
            utf8_headers=utf8_headers,
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


def _default_reactor() -> Any:
    from twisted.internet import reactor

    return reactor


async def _deliver(
    options: _Options,
    recipients: list[str | Mailbox],
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
    replayable = await ReplayableBody.of(body)
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


def _in_order(recipients: list[str | Mailbox], outcomes: dict[str, Outcome]) -> DeliveryResult:
    """The outcomes in the order the recipients were given (duplicates once)."""
    keys = dict.fromkeys(str(recipient) for recipient in recipients)
    return DeliveryResult({key: outcomes[key] for key in keys if key in outcomes})


def _domain_task(
    options: _Options, group: DomainRecipients, body: ReplayableBody
) -> Deferred[dict[str, Outcome]]:
    return Deferred.fromCoroutine(_DomainDelivery(options, group, body).run())


class _DomainDelivery:
    """One domain: route, then try addresses until the recipients are settled."""

    def __init__(self, options: _Options, group: DomainRecipients, body: ReplayableBody) -> None:
        self.options = options
        self.domain = group.domain
        self.body = body
        self.pending: dict[str, Mailbox] = dict(group.recipients)
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
            addresses = order_addresses(answer.ipv6, answer.ipv4, options.address_preference)
            if options.local_addresses.intersection(addresses):
                # This exchanger is us: the rest are no more preferred.
                log.info("{host} of {domain} is this host", host=host, domain=self.domain)
                if host == hosts[0]:
                    self._loop()
                return
            if await self._try_targets([(host, addresses)]):
                return

    async def _try_targets(self, hosts: list[tuple[str, Sequence[IPAddress]]]) -> bool:
        """Try each address; True once the domain is settled or must stop."""
        for host, addresses in hosts:
            for address in addresses:
                if not self.pending or self.budget.exhausted:
                    return True
                target = Target(host, address)
                if not self.budget.take(target):
                    continue
                if await self._try(target) is Next.STOP:
                    return True
        return not self.pending

    # -- one address ------------------------------------------------------------

    def _endpoint(self, address: IPAddress) -> IStreamClientEndpoint:
        options = self.options
        timeout = options.timeouts.connect
        if address.version == 6:
            return TCP6ClientEndpoint(  # type: ignore[no-untyped-call]
                options.reactor, str(address), options.port, timeout=timeout
            )
        return TCP4ClientEndpoint(options.reactor, str(address), options.port, timeout=timeout)

    async def _try(self, target: Target) -> Next:
        options = self.options
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
                    endpoint=self._endpoint(target.address),
                )
            except SMTPError as error:
                self.attempts.append(Attempt(target.host, str(target.address), error))
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
            if plaintext_note is None:
                self.budget.session()
            tls = self._tls_status(session, checker, plaintext_note)
            return await self._transaction(target, session, tls)

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

    async def _transaction(self, target: Target, session: Session, tls: TLSStatus) -> Next:
        options = self.options
        sent = list(self.pending.values())
        try:
            receipt = await session.send(
                options.sender,
                sent,
                self.body.producer(),
                dsn=options.dsn,
                requiretls=options.requiretls,
                body_type=options.body_type,
                smtputf8=options.smtputf8,
                utf8_headers=options.utf8_headers,
            )
        except SMTPError as error:
            self.attempts.append(Attempt(target.host, str(target.address), error, tls))
            self.last_error = error
            verdict = self._failed_transaction(target, tls, error)
        else:
            self.attempts.append(Attempt(target.host, str(target.address), None, tls))
            self._receipt(target, tls, receipt)
            verdict = Next.NEXT_ADDRESS if self.pending else Next.STOP
        finally:
            with contextlib.suppress(Exception):
                await session.quit()
        return verdict

    def _receipt(self, target: Target, tls: TLSStatus, receipt: Receipt) -> None:
        for key, mailbox in list(self.pending.items()):
            wire = str(mailbox)
            if wire in receipt.accepted:
                self._settle(
                    key,
                    DeliveryStatus.DELIVERED,
                    target=target,
                    reply=receipt.reply,
                    tls=tls,
                    receipt=receipt,
                )
        self._refusals(target, tls, receipt.refused)

    def _refusals(self, target: Target, tls: TLSStatus, refused: Mapping[str, Reply]) -> None:
        temporary, permanent = split_refused(refused)
        for key, mailbox in list(self.pending.items()):
            wire = str(mailbox)
            if wire in temporary:
                self.deferred_replies[key] = temporary[wire]  # try the next exchanger
            elif wire in permanent:
                reply = permanent[wire]
                error = error_for_reply(reply, Step.RCPT, "recipient refused")
                self._settle(
                    key, DeliveryStatus.PERMANENT, target=target, reply=reply, error=error, tls=tls
                )

    def _failed_transaction(self, target: Target, tls: TLSStatus, error: SMTPError) -> Next:
        if isinstance(error, RecipientsRefused):
            self._refusals(target, tls, error.refused)
            # A recipient neither accepted nor refused (all-or-nothing, a
            # pipelined failure) keeps its place for the next exchanger.
            return Next.NEXT_ADDRESS if self.pending else Next.STOP
        verdict = after_transaction_error(error)
        if verdict is Next.STOP:
            for key in list(self.pending):
                status = DeliveryStatus.TEMPORARY if error.temporary else DeliveryStatus.PERMANENT
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


def _abandon(deferred: Deferred[Any]) -> None:
    """Cancel a lookup whose result is no longer wanted, quietly."""
    deferred.addErrback(lambda _: None)
    deferred.cancel()
