"""SMTP replies: the value type and a bounded, incremental parser (RFC 5321 §4.2).

Bytes in, :class:`Reply` values out; no I/O. The parser holds at most one
reply's worth of bytes: a line longer than ``max_line`` or a reply of more
than ``max_lines`` lines is a :class:`~txcolombe.codec.errors.ReplyTooLong`, so a
hostile server cannot make the client grow without bound. Text that is not
UTF-8 is kept, with the undecodable bytes replaced.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from txcolombe.codec.errors import MalformedReply, ReplyTooLong

_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?:\s+|$)")
_QUEUE_ID = re.compile(
    r"(?:queued as|queue id|\bid=)\s*<?([A-Za-z0-9._@-]+)>?",
    re.IGNORECASE,
)

#: RFC 5321 §4.5.3.1.5 says 512 octets; servers exceed it, so allow more.
MAX_LINE = 4096
MAX_LINES = 512

#: Single-line replies already parsed, by their line: a server says the same
#: few ("250 2.1.0 Ok", "354 End data with ...") over and over. Bounded: it
#: starts afresh when full, so unique lines (queue ids) cannot grow it.
_SEEN: dict[bytes, Reply] = {}
_SEEN_MAX = 256


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply: a three-digit code and one or more lines of text.

    :ivar code: the reply code, 200-599.
    :ivar lines: each line's text after the code and separator, decoded.
    :ivar enhanced_status: the RFC 3463 code of the first line, if present
        and consistent with the reply's class.
    """

    code: int
    lines: tuple[str, ...]
    enhanced_status: tuple[int, int, int] | None = None

    @classmethod
    def of(cls, code: int, *lines: str) -> Reply:
        """Build a reply from its code and lines, finding the enhanced status."""
        texts = lines or ("",)
        return cls(code, tuple(texts), _enhanced_status(code, texts[0]))

    @property
    def positive(self) -> bool:
        """2xx or 3xx."""
        return self.code < 400

    @property
    def temporary(self) -> bool:
        """4xx."""
        return 400 <= self.code < 500

    @property
    def text(self) -> str:
        """All lines joined by newlines, each without its enhanced status."""
        return "\n".join(_strip_enhanced(line) for line in self.lines)

    @property
    def queue_id(self) -> str | None:
        """The server's queue id, when its text names one (``queued as X``)."""
        match = _QUEUE_ID.search(self.text)
        return match.group(1) if match else None

    def __str__(self) -> str:
        if len(self.lines) == 1:  # most replies: no generator to run
            return f"{self.code} {self.lines[0]}".rstrip()
        return " / ".join(f"{self.code} {line}".rstrip() for line in self.lines)

    def to_bytes(self) -> bytes:
        """The wire form (used by servers and tests)."""
        out = []
        last = len(self.lines) - 1
        for i, line in enumerate(self.lines):
            sep = " " if i == last else "-"
            out.append(f"{self.code}{sep}{line}\r\n")
        return "".join(out).encode("utf-8")


def _enhanced_status(code: int, first_line: str) -> tuple[int, int, int] | None:
    match = _ENHANCED.match(first_line)
    if match is None or int(match.group(1)) != code // 100:
        return None
    return (int(match.group(1)), int(match.group(2)), int(match.group(3)))


def _strip_enhanced(line: str) -> str:
    match = _ENHANCED.match(line)
    return line[match.end() :] if match else line


class ReplyParser:
    """Incremental parser: :meth:`feed` bytes, then :meth:`next_reply` until None."""

    def __init__(self, max_line: int = MAX_LINE, max_lines: int = MAX_LINES) -> None:
        self._buffer = bytearray()
        self._max_line = max_line
        self._max_lines = max_lines
        self._code: int | None = None
        self._lines: list[str] = []
        self._scan_from = 0

    def feed(self, data: bytes) -> None:
        """Add received bytes."""
        self._buffer += data

    def discard(self) -> int:
        """Drop every byte not yet parsed (STARTTLS injection defence); return how many.

        The lines of a multi-line reply not yet complete are dropped too.
        """
        dropped = len(self._buffer)
        del self._buffer[:]
        self._scan_from = 0
        self._code = None
        self._lines = []
        return dropped

    @property
    def pending(self) -> bool:
        """True when a partial reply is buffered."""
        return bool(self._buffer) or self._code is not None

    def next_reply(self) -> Reply | None:
        """The next complete reply, or None if more bytes are needed.

        :raises MalformedReply: the bytes are not an SMTP reply.
        :raises ReplyTooLong: a line or a reply exceeds the bounds.
        """
        while True:
            end = self._buffer.find(b"\n", self._scan_from)
            if end < 0:
                # A final CR may be the start of the line's CRLF: not counted.
                partial = len(self._buffer) - (1 if self._buffer.endswith(b"\r") else 0)
                if partial > self._max_line:
                    raise ReplyTooLong(f"reply line longer than {self._max_line} octets")
                self._scan_from = len(self._buffer)
                return None
            raw = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            self._scan_from = 0
            if raw.endswith(b"\r"):
                raw = raw[:-1]
            if len(raw) > self._max_line:
                raise ReplyTooLong(f"reply line longer than {self._max_line} octets")
            first = self._code is None  # the first line of a reply
            if first and (seen := _SEEN.get(raw)) is not None:
                return seen
            reply = self._line(raw)
            if reply is not None:
                if first:  # a single-line reply: worth keeping
                    if len(_SEEN) >= _SEEN_MAX:
                        _SEEN.clear()
                    _SEEN[raw] = reply
                return reply

    def _line(self, raw: bytes) -> Reply | None:
        if (
            len(raw) < 3
            or not raw[:3].isdigit()
            or raw[0] not in b"2345"
            or (len(raw) > 3 and raw[3] not in b" -")
        ):
            shown = raw[:80].decode("utf-8", "replace")
            raise MalformedReply(f"malformed reply line: {shown!r}")
        code = int(raw[:3])
        if self._code is not None and code != self._code:
            raise MalformedReply(f"multi-line reply changed code from {self._code} to {code}")
        self._code = code
        self._lines.append(raw[4:].decode("utf-8", "replace"))
        if len(self._lines) > self._max_lines:
            raise ReplyTooLong(f"multi-line reply longer than {self._max_lines} lines")
        if len(raw) > 3 and raw[3:4] == b"-":
            return None
        lines = tuple(self._lines)
        self._code = None
        self._lines = []
        return Reply(code, lines, _enhanced_status(code, lines[0]))
