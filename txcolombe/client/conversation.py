"""The client's SMTP conversation as debug log events: a few per session.

The protocol gathers the trace lines (the machine's, credentials already
masked) and hands them over in batches; each batch is one event whose text
is put together only if an observer renders it. A log event costs more than
the rest of a small message's work, so there is no event per line.
"""

from __future__ import annotations

import time

from twisted.logger import Logger, LogLevel

log = Logger(namespace="txcolombe")


class Conversation:
    """Trace lines, put together only if a log observer renders the event."""

    __slots__ = ("_lines",)

    def __init__(self, lines: list[tuple[str, str]]) -> None:
        self._lines = lines

    def __str__(self) -> str:
        return " | ".join(f"{direction} {line}" for direction, line in self._lines)


def log_conversation(peer: str, lines: list[tuple[str, str]]) -> None:
    """One debug event for ``lines`` of the conversation with ``peer``.

    What ``log.debug`` would emit, without ``Logger.emit``'s check of the
    level (a walk over every ``LogLevel`` on each call, dearer than the rest
    of the event): the level is known to be good.
    """
    log.observer(
        {
            "peer": peer,
            "conversation": Conversation(lines),
            "log_logger": log,
            "log_level": LogLevel.debug,
            "log_namespace": log.namespace,
            "log_source": log.source,
            "log_format": "{peer} {conversation}",
            "log_time": time.time(),
        }
    )
