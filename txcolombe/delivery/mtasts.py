"""MTA-STS (RFC 8461): a domain's promise that its exchangers speak verified TLS.

A domain publishes a TXT record ``_mta-sts.<domain>`` (``v=STSv1; id=...``)
and a policy at ``https://mta-sts.<domain>/.well-known/mta-sts.txt``::

    version: STSv1
    mode: enforce
    mx: mail.example.com
    mx: *.example.net
    max_age: 604800

:class:`MTASTS` finds a domain's policy: it asks for the TXT record, fetches
the policy with treq when the record's ``id`` differs from the cached one
(no redirects, a size cap, a timeout, a certificate verified for
``mta-sts.<domain>``), and keeps it for ``max_age`` seconds in a
:class:`PolicyCache`, which can persist to a JSON file. Nothing here ever
fails a delivery by itself: a policy that cannot be had is no policy,
unless a cached one is still valid (RFC 8461 §5.1).

Parsing (:func:`parse_policy`, :func:`parse_record`) and matching
(:func:`mx_matches`) do no I/O.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.interfaces import IReactorTime, IResolver, IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import URI, Agent, HTTPConnectionPool
from twisted.web.iweb import IAgentEndpointFactory, IResponse
from zope.interface import implementer

from txcolombe.client.connect import IOpenSSLTrustRoot
from txcolombe.codec.errors import MTASTSError, RoutingError
from txcolombe.delivery.dns import DEFAULT_DNS_TIMEOUT, ResolvingEndpoint, lookup_txt

__all__ = [
    "MAX_POLICY_SIZE",
    "MTASTS",
    "CachedPolicy",
    "Mode",
    "Policy",
    "PolicyCache",
    "fetch_policy",
    "mx_matches",
    "parse_policy",
    "parse_record",
]

log = Logger(namespace="txcolombe.mtasts")

#: RFC 8461 §3.3: senders may cap the policy body; 64 KiB is its suggestion.
MAX_POLICY_SIZE = 64 * 1024
#: RFC 8461 §3.2: the largest max_age a policy may give (about a year).
MAX_MAX_AGE = 31_557_600
#: Seconds for the whole HTTPS fetch, connection to last byte.
DEFAULT_FETCH_TIMEOUT = 20.0

_RECORD_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_KEY = re.compile(r"[A-Za-z0-9_]+")


class Mode(enum.Enum):
    """What a policy asks of senders."""

    ENFORCE = "enforce"
    """Deliver only to matching exchangers, over verified TLS."""
    TESTING = "testing"
    """Deliver as usual; report (here: log) what enforce would refuse."""
    NONE = "none"
    """The domain has withdrawn its policy."""


@dataclass(frozen=True)
class Policy:
    """A parsed policy (RFC 8461 §3.2)."""

    mode: Mode
    mx: tuple[str, ...]
    max_age: int

    def matches(self, host: str) -> bool:
        """True when the exchanger ``host`` matches one of the ``mx`` patterns."""
        return any(mx_matches(pattern, host) for pattern in self.mx)


def parse_record(records: Iterable[bytes]) -> str | None:
    """The ``id`` of the one valid ``v=STSv1`` TXT record, else None.

    Records not starting with ``v=STSv1`` are ignored; several that do, or
    one without a valid ``id``, mean no policy (RFC 8461 §3.1).
    """
    found: list[str] = []
    for raw in records:
        text = raw.decode("ascii", "replace")
        fields = [part.strip() for part in text.split(";")]
        if not fields or fields[0] != "v=STSv1":
            continue
        found.append(text)
        if len(found) > 1:
            return None
    if not found:
        return None
    ident = None
    for part in found[0].split(";")[1:]:
        key, _, value = part.strip().partition("=")
        if key == "id":
            ident = value.strip()
            break
    if ident is None or not _RECORD_ID.fullmatch(ident):
        return None
    return ident


def parse_policy(data: bytes) -> Policy:
    """Parse a policy body.

    :raises MTASTSError: not a valid STSv1 policy.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise MTASTSError("the policy is not UTF-8 text") from None
    values: dict[str, str] = {}
    mx: list[str] = []
    for line in re.split(r"\r?\n", text):
        if not line.strip():
            continue
        # partition and strip, not a regex with lazy groups: a hostile line
        # of many blanks must cost linear time on the reactor thread.
        key, colon, rest = line.partition(":")
        key = key.rstrip()
        if not colon or not _KEY.fullmatch(key):
            raise MTASTSError(f"malformed policy line {line[:80]!r}")
        value = rest.strip()
        if key == "mx":
            mx.append(value.rstrip(".").lower())
        else:
            values.setdefault(key, value)  # the first of repeated fields counts
    if values.get("version") != "STSv1":
        raise MTASTSError(f"unsupported policy version {values.get('version')!r}")
    try:
        mode = Mode(values.get("mode", ""))
    except ValueError:
        raise MTASTSError(f"unknown policy mode {values.get('mode')!r}") from None
    max_age = values.get("max_age", "")
    if not max_age.isdigit() or len(max_age) > 10:
        raise MTASTSError(f"invalid max_age {max_age!r}")
    if mode is not Mode.NONE and not mx:
        raise MTASTSError(f"a {mode.value} policy must list mx patterns")
    return Policy(mode, tuple(mx), min(int(max_age), MAX_MAX_AGE))


