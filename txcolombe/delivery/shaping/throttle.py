"""GCRA throttles: rates such as ``10/s``, ``1000/h`` or ``50/min``.

A :class:`Rate` is parsed from text and turned into an emission interval
(the period divided by the count). :func:`gcra` is the Generic Cell Rate
Algorithm's step, sans-I/O: given the stored *theoretical arrival time*
(TAT) and the current time it says whether a token is granted now, the new
TAT, and otherwise how long to wait. The throttles are strict (no burst):
``10/s`` grants one token every 100 ms, so in no window of ``t`` seconds
are more than ``1 + 10 t`` tokens granted, which is what a receiver that
counts per second sees as at most 10.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: Seconds per unit, by every spelling accepted.
UNITS = {
    "s": 1.0, "sec": 1.0, "second": 1.0, "seconds": 1.0,
    "m": 60.0, "min": 60.0, "minute": 60.0, "minutes": 60.0,
    "h": 3600.0, "hr": 3600.0, "hour": 3600.0, "hours": 3600.0,
    "d": 86400.0, "day": 86400.0, "days": 86400.0,
}  # fmt: skip

_RATE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)?\s*([a-z]+)\s*", re.IGNORECASE)

#: Times closer than this are equal: timers fire at float sums of delays.
EPSILON = 1e-6


class RateError(ValueError):
    """A rate's text is not ``COUNT/UNIT`` (``10/s``, ``1000/h``, ``50/min``, ``5/10s``)."""


@dataclass(frozen=True)
class Rate:
    """``count`` tokens per ``period`` seconds."""

    count: float
    period: float

    @classmethod
    def parse(cls, text: str) -> Rate:
        """Read ``COUNT/[N]UNIT``; a :class:`RateError` says what is wrong."""
        if not isinstance(text, str):
            raise RateError(f"rate {text!r} is not a string like '10/s'")
        match = _RATE.fullmatch(text)
        if match is None:
            raise RateError(f"rate {text!r}: expected COUNT/UNIT, e.g. 10/s, 1000/h, 50/min")
        count, multiple, unit = match.groups()
        seconds = UNITS.get(unit.lower())
        if seconds is None:
            units = ", ".join(("s", "min", "h", "d"))
            raise RateError(f"rate {text!r}: unknown unit {unit!r} (one of {units})")
        period = seconds * float(multiple or 1)
        if float(count) <= 0 or period <= 0:
            raise RateError(f"rate {text!r}: count and period must be positive")
        return cls(float(count), period)

    @property
    def interval(self) -> float:
        """Seconds between two tokens."""
        return self.period / self.count

    def __str__(self) -> str:
        count = f"{self.count:g}"
        for unit, seconds in (("d", 86400.0), ("h", 3600.0), ("min", 60.0)):
            if self.period == seconds:
                return f"{count}/{unit}"
        return f"{count}/s" if self.period == 1.0 else f"{count}/{self.period:g}s"


@dataclass(frozen=True)
class Decision:
    """One GCRA step: ``wait`` is 0 when the token was granted, and ``tat`` is
    then the TAT to store; otherwise the stored TAT stays."""

    wait: float
    tat: float

    @property
    def granted(self) -> bool:
        return self.wait == 0.0


def gcra(tat: float | None, now: float, interval: float) -> Decision:
    """Grant a token at ``now`` if the TAT has been reached (no TAT: never used)."""
    if tat is None or tat < now:
        tat = now
    if tat - now > EPSILON:
        return Decision(tat - now, tat)
    return Decision(0.0, tat + interval)
