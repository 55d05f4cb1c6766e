"""Traffic shaping: limits per destination site, throttles and back-off.

See ``docs/shaping.md``. The rules (:mod:`.throttle`, :mod:`.sites`,
:mod:`.policy`, :mod:`.backoff`) are sans-I/O; :class:`Shaper` waits on a
clock, keeping its counters in a :class:`MemoryStore` or, shared by several
relays, a :class:`~txcolombe.delivery.shaping.redisstore.RedisStore`.
"""

from txcolombe.delivery.shaping.backoff import BackoffRules, SiteState
from txcolombe.delivery.shaping.policy import DEFAULT_LIMITS, Limits, ShapingPolicy
from txcolombe.delivery.shaping.shaper import Lease, LeaseExhausted, LeaseReleased, Shaper
from txcolombe.delivery.shaping.sites import SiteNamer, SiteResolver
from txcolombe.delivery.shaping.store import MemoryStore, Store
from txcolombe.delivery.shaping.throttle import Rate, RateError

__all__ = [
    "DEFAULT_LIMITS",
    "BackoffRules",
    "Lease",
    "LeaseExhausted",
    "LeaseReleased",
    "Limits",
    "MemoryStore",
    "Rate",
    "RateError",
    "Shaper",
    "ShapingPolicy",
    "SiteNamer",
    "SiteResolver",
    "SiteState",
    "Store",
]
