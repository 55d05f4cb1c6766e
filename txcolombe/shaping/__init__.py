"""Traffic shaping: limits per destination site, throttles and back-off.

See ``docs/shaping.md``. The rules (:mod:`.throttle`, :mod:`.sites`,
:mod:`.policy`, :mod:`.backoff`) are sans-I/O; :class:`Shaper` waits on a
clock, keeping its counters in a :class:`MemoryStore` or, shared by several
relays, a :class:`~txcolombe.shaping.redisstore.RedisStore`.
"""

from txcolombe.shaping.backoff import BackoffRules, SiteState
from txcolombe.shaping.policy import DEFAULT_LIMITS, Limits, Policy
from txcolombe.shaping.shaper import Lease, LeaseExhausted, LeaseReleased, Shaper
from txcolombe.shaping.sites import SiteNamer, SiteResolver
from txcolombe.shaping.store import MemoryStore, Store
from txcolombe.shaping.throttle import Rate, RateError

__all__ = [
    "DEFAULT_LIMITS",
    "BackoffRules",
    "Lease",
    "LeaseExhausted",
    "LeaseReleased",
    "Limits",
    "MemoryStore",
    "Policy",
    "Rate",
    "RateError",
    "Shaper",
    "SiteNamer",
    "SiteResolver",
    "SiteState",
    "Store",
]
