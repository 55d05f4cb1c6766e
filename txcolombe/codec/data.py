"""The message body as DATA sends it: CRLF lines, dot-stuffed, bounded (RFC 5321 §4.5.2).

:class:`DataEncoder` is fed the body in chunks of any size and returns the
bytes to send. It keeps just enough state to be right across chunk
boundaries: whether the next byte starts a line, a CR that may be followed
by LF at the start of the next chunk, and the length of the current line. Work is done on
whole chunks with bytes methods (one split, two counts, one replace when a
line starts with a dot; a regex only for stray CRs or LFs), never per line in
Python.
"""

from __future__ import annotations

import re

from txcolombe.codec.errors import EightBitUnsupported, InvalidBody, Step

#: RFC 5321 §4.5.3.1.6: 1000 octets including CRLF.
MAX_LINE = 998

_LINE_BREAK = re.compile(rb"\r\n|\r|\n")


class DataEncoder:
    """Turn body chunks into DATA bytes; :meth:`finish` returns the end marker.

    :param allow_8bit: False when the server lacks 8BITMIME: a byte above
        127 then raises :class:`EightBitUnsupported`.
    :param stuff: False for BDAT (RFC 3030), whose chunks carry the message
        as it is: lines are still normalised and bounded, but not
        dot-stuffed, and :meth:`finish` adds no end marker.
    :param raw: BINARYMIME (RFC 3030): the body goes as it is, unchecked.
    :raises InvalidBody: a line longer than :data:`MAX_LINE` octets.
    """

    def __init__(
        self,
        *,
        allow_8bit: bool = True,
        max_line: int = MAX_LINE,
        stuff: bool = True,
        raw: bool = False,
    ) -> None:
        self._raw = raw
        self._allow_8bit = allow_8bit
        self._stuff = stuff
        self._max_line = max_line
        self._at_line_start = True
        self._skip_lf = False
        self._line_length = 0
        self.octets_in = 0
        self.octets_out = 0

    def encode(self, chunk: bytes) -> bytes:
        """The DATA bytes for the next ``chunk`` of the body."""
        if self._skip_lf and chunk:
            # The previous chunk ended in CR, already sent as CRLF.
            self._skip_lf = False
            if chunk.startswith(b"\n"):
                chunk = chunk[1:]
        if not chunk:
            return b""
        self.octets_in += len(chunk)
        if self._raw:
            self.octets_out += len(chunk)
            return chunk
        if not self._allow_8bit and not chunk.isascii():
            raise EightBitUnsupported(
                "the body has 8-bit data and the server does not offer 8BITMIME",
                step=Step.BODY,
            )
        self._skip_lf = chunk.endswith(b"\r")
        lines = chunk.split(b"\r\n")
        breaks = len(lines) - 1
        if chunk.count(b"\n") != breaks or chunk.count(b"\r") != breaks:
            # A lone CR or LF somewhere: normalise (rare, so a regex is fine).
            chunk = _LINE_BREAK.sub(b"\r\n", chunk)
            lines = chunk.split(b"\r\n")
        self._check_lines(lines)
        if self._stuff:
            if b"\n." in chunk:
                chunk = chunk.replace(b"\n.", b"\n..")
            if self._at_line_start and chunk.startswith(b"."):
                chunk = b"." + chunk
        self._at_line_start = chunk.endswith(b"\n")
        self.octets_out += len(chunk)
        return chunk

    def _check_lines(self, lines: list[bytes]) -> None:
        """Check line lengths; ``lines`` is a normalised chunk split at CRLF."""
        if len(lines) == 1:
            self._line_length += len(lines[0])
        else:
            if (
                max(map(len, lines)) > self._max_line
                or self._line_length + len(lines[0]) > self._max_line
            ):
                raise self._too_long()
            self._line_length = len(lines[-1])
        if self._line_length > self._max_line:
            raise self._too_long()

    def _too_long(self) -> InvalidBody:
        return InvalidBody(
            f"the body has a line longer than {self._max_line} octets", step=Step.BODY
        )

    def finish(self) -> bytes:
        """The bytes that end DATA: a CRLF if the body lacked one, then ``.CRLF``
        (without the ``.CRLF`` for BDAT)."""
        tail = b"" if self._at_line_start or self._raw else b"\r\n"
        if self._stuff:
            tail += b".\r\n"
        self.octets_out += len(tail)
        return tail
