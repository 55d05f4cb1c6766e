"""The client's configuration types: what a caller may set, apart from the code that uses it."""

from __future__ import annotations

from dataclasses import dataclass

from txcolombe.codec.step import Step


@dataclass(frozen=True)
class Timeouts:
    """Seconds to wait at each step; RFC 5321 §4.5.3.2's values by default."""

    connect: float = 30.0
    greeting: float = 300.0
    command: float = 300.0
    """EHLO, STARTTLS, AUTH, RSET."""
    mail: float = 300.0
    rcpt: float = 300.0
    data_start: float = 120.0
    data_block: float = 180.0
    """Between two writes of the body; restarts while the body flows."""
    data_end: float = 600.0
    quit: float = 10.0
    """After QUIT (or a fatal error): how long to wait for a polite close."""

    def for_step(self, step: Step) -> float:
        """The timeout for waiting at ``step``."""
        return getattr(self, _TIMEOUT_FIELDS.get(step, "command"))  # type: ignore[no-any-return]


_TIMEOUT_FIELDS = {
    Step.GREETING: "greeting",
    Step.MAIL: "mail",
    Step.RCPT: "rcpt",
    Step.DATA: "data_start",
    Step.BODY: "data_block",
    Step.DATA_END: "data_end",
    Step.QUIT: "quit",
}


DEFAULT_TIMEOUTS = Timeouts()
