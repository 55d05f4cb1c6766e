"""A :class:`~txcolombe.delivery.shaping.store.Store` in Redis, for several relays
that share one budget.

Every step is one Lua script run with ``EVAL`` (txredisapi sends it once,
then by its SHA1), so that the GCRA step, a slot's allocation and a
slow-down are atomic however many relays ask at once. Times are the
relays' clocks, passed in: keep them in sync (NTP), a relay whose clock is
ahead spends the others' tokens. Connection slots are kept as a sorted set
of lease ids scored by when they expire (``lease_ttl`` after their last
use), so that a relay that dies does not hold its slots for ever. Keys
expire once nothing in them matters any more.

The client is txredisapi (Twisted-native, on PyPI); a connection it made is
passed in, or :meth:`RedisStore.connect` makes one. A step that Redis does
not answer within ``timeout`` fails (txredisapi itself would wait for ever
for a server that is down).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from txcolombe.delivery.shaping.backoff import BackoffRules, SiteState
from txcolombe.delivery.shaping.throttle import EPSILON

DEFAULT_PREFIX = "txcolombe:shaping:"

# Redis turns Lua numbers into integers in replies: every time goes back
# as a string, with microseconds.
_TAKE = """
local now = tonumber(ARGV[1])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
if tat - now > tonumber(ARGV[3]) then
  return string.format('%.6f', tat - now)
end
local new = tat + tonumber(ARGV[2])
redis.call('SET', KEYS[1], string.format('%.6f', new),
           'PX', math.ceil((new - now) * 1000) + 1000)
return '0'
"""

_OPEN = """
local now = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], ARGV[3]) then
  if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
end
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[3])
redis.call('PEXPIRE', KEYS[1], math.ceil((tonumber(ARGV[4]) - now) * 1000))
return 1
"""

_REFRESH = """
if redis.call('ZADD', KEYS[1], 'XX', 'CH', ARGV[2], ARGV[1]) == 1 then
  redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3]) * 1000))
end
return 0
"""

_SLOW_DOWN = """
local now = tonumber(ARGV[1])
local old = redis.call('HMGET', KEYS[1], 'suspended_until', 'factor', 'lowered_until')
local suspended_until = tonumber(old[1]) or 0
local factor = tonumber(old[2]) or 1
local lowered_until = tonumber(old[3]) or 0
if lowered_until <= now then factor = 1 end
if suspended_until <= now then
  suspended_until = 0
  factor = math.max(tonumber(ARGV[5]), factor * tonumber(ARGV[4]))
end
suspended_until = math.max(suspended_until, now + tonumber(ARGV[3]))
lowered_until = now + tonumber(ARGV[6])
local out = {string.format('%.6f', suspended_until), ARGV[2],
             string.format('%.6f', factor), string.format('%.6f', lowered_until)}
redis.call('HSET', KEYS[1], 'suspended_until', out[1], 'reason', out[2],
           'factor', out[3], 'lowered_until', out[4])
redis.call('PEXPIRE', KEYS[1],
           math.ceil((math.max(suspended_until, lowered_until) - now) * 1000) + 1000)
return out
"""

_STATE_FIELDS = ("suspended_until", "reason", "factor", "lowered_until")


def _state(values: list[Any]) -> SiteState:
    until, reason, factor, lowered = values
    if until is None:
        return SiteState()
    return SiteState(float(until), _text(reason), float(factor), float(lowered))


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class RedisStore:
    """Counters and suspensions in Redis.

    :param redis: a txredisapi connection (or pool), made with
        ``convertNumbers=False``.
    :param prefix: prepended to every key (relays sharing a budget share it).
    :param lease_ttl: seconds a connection slot lives after its last use.
    :param poll: seconds between retries for a slot (another relay's release
        is not signalled here).
    :param timeout: seconds a step may take (Redis down, say) before it fails
        with :class:`twisted.internet.defer.TimeoutError`, and the
        acquisition waiting on it with it.
    """

    def __init__(
        self,
        redis: Any,
        *,
        prefix: str = DEFAULT_PREFIX,
        lease_ttl: float = 600.0,
        poll: float = 0.5,
        timeout: float = 10.0,
        clock: IReactorTime | None = None,
    ) -> None:
        if clock is None:
            from twisted.internet import reactor

            clock = reactor
        self.clock = clock
        self.timeout = timeout
        self.redis = redis
        self.prefix = prefix
        self.lease_ttl = lease_ttl
        self.poll: float | None = poll

    @classmethod
    def connect(cls, host: str, port: int = 6379, **options: Any) -> RedisStore:
        """A store on a new connection to Redis, made in the background and
        remade whenever it drops; meanwhile every step waits (up to
        ``timeout``)."""
        import txredisapi

        redis = txredisapi.lazyConnection(
            host, port, reconnect=True, convertNumbers=False, connectTimeout=10
        )
        return cls(redis, **options)

    def disconnect(self) -> Deferred[None]:
        result: Deferred[Any] = self.redis.disconnect()
        return result.addCallback(lambda _: None)

    def _key(self, kind: str, site: str) -> str:
        return f"{self.prefix}{kind}:{site}"

    def _timed(self, step: Deferred[Any]) -> Deferred[Any]:
        return step.addTimeout(self.timeout, self.clock)

    def _eval(self, script: str, keys: list[str], args: list[Any]) -> Deferred[Any]:
        return self._timed(self.redis.eval(script, keys, [str(a) for a in args]))

    def take(self, site: str, counter: str, now: float, interval: float) -> Deferred[float]:
        key = self._key(f"tat:{counter}", site)
        return self._eval(_TAKE, [key], [repr(now), repr(interval), EPSILON]).addCallback(
            lambda wait: float(_text(wait))
        )

    def open(self, site: str, lease: str, limit: int, now: float) -> Deferred[bool]:
        args = [repr(now), limit, lease, repr(now + self.lease_ttl)]
        return self._eval(_OPEN, [self._key("slots", site)], args).addCallback(
            lambda got: int(got) == 1
        )

    def refresh(self, site: str, lease: str, now: float) -> Deferred[None]:
        args = [lease, repr(now + self.lease_ttl), self.lease_ttl]
        return self._eval(_REFRESH, [self._key("slots", site)], args).addCallback(lambda _: None)

    def close(self, site: str, lease: str) -> Deferred[None]:
        removed = self._timed(self.redis.zrem(self._key("slots", site), lease))
        return removed.addCallback(lambda _: None)

    def slow_down(
        self, site: str, now: float, reason: str, rules: BackoffRules
    ) -> Deferred[SiteState]:
        args = [
            repr(now), reason, rules.suspend, rules.rate_factor, rules.min_rate_factor,
            rules.recover,
        ]  # fmt: skip
        return self._eval(_SLOW_DOWN, [self._key("state", site)], args).addCallback(_state)

    def state(self, site: str) -> Deferred[SiteState]:
        values = self._timed(self.redis.hmget(self._key("state", site), list(_STATE_FIELDS)))
        return values.addCallback(_state)
