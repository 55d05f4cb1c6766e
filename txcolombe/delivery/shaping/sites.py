"""Sites: the domains that one provider hosts, named by their exchangers.

Throttles and suspensions are kept per *site*, not per domain: every domain
whose MX records name the same hosts (say, Google Workspace's customers)
shares one set of counters, since the provider counts what it receives
from us across all of them (KumoMTA's model). A site's name is its MX host
names, lower-case, without the final dot, sorted and joined by commas; or
the name of the first configured pattern that every host matches, so that
providers whose MX sets vary per customer still share one site.

:class:`SiteNamer` is pure; :class:`SiteResolver` adds the MX lookup (with
a small cache, the queue asks for the same domains over and over).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.interfaces import IReactorTime, IResolver

from txcolombe.delivery.dns import lookup_mx


@dataclass(frozen=True)
class SiteNamer:
    """Names a site from its hosts.

    :ivar patterns: site name to a regular expression; the first (in order)
        that every host matches (``re.search``) names the site.
    """

    patterns: Mapping[str, re.Pattern[str]] = field(default_factory=dict)

    @classmethod
    def of(cls, patterns: Mapping[str, str]) -> SiteNamer:
        """Compile ``{name: regex}``; a bad regex raises :class:`re.error`."""
        return cls({name: re.compile(regex) for name, regex in patterns.items()})

    def name(self, hosts: Iterable[str]) -> str:
        normal = sorted({h.strip().rstrip(".").lower() for h in hosts} - {""})
        if not normal:
            raise ValueError("a site has at least one host")
        for name, pattern in self.patterns.items():
            if all(pattern.search(host) for host in normal):
                return name
        return ",".join(normal)


class SiteResolver:
    """A domain's site, from its MX records (the domain itself when it has
    none: its implicit MX, RFC 5321 §5.1). Names are cached ``ttl`` seconds."""

    def __init__(
        self,
        resolver: IResolver,
        *,
        clock: IReactorTime,
        namer: SiteNamer | None = None,
        ttl: float = 300.0,
    ) -> None:
        self.resolver = resolver
        self.clock = clock
        self.namer = namer or SiteNamer()
        self.ttl = ttl
        self._cache: dict[str, tuple[float, str]] = {}

    def cached(self, domain: str) -> str | None:
        """The site of ``domain`` if it is known now, without a lookup."""
        cached = self._cache.get(domain.rstrip(".").lower())
        if cached is None or cached[0] <= self.clock.seconds():
            return None
        return cached[1]

    async def site(self, domain: str) -> str:
        """The site of ``domain``; lookup errors propagate (routing errors)."""
        domain = domain.rstrip(".").lower()
        now = self.clock.seconds()
        cached = self._cache.get(domain)
        if cached is not None and cached[0] > now:
            return cached[1]
        records: list[Any] = await lookup_mx(self.resolver, domain)
        hosts = [mx.exchange for mx in records if not mx.null] or [domain]
        name = self.namer.name(hosts)
        self._cache[domain] = (now + self.ttl, name)
        return name
