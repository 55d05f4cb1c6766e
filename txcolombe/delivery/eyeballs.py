"""Happy Eyeballs (RFC 8305 §5): race connection attempts to several addresses.

An exchanger with IPv6 and IPv4 addresses is not tried one address after the
other, each waiting out its connect timeout: the first attempt starts at
once, the next one :data:`CONNECTION_ATTEMPT_DELAY` later (or as soon as the
one before it fails), and the first connection made wins; the attempts still
running are cancelled.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IDelayedCall,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.python.failure import Failure
from zope.interface import implementer

CONNECTION_ATTEMPT_DELAY = 0.25
"""Seconds between the starts of two attempts (RFC 8305 §5 recommends 250 ms)."""

K = TypeVar("K")


@implementer(IStreamClientEndpoint)
class RacingEndpoint(Generic[K]):
    """Connects through the first of ``attempts`` to succeed.

    Each attempt is a key (what the caller wants to know about the winner,
    e.g. its address) and an endpoint. After :meth:`connect` succeeds,
    :attr:`winner` is the key of the attempt that won; :attr:`failures`
    holds each attempt that failed before, with its failure.
    """

    def __init__(
        self,
        attempts: Sequence[tuple[K, IStreamClientEndpoint]],
        clock: IReactorTime,
        delay: float = CONNECTION_ATTEMPT_DELAY,
    ) -> None:
        if not attempts:
            raise ValueError("no endpoint to race")
        self._attempts = list(attempts)
        self._clock = clock
        self._delay = delay
        self.winner: K | None = None
        self.failures: list[tuple[K, Failure]] = []

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        return _Race(self, factory).result


class _Race(Generic[K]):
    """One run of a :class:`RacingEndpoint`."""

    def __init__(self, endpoint: RacingEndpoint[K], factory: IProtocolFactory) -> None:
        self.endpoint = endpoint
        self.factory = factory
        self.waiting = list(endpoint._attempts)
        self.running: dict[int, Deferred[IProtocol]] = {}
        self.timer: IDelayedCall | None = None
        self.done = False
        self.result: Deferred[IProtocol] = Deferred(self._cancel)
        self._start_next()

    def _start_next(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        if not self.waiting:
            return
        key, endpoint = self.waiting.pop(0)
        attempt = endpoint.connect(self.factory)
        number = id(attempt)
        self.running[number] = attempt
        attempt.addCallbacks(
            self._won, self._lost, callbackArgs=(number, key), errbackArgs=(number, key)
        )
        if self.waiting and not self.done:
            self.timer = self.endpoint._clock.callLater(self.endpoint._delay, self._start_next)

    def _won(self, protocol: IProtocol, number: int, key: K) -> None:
        self.running.pop(number, None)
        if self.done:
            protocol.transport.abortConnection()  # type: ignore[attr-defined]
            return
        self.endpoint.winner = key
        self._stop_others()
        self.result.callback(protocol)

    def _lost(self, failure: Failure, number: int, key: K) -> None:
        self.running.pop(number, None)
        if self.done:
            return  # cancelled because another attempt won, or the race was cancelled
        self.endpoint.failures.append((key, failure))
        if self.waiting:
            self._start_next()
        elif not self.running:
            self._stop_others()
            self.result.errback(failure)

    def _stop_others(self) -> None:
        self.done = True
        self.waiting.clear()
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        for attempt in list(self.running.values()):
            attempt.cancel()
        self.running.clear()

    def _cancel(self, result: Deferred[IProtocol]) -> None:
        self._stop_others()