def mx_matches(pattern: str, host: str) -> bool:
    """RFC 8461 §4.1: ``mail.example.com`` matches itself; ``*.example.com``
    matches exactly one more label on the left, never ``example.com`` itself.
    """
    pattern = pattern.rstrip(".").lower()
    host = host.rstrip(".").lower()
    if pattern.startswith("*."):
        label, dot, rest = host.partition(".")
        return bool(label) and bool(dot) and rest == pattern[2:]
    return pattern == host


@dataclass(frozen=True)
class CachedPolicy:
    """A policy with the TXT ``id`` it was fetched for and when."""

    policy: Policy
    id: str
    fetched: float

    @property
    def expires(self) -> float:
        return self.fetched + self.policy.max_age

    def valid(self, now: float) -> bool:
        return now < self.expires


class PolicyCache:
    """Policies by domain, in memory and, with ``path``, in a JSON file.

    The file is read at creation (an unreadable one is logged and ignored)
    and rewritten atomically after each change, so a relay keeps its
    policies across restarts.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._entries: dict[str, CachedPolicy] = {}
        if self.path is not None:
            self._load(self.path)

    def get(self, domain: str) -> CachedPolicy | None:
        """The cached policy for ``domain``, expired or not."""
        return self._entries.get(domain.lower())

    def put(self, domain: str, entry: CachedPolicy) -> None:
        self._entries[domain.lower()] = entry
        self._save()

    def forget(self, domain: str) -> None:
        if self._entries.pop(domain.lower(), None) is not None:
            self._save()

    def __len__(self) -> int:
        return len(self._entries)

    def _load(self, path: Path) -> None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as error:
            log.warn("ignoring the MTA-STS cache {path}: {error}", path=str(path), error=error)
            return
        entries = data.get("policies", {}) if isinstance(data, dict) else {}
        for domain, item in entries.items():
            try:
                policy = Policy(
                    Mode(item["mode"]),
                    tuple(str(pattern) for pattern in item["mx"]),
                    int(item["max_age"]),
                )
                self._entries[domain] = CachedPolicy(
                    policy, str(item["id"]), float(item["fetched"])
                )
            except (KeyError, TypeError, ValueError) as error:
                log.warn(
                    "ignoring a bad cached policy for {domain}: {error}", domain=domain, error=error
                )

    def _save(self) -> None:
        if self.path is None:
            return
        data = {
            "version": 1,
            "policies": {
                domain: {
                    "id": entry.id,
                    "fetched": entry.fetched,
                    "mode": entry.policy.mode.value,
                    "mx": list(entry.policy.mx),
                    "max_age": entry.policy.max_age,
                }
                for domain, entry in self._entries.items()
            },
        }
        directory = self.path.parent
        fd, temporary = tempfile.mkstemp(prefix=".mta-sts-", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as file:
                json.dump(data, file, indent=1, sort_keys=True)
            os.replace(temporary, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise


@implementer(IAgentEndpointFactory)
class _PolicyEndpoints:
    """HTTPS to the policy host: resolved by our resolver, certificate
    verified for that host name."""

    def __init__(
        self,
        reactor: IReactorTime,
        resolver: IResolver,
        trust_root: IOpenSSLTrustRoot | None,
        timeout: float,
        dns_timeout: Sequence[float],
    ) -> None:
        self._reactor = reactor
        self._resolver = resolver
        self._trust_root = trust_root
        self._timeout = timeout
        self._dns_timeout = dns_timeout

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        host = uri.host.decode("ascii")
        tcp = ResolvingEndpoint(
            self._reactor,
            self._resolver,
            host,
            uri.port,
            timeout=self._timeout,
            dns_timeout=self._dns_timeout,
        )
        return wrapClientTLS(optionsForClientTLS(host, trustRoot=self._trust_root), tcp)


def fetch_policy(
    domain: str,
    *,
    reactor: IReactorTime,
    resolver: IResolver,
    trust_root: IOpenSSLTrustRoot | None = None,
    timeout: float = DEFAULT_FETCH_TIMEOUT,
    max_size: int = MAX_POLICY_SIZE,
    port: int = 443,
    dns_timeout: Sequence[float] = DEFAULT_DNS_TIMEOUT,
) -> Deferred[Policy]:
    """Fetch and parse ``https://mta-sts.<domain>/.well-known/mta-sts.txt``.

    The host is resolved with ``resolver``; its certificate must verify for
    ``mta-sts.<domain>`` (on ``trust_root``, default the platform's); only a
    200 with a ``text/plain`` body of at most ``max_size`` octets, within
    ``timeout`` seconds, counts. Redirects are refused (RFC 8461 §3.3).
    ``port`` exists for tests.

    :param reactor: a whole reactor: it connects (IReactorTCP) as well as it
        keeps time; typed as IReactorTime, the part called here directly.
    :returns: a Deferred failing with :class:`~txcolombe.codec.errors.MTASTSError`.
    """
    fetched: Deferred[Policy] = Deferred.fromCoroutine(
        _fetch(domain, reactor, resolver, trust_root, timeout, max_size, port, dns_timeout)
    )

    def on_timeout(result: Any, seconds: float) -> Any:
        # Only called when the timeout cancelled the fetch; whatever the
        # cancelled request failed with (treq wraps it), the cause is time.
        if isinstance(result, Failure):
            raise MTASTSError(f"no MTA-STS policy from mta-sts.{domain} within {seconds}s")
        return result

    fetched.addTimeout(timeout, reactor, onTimeoutCancel=on_timeout)
    return fetched


async def _fetch(
    domain: str,
    reactor: IReactorTime,
    resolver: IResolver,
    trust_root: IOpenSSLTrustRoot | None,
    timeout: float,
    max_size: int,
    port: int,
    dns_timeout: Sequence[float],
) -> Policy:
    import treq
    from treq.client import HTTPClient

    host = f"mta-sts.{domain}"
    netloc = host if port == 443 else f"{host}:{port}"
    url = f"https://{netloc}/.well-known/mta-sts.txt"
    pool = HTTPConnectionPool(reactor, persistent=False)  # type: ignore[no-untyped-call]
    endpoints = _PolicyEndpoints(reactor, resolver, trust_root, timeout, dns_timeout)
    agent = Agent.usingEndpointFactory(reactor, endpoints, pool)  # type: ignore[no-untyped-call]
    client = HTTPClient(agent)
    try:
        response: IResponse = await client.get(url, allow_redirects=False)
    except CancelledError:
        raise
    except Exception as error:
        raise MTASTSError(f"cannot fetch {url}: {_describe(error)}") from error
    if response.code != 200:
        _discard(response)
        what = "a redirect" if 300 <= response.code < 400 else "an error"
        raise MTASTSError(f"{url} answered {response.code} ({what}); policy ignored")
    content_type = (response.headers.getRawHeaders("content-type") or [""])[-1]
    if content_type.split(";")[0].strip().lower() != "text/plain":
        _discard(response)
        raise MTASTSError(f"{url} is {content_type or 'untyped'}, not text/plain")
    length = response.length
    if isinstance(length, int) and length > max_size:
        _discard(response)
        raise MTASTSError(f"{url} is {length} octets, over the {max_size}-octet cap")
    chunks: list[bytes] = []
    size = 0

    def collect(data: bytes) -> None:
        nonlocal size
        size += len(data)
        if size > max_size:
            raise MTASTSError(f"{url} is over the {max_size}-octet cap")
        chunks.append(data)

    try:
        await treq.collect(response, collect)
    except (CancelledError, MTASTSError):
        raise
    except Exception as error:
        raise MTASTSError(f"reading {url} failed: {_describe(error)}") from error
    return parse_policy(b"".join(chunks))


def _discard(response: IResponse) -> None:
    """Refuse a response: take its body only to drop the connection at once."""
    with contextlib.suppress(Exception):
        response.deliverBody(_Discard())  # type: ignore[no-untyped-call]  # IResponse is unannotated


class _Discard(Protocol):
    """Takes a refused response's body and drops the connection at once."""

    def connectionMade(self) -> None:
        transport: Any = self.transport
        if transport is not None:
            transport.stopProducing()


def _describe(error: BaseException) -> str:
    reasons = getattr(error, "reasons", None)
    if reasons:
        return "; ".join(str(getattr(r, "value", r)) for r in reasons)
    return str(error) or type(error).__name__


class MTASTS:
    """Finds and caches MTA-STS policies (RFC 8461 §5.1).

    :param cache: where policies are kept (default: in memory only).
    :param trust_root: roots for the policy hosts' certificates (default: the
        lookup's ``trust_root`` (deliver()'s ``mta_sts_trust_root``), else the
        platform's trust store; never the exchangers' ``trust_root``).
    :param timeout: seconds for one policy fetch.
    :param max_size: the largest policy body accepted, in octets.
    :param clock: the time for cache ages (default: the reactor's).
    :param https_port: the policy server's port; only tests change it.
    :param retry_after: seconds a domain's failed fetch is remembered before
        the next try; doubled after each further failure, up to
        ``max_retry_after``. Meanwhile the domain has its cached policy, if
        still valid, else none (RFC 8461 §5.1), and costs no fetch timeout.
    """

    def __init__(
        self,
        *,
        cache: PolicyCache | None = None,
        trust_root: IOpenSSLTrustRoot | None = None,
        timeout: float = DEFAULT_FETCH_TIMEOUT,
        max_size: int = MAX_POLICY_SIZE,
        clock: IReactorTime | None = None,
        https_port: int = 443,
        retry_after: float = 300.0,
        max_retry_after: float = 86400.0,
    ) -> None:
        self.cache = cache if cache is not None else PolicyCache()
        self.retry_after = retry_after
        self.max_retry_after = max_retry_after
        #: domain -> (time of the next allowed fetch, current backoff).
        self._failed: dict[str, tuple[float, float]] = {}
        #: domain -> the lookups waiting for the fetch under way (one fetch
        #: for all of them).
        self._waiting: dict[str, list[Deferred[Policy]]] = {}
        self.trust_root = trust_root
        self.timeout = timeout
        self.max_size = max_size
        self.clock = clock
        self.https_port = https_port

    def lookup(
        self,
        domain: str,
        *,
        resolver: IResolver,
        reactor: IReactorTime,
        trust_root: IOpenSSLTrustRoot | None = None,
        dns_timeout: Sequence[float] = DEFAULT_DNS_TIMEOUT,
    ) -> Deferred[CachedPolicy | None]:
        """The policy that applies to ``domain`` now, or None.

        Never fails: a policy that cannot be found or fetched is logged and
        counts as none, unless a cached one is still valid.
        """
        return Deferred.fromCoroutine(
            self._lookup(domain.lower(), resolver, reactor, trust_root, dns_timeout)
        )

    async def _lookup(
        self,
        domain: str,
        resolver: IResolver,
        reactor: IReactorTime,
        trust_root: IOpenSSLTrustRoot | None,
        dns_timeout: Sequence[float],
    ) -> CachedPolicy | None:
        clock = self.clock if self.clock is not None else reactor
        cached = self.cache.get(domain)
        valid = cached if cached is not None and cached.valid(clock.seconds()) else None
        try:
            record_id = parse_record(await lookup_txt(resolver, f"_mta-sts.{domain}", dns_timeout))
        except RoutingError as error:
            if error.temporary:
                log.info("MTA-STS record of {domain}: {error}", domain=domain, error=error)
            record_id = None
        if record_id is None or (valid is not None and valid.id == record_id):
            # RFC 8461 §5.1: no record (or the same id) keeps a valid policy;
            # one in the last quarter of its life is refreshed meanwhile, in
            # the background, so that it does not expire between messages.
            if (
                valid is not None
                and record_id is not None
                and valid.expires - clock.seconds() < valid.policy.max_age / 4
                and self._may_fetch(domain, clock)
            ):
                self._start(domain, record_id, resolver, reactor, trust_root, dns_timeout)
            return valid
        if not self._may_fetch(domain, clock):
            return valid  # a recent fetch failed: no new timeout to wait for
        waiting = self._start(domain, record_id, resolver, reactor, trust_root, dns_timeout)
        # Each lookup waits on its own Deferred, so cancelling one (deliver()
        # abandons the policy of a domain with a null MX) leaves the others.
        shared: Deferred[Policy] = Deferred()
        waiting.append(shared)
        try:
            policy = await shared
        except MTASTSError:
            return valid
        entry = self.cache.get(domain)
        return entry if entry is not None else CachedPolicy(policy, record_id, clock.seconds())

    def _may_fetch(self, domain: str, clock: IReactorTime) -> bool:
        """False while a failed fetch of ``domain`` is being backed off."""
        failed = self._failed.get(domain)
        return failed is None or clock.seconds() >= failed[0]

    def _start(
        self,
        domain: str,
        record_id: str,
        resolver: IResolver,
        reactor: IReactorTime,
        trust_root: IOpenSSLTrustRoot | None,
        dns_timeout: Sequence[float],
    ) -> list[Deferred[Policy]]:
        """The lookups waiting for ``domain``'s fetch, starting it if none is
        under way (one fetch serves them all)."""
        waiting = self._waiting.get(domain)
        if waiting is None:
            waiting = self._waiting[domain] = []
            clock = self.clock if self.clock is not None else reactor
            fetch_policy(
                domain,
                reactor=reactor,
                resolver=resolver,
                trust_root=self.trust_root if self.trust_root is not None else trust_root,
                timeout=self.timeout,
                max_size=self.max_size,
                port=self.https_port,
                dns_timeout=dns_timeout,
            ).addBoth(self._fetched, domain, record_id, clock)
        return waiting

    def _fetched(
        self, result: Policy | Failure, domain: str, record_id: str, clock: IReactorTime
    ) -> Any:
        """Cache a fetched policy, or remember the failure with a backoff;
        then wake the waiting lookups."""
        waiting = self._waiting.pop(domain, [])
        if isinstance(result, Policy):
            self._failed.pop(domain, None)
            self.cache.put(domain, CachedPolicy(result, record_id, clock.seconds()))
        else:
            self._failure(domain, record_id, clock, result)
        for waiter in waiting:
            if waiter.called:
                continue
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)
        return None

    def _failure(self, domain: str, record_id: str, clock: IReactorTime, result: Failure) -> None:
        previous = self._failed.get(domain)
        backoff = (
            self.retry_after if previous is None else min(previous[1] * 2, self.max_retry_after)
        )
        self._failed[domain] = (clock.seconds() + backoff, backoff)
        log.warn(
            "MTA-STS policy of {domain} (id {id}) not used: {error}; next try in {backoff}s",
            domain=domain,
            id=record_id,
            error=result.value,
            backoff=backoff,
        )
