"""The ``[shaping]`` section of the relay's TOML file, as Python settings.

:func:`parse_shaping` reads the section (a dict, as :mod:`tomllib` gives it)
into a :class:`ShapingSettings`, the object the relay and the delivery
engine take; every mistake is one :class:`ShapingConfigError` line naming
the key (``shaping.domain."example.com".message_rate: ...``)::

    [shaping]
    redis = "127.0.0.1:6379"          # optional: share counters between relays
    backoff_patterns = ['^421 ', '4\\.7\\.28']   # replaces the defaults
    suspend = 300                     # seconds

    [shaping.site_patterns]
    google = '\\.google\\.com$'

    [shaping.default]
    max_connections = 20
    message_rate = "100/s"

    [shaping.site.google]
    connection_rate = "10/s"

    [shaping.domain."example.com"]
    messages_per_connection = 10

Keys may be written with ``-`` or ``_``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.interfaces import IReactorTime

from txcolombe.delivery.shaping.backoff import DEFAULT_PATTERNS, BackoffRules
from txcolombe.delivery.shaping.policy import DEFAULT_LIMITS, Limits, ShapingPolicy
from txcolombe.delivery.shaping.redisstore import DEFAULT_PREFIX, RedisStore
from txcolombe.delivery.shaping.shaper import Shaper
from txcolombe.delivery.shaping.sites import SiteNamer
from txcolombe.delivery.shaping.store import MemoryStore, Store
from txcolombe.delivery.shaping.throttle import Rate, RateError

_TOP = {
    "redis", "redis_prefix", "backoff_patterns", "suspend", "rate_factor", "min_rate_factor",
    "recover", "site_patterns", "default", "site", "domain",
}  # fmt: skip
_COUNTS = ("max_connections", "messages_per_connection")
_RATES = ("message_rate", "connection_rate")
_TIMES = ("suspend", "recover")
_FACTORS = ("rate_factor", "min_rate_factor")


class ShapingConfigError(ValueError):
    """A mistake in the ``[shaping]`` section; the message is one line."""


@dataclass(frozen=True)
class ShapingSettings:
    """Everything the shaping layer is configured with.

    :ivar redis: ``(host, port)`` of a Redis shared with other relays, or
        None for the in-process store.
    """

    policy: ShapingPolicy = field(default_factory=ShapingPolicy)
    backoff: BackoffRules = field(default_factory=BackoffRules)
    sites: SiteNamer = field(default_factory=SiteNamer)
    redis: tuple[str, int] | None = None
    redis_prefix: str = DEFAULT_PREFIX

    def shaper(self, clock: IReactorTime) -> Shaper:
        """A :class:`Shaper` with these settings (on Redis, if set: it
        connects in the background)."""
        store: Store = MemoryStore()
        if self.redis is not None:
            host, port = self.redis
            store = RedisStore.connect(host, port, prefix=self.redis_prefix, clock=clock)
        return Shaper(self.policy, self.backoff, store=store, clock=clock)


def _keys(
    table: Mapping[str, Any], where: str, known: set[str] | tuple[str, ...]
) -> dict[str, Any]:
    if not isinstance(table, Mapping):
        raise ShapingConfigError(f"{where} is a table")
    out = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in known:
            raise ShapingConfigError(f"{where}: unknown key {key!r}")
        out[name] = value
    return out


def _count(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ShapingConfigError(f"{where}: a whole number of at least 1, not {value!r}")
    return value


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ShapingConfigError(f"{where}: a number, not {value!r}")
    return float(value)


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ShapingConfigError(f"{where}: a string, not {value!r}")
    return value


def _regex(value: Any, where: str) -> str:
    try:
        re.compile(_text(value, where))
    except re.error as error:
        raise ShapingConfigError(f"{where}: bad regular expression {value!r}: {error}") from None
    return str(value)


def _limits(table: Any, where: str) -> Limits:
    values = _keys(table, where, _COUNTS + _RATES)
    out: dict[str, Any] = {}
    for name, value in values.items():
        if name in _COUNTS:
            out[name] = _count(value, f"{where}.{name}")
        else:
            try:
                out[name] = Rate.parse(value)
            except RateError as error:
                raise ShapingConfigError(f"{where}.{name}: {error}") from None
    return Limits(**out)


def _overrides(table: Any, where: str, lower: bool) -> dict[str, Limits]:
    if not isinstance(table, Mapping):
        raise ShapingConfigError(f"{where} is a table of tables")
    out = {}
    for name, limits in table.items():
        key = name.rstrip(".").lower() if lower else name
        out[key] = _limits(limits, f'{where}."{name}"')
    return out


def _host_port(value: Any, where: str) -> tuple[str, int]:
    text = _text(value, where)
    host, port = text, "6379"
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            port = rest.removeprefix(":")
    elif text.count(":") == 1:
        host, port = text.split(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ShapingConfigError(f"{where}: expected HOST:PORT, not {text!r}")
    return host, int(port)


def parse_shaping(section: Any) -> ShapingSettings:
    """Read the ``[shaping]`` section; :class:`ShapingConfigError` says what is wrong."""
    values = _keys(section, "shaping", _TOP)
    times: dict[str, Any] = {}
    for name in _TIMES:
        if name in values:
            times[name] = _number(values[name], f"shaping.{name}")
            if times[name] < 0:
                raise ShapingConfigError(f"shaping.{name}: seconds, not negative")
    for name in _FACTORS:
        if name in values:
            times[name] = _number(values[name], f"shaping.{name}")
    patterns = values.get("backoff_patterns", list(DEFAULT_PATTERNS))
    if not isinstance(patterns, list):
        raise ShapingConfigError("shaping.backoff_patterns: a list of regular expressions")
    checked = [_regex(p, f"shaping.backoff_patterns[{i}]") for i, p in enumerate(patterns)]
    try:
        backoff = BackoffRules.of(checked, **times)
    except ValueError as error:
        raise ShapingConfigError(f"shaping: {error}") from None
    site_patterns = values.get("site_patterns", {})
    if not isinstance(site_patterns, Mapping):
        raise ShapingConfigError("shaping.site_patterns: a table of NAME = REGEX")
    namer = SiteNamer.of(
        {name: _regex(p, f'shaping.site_patterns."{name}"') for name, p in site_patterns.items()}
    )
    default = DEFAULT_LIMITS
    if "default" in values:
        default = _limits(values["default"], "shaping.default").over(DEFAULT_LIMITS)
    policy = ShapingPolicy(
        default,
        _overrides(values.get("site", {}), "shaping.site", lower=False),
        _overrides(values.get("domain", {}), "shaping.domain", lower=True),
    )
    redis = _host_port(values["redis"], "shaping.redis") if "redis" in values else None
    prefix = _text(values.get("redis_prefix", DEFAULT_PREFIX), "shaping.redis_prefix")
    return ShapingSettings(policy, backoff, namer, redis, prefix)
