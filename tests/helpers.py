"""Helpers shared by the tests: reading what a Deferred that fired synchronously gave.

In-memory tests (MemorySMTP, a Clock) fire their Deferreds during ``flush()``
or ``advance()``; these read the result there and then, instead of waiting on
a reactor.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure


def fired(d: Deferred[Any]) -> list[Any]:
    """What ``d`` fired with so far: ``[]``, or ``[result]`` / ``[Failure]``.

    The Deferred's result is consumed (a failure is not left unhandled).
    """
    box: list[Any] = []
    d.addBoth(box.append)
    return box


def result_of(d: Deferred[Any]) -> Any:
    """The result ``d`` fired with, or raise its failure; fail if it has not fired."""
    box = fired(d)
    assert box, "the Deferred has not fired"
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


def failure_of(d: Deferred[Any], kind: type[BaseException]) -> Any:
    """The exception ``d`` failed with, which must be a ``kind``; fail otherwise."""
    box = fired(d)
    assert box, "the Deferred has not fired"
    assert isinstance(box[0], Failure), f"no failure: {box[0]!r}"
    assert box[0].check(kind), box[0]
    return box[0].value
