"""Automatic back-off: replies that mean "slow down" suspend a site.

A reply matching one of :attr:`BackoffRules.patterns` (``421``, ``451
4.7.x``, ``4.7.28``-style rate-limit texts by default) suspends its site
for :attr:`~BackoffRules.suspend` seconds: nothing is sent to it until
then. Its rates are also multiplied by :attr:`~BackoffRules.rate_factor`
(down to :attr:`~BackoffRules.min_rate_factor`) for
:attr:`~BackoffRules.recover` seconds after the last slow-down, then
return to the configured ones. The replies that arrive while a site is
already suspended (every open connection gets one) extend the suspension
but lower the rate only once.

Everything here is sans-I/O: :class:`SiteState` is the stored state and
:func:`slow_down` / :meth:`SiteState.at` compute with the time given.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from txcolombe.codec.reply import Reply

#: The default patterns, searched (case-insensitively) in ``CODE TEXT`` of
#: each line of a reply.
DEFAULT_PATTERNS = (
    r"^421\b",
    r"^451[ -]4\.7\.\d+",
    r"\b4\.7\.28\b",
    r"rate[ -]limit",
    r"too many (connections|messages|recipients)",
    r"try (again )?later.*(rate|fast|many)",
)


def _compiled(patterns: Sequence[str]) -> tuple[re.Pattern[str], ...]:
    return tuple(re.compile(p, re.IGNORECASE) for p in patterns)


@dataclass(frozen=True)
class BackoffRules:
    """When and how much to back off (times in seconds)."""

    patterns: tuple[re.Pattern[str], ...] = field(
        default_factory=lambda: _compiled(DEFAULT_PATTERNS)
    )
    suspend: float = 300.0
    rate_factor: float = 0.5
    min_rate_factor: float = 0.1
    recover: float = 3600.0

    def __post_init__(self) -> None:
        if self.suspend < 0 or self.recover < 0:
            raise ValueError("suspend and recover are not negative")
        if not 0 < self.min_rate_factor <= self.rate_factor <= 1:
            raise ValueError("0 < min_rate_factor <= rate_factor <= 1")

    @classmethod
    def of(cls, patterns: Sequence[str] = DEFAULT_PATTERNS, **times: Any) -> BackoffRules:
        """Rules from regex texts (a bad one raises :class:`re.error`)."""
        return cls(_compiled(patterns), **times)

    def reason(self, reply: Reply | str) -> str | None:
        """The reply's text if it means "slow down", else None."""
        lines = (
            [f"{reply.code} {line}" for line in reply.lines]
            if isinstance(reply, Reply)
            else str(reply).splitlines()
        )
        for line in lines:
            if any(p.search(line) for p in self.patterns):
                return " / ".join(lines)
        return None


@dataclass(frozen=True)
class SiteState:
    """A site's back-off state, as stored: absolute times, on the shaper's clock."""

    suspended_until: float = 0.0
    reason: str = ""
    factor: float = 1.0
    lowered_until: float = 0.0

    def at(self, now: float) -> SiteState:
        """The state in effect at ``now`` (expired parts reset)."""
        lowered = self.lowered_until > now
        return SiteState(
            self.suspended_until if self.suspended_until > now else 0.0,
            self.reason if lowered or self.suspended_until > now else "",
            self.factor if lowered else 1.0,
            self.lowered_until if lowered else 0.0,
        )

    def suspended(self, now: float) -> bool:
        return self.suspended_until > now

    def snapshot(self, now: float) -> dict[str, Any]:
        current = self.at(now)
        return {
            "suspended": current.suspended(now),
            "suspended_for": max(0.0, current.suspended_until - now),
            "reason": current.reason,
            "rate_factor": current.factor,
            "lowered_for": max(0.0, current.lowered_until - now),
        }


def slow_down(state: SiteState, now: float, reason: str, rules: BackoffRules) -> SiteState:
    """The state after a slow-down reply at ``now``."""
    current = state.at(now)
    factor = current.factor
    if not current.suspended(now):
        factor = max(rules.min_rate_factor, factor * rules.rate_factor)
    return SiteState(
        max(current.suspended_until, now + rules.suspend),
        reason,
        factor,
        now + rules.recover,
    )
