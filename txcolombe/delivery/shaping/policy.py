"""Limits per destination: defaults, and overrides per site and per domain.

A :class:`Limits` holds the four limits of the issue; ``None`` means "no
limit" in a resolved one and "inherit" in an override. For a message to
``domain`` on ``site``, :meth:`ShapingPolicy.limits` starts from the defaults,
applies the site's override, then the domain's (the most specific wins,
field by field). The counters are always the site's: a domain override
changes the limits checked against them when sending to that domain.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace

from txcolombe.delivery.shaping.throttle import Rate


@dataclass(frozen=True)
class Limits:
    """How much one site may receive.

    :ivar max_connections: connections open to the site at once.
    :ivar messages_per_connection: messages sent on one connection before
        it must be closed and another acquired.
    :ivar message_rate: messages per unit of time, to the whole site.
    :ivar connection_rate: connections opened per unit of time.
    """

    max_connections: int | None = None
    messages_per_connection: int | None = None
    message_rate: Rate | None = None
    connection_rate: Rate | None = None

    def __post_init__(self) -> None:
        for name in ("max_connections", "messages_per_connection"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be at least 1, not {value!r}")

    def over(self, base: Limits) -> Limits:
        """``base`` with every limit this one sets replaced."""
        changes = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(base, **{k: v for k, v in changes.items() if v is not None})


#: The defaults when none are configured: what Postfix's smtp client does
#: (20 connections per destination), with no rates.
DEFAULT_LIMITS = Limits(max_connections=20)


@dataclass(frozen=True)
class ShapingPolicy:
    """Defaults and overrides; site names as :class:`~txcolombe.delivery.shaping.sites.SiteNamer`
    gives them, domains lower-case."""

    default: Limits = DEFAULT_LIMITS
    sites: Mapping[str, Limits] = field(default_factory=dict)
    domains: Mapping[str, Limits] = field(default_factory=dict)

    def limits(self, site: str, domain: str | None = None) -> Limits:
        limits = self.default
        if site in self.sites:
            limits = self.sites[site].over(limits)
        if domain is not None:
            override = self.domains.get(domain.rstrip(".").lower())
            if override is not None:
                limits = override.over(limits)
        return limits
