"""The message body as DATA sends it: CRLF lines, dot-stuffed, bounded (RFC 5321 §4.5.2).

:class:`DataEncoder` is fed the body in chunks of any size and returns the
bytes to send. It keeps just enough state to be right across chunk
boundaries: whether the next byte starts a line, a CR that may be followed
by LF at the start of the next chunk, and the length of the current line.

Work is done on whole chunks with C-level bytes methods, never per line in
Python and without splitting a chunk into lines: two replaces and a compare
find a stray CR or LF (then replaces normalise), one ``rfind`` per up to
``max_line + 2`` octets bounds the lines, and one split and join at
``CRLF.`` dot-stuffs (skipped for BDAT, whose chunks are not stuffed).
"""

from __future__ import annotations

from txcolombe.errors import EightBitUnsupported, InvalidBody, Step

#: RFC 5321 §4.5.3.1.6: 1000 octets including CRLF.
MAX_LINE = 998

_CR, _LF, _DOT = 13, 10, 46


def _normalised(chunk: bytes) -> bytes:
    """``chunk`` with every line break as CRLF: a CRLF, a lone CR and a lone LF
    (read left to right, as ``\\r\\n|\\r|\\n`` would) each become CRLF.

    A chunk without CR (a Unix file's) takes one replace. Otherwise the chunk
    is right exactly when a CR put before each LF gives the same bytes as a CR
    put beside each CR: two single-octet replaces (memchr and memcpy in C)
    and a compare, cheaper than counting CRLFs. (Equal means the CRs inserted
    before the LFs can be slid onto those beside the CRs, which needs each CR
    alone and right before an LF, and each LF right after a CR.) A mix of
    line ends then takes three replaces.
    """
    if b"\r" not in chunk:
        return chunk.replace(b"\n", b"\r\n")
    if chunk.replace(b"\n", b"\r\n") == chunk.replace(b"\r", b"\r\r"):
        return chunk
    return chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


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
            if chunk[0] == _LF:
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
        self._skip_lf = chunk[-1] == _CR
        chunk = _normalised(chunk)
        self._check_lines(chunk)
        if self._stuff:
            # Every LF of a normalised chunk follows a CR: "\r\n." finds each
            # line that starts with a dot, except the chunk's first line.
            parts = chunk.split(b"\r\n.")
            if len(parts) > 1:
                chunk = b"\r\n..".join(parts)
            if self._at_line_start and chunk[0] == _DOT:
                chunk = b"." + chunk
        self._at_line_start = chunk[-1] == _LF
        self.octets_out += len(chunk)
        return chunk

    def _check_lines(self, chunk: bytes) -> None:
        """Check line lengths in a normalised chunk, jumping from line end to
        line end up to ``max_line + 2`` octets at a time (one ``rfind`` each)."""
        step = self._max_line + 2  # a longest allowed line and its CRLF
        size = len(chunk)
        rfind = chunk.rfind
        # Where the current line begins, relative to the chunk (before it when
        # the line began in an earlier chunk); its LF must come before ``end``.
        begin = -self._line_length
        start = 0
        end = begin + step
        while end <= size:
            lf = rfind(b"\n", start, end)
            if lf < 0:
                raise self._too_long()
            begin = start = lf + 1
            end = begin + step
        lf = rfind(b"\n", start)
        if lf >= 0:
            begin = lf + 1
        tail = size - begin
        if tail > self._max_line:
            raise self._too_long()
        self._line_length = tail

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
