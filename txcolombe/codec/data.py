"""The message body as DATA sends it: CRLF lines, dot-stuffed, bounded (RFC 5321 §4.5.2).

:class:`DataEncoder` (the client's) is fed the body in chunks of any size and
returns the bytes to send. It keeps just enough state to be right across
chunk boundaries: whether the next byte starts a line, a CR that may be
followed by LF at the start of the next chunk, and the length of the current
line. Work is done on whole chunks with C-level bytes methods, never per line
in Python and without splitting a chunk into lines: two single-octet replaces
and a compare per block of the chunk find a stray CR or LF (then replaces
normalise), one ``rfind`` per up to ``max_line + 2`` octets bounds the lines,
and dot-stuffing looks at each dot (``find``, a memchr) and doubles those
that start a line (skipped for BDAT, whose chunks are not stuffed). Copies
are kept small or few: a chunk-sized copy is in pages that malloc hands out
fresh, and their faults cost more than the work itself.

:class:`DataDecoder` (the server's: the relay's intake and the test server
run the same one) reads those bytes back, or BDAT's chunks (RFC 3030), and
checks them.
"""

from __future__ import annotations

from collections.abc import Callable

from txcolombe.codec.errors import EightBitUnsupported, InvalidBody, Step
from txcolombe.codec.reply import Reply

#: RFC 5321 §4.5.3.1.6: 1000 octets including CRLF.
MAX_LINE = 998

_CR, _LF, _DOT = 13, 10, 46


#: Octets of a chunk checked for line ends at a time: the checks make copies,
#: and copies this small reuse the same memory, where a copy of a whole chunk
#: is in fresh pages (the kernel's page faults would cost more than the check).
_BLOCK = 64 * 1024

#: Stuffing stops looking for line-start dots one by one and splits the chunk
#: at ``CRLF.`` when more than ``16 + position >> _SPARSE`` of the dots seen
#: so far were within lines: a body dense in dots (prose) is then split.
_SPARSE = 10


def _crlf_only(chunk: bytes) -> bool:
    """True if every CR in ``chunk`` is followed by LF and every LF follows a CR.

    Block by block, cut after an LF: the block is right exactly when deleting
    its CRs, then putting one before each LF, gives it back. These are
    single-octet replaces (memchr and memcpy in C), cheaper than counting
    CRLFs. False is safe, merely slower: a block without an LF (a line
    longer than a block) counts as wrong and the caller normalises.
    """
    size = len(chunk)
    rfind = chunk.rfind
    start = 0
    while start < size:
        end = start + _BLOCK
        if end < size:
            end = rfind(b"\n", start, end) + 1
            if end <= start:
                return False
        block = chunk[start:end]
        if block.replace(b"\r", b"").replace(b"\n", b"\r\n") != block:
            return False
        start = end
    return True


def _normalised(chunk: bytes) -> bytes:
    """``chunk`` with every line break as CRLF: a CRLF, a lone CR and a lone LF
    (read left to right, as ``\\r\\n|\\r|\\n`` would) each become CRLF.

    A chunk without CR (a Unix file's) takes one replace, a chunk of CRLF
    lines (the usual one) none. A mix of line ends takes three replaces.
    """
    if b"\r" not in chunk:
        return chunk.replace(b"\n", b"\r\n")
    if _crlf_only(chunk):
        return chunk
    return chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


def _stuffed(chunk: bytes, at_line_start: bool) -> bytes:
    """``chunk`` (normalised) with a dot added before each line's leading dot.

    Dots are few in most bodies (none in base64), and ``find(b".")`` is a
    memchr: each dot is looked at, and those that start a line are doubled,
    by one replace of every dot if no other dot was seen, else by cutting
    the chunk before them (memoryviews, no copy) and joining the pieces with
    a dot. Where dots are dense within lines (prose), one split and join at
    ``CRLF.`` is cheaper, and is done instead.
    """
    leading = at_line_start and chunk[0] == _DOT
    find = chunk.find
    dot = find(b".", 1)
    if dot < 0:
        return b"." + chunk if leading else chunk
    cuts = [0] if leading else []  # where a dot goes in
    misses = 0
    while dot >= 0:
        if chunk[dot - 1] == _LF:
            cuts.append(dot)
        else:
            misses += 1
            if misses > 16 + (dot >> _SPARSE):
                stuffed = b"\r\n..".join(chunk.split(b"\r\n."))
                return b"." + stuffed if leading else stuffed
        dot = find(b".", dot + 1)
    if not cuts:
        return chunk
    if not misses and (leading or chunk[0] != _DOT):
        return chunk.replace(b".", b"..")  # every dot starts a line
    view = memoryview(chunk)
    return b".".join([view[a:b] for a, b in zip([0, *cuts], [*cuts, None], strict=True)])


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
            chunk = _stuffed(chunk, self._at_line_start)
        self._at_line_start = chunk[-1] == _LF
        self.octets_out += len(chunk)
        return chunk

    def _check_lines(self, chunk: bytes) -> None:
        """Check line lengths in a normalised chunk, jumping from line end to
        line end up to ``max_line + 2`` octets at a time (one ``rfind`` each)."""
        step = self._max_line + 2  # a longest allowed line and its CRLF
        size = len(chunk)
        rfind = chunk.rfind
        # Where the current line begins (after the LF found last; 0 when it
        # began in an earlier chunk); its LF must come before ``end``.
        start = 0
        end = step - self._line_length
        while end <= size:
            start = rfind(b"\n", start, end) + 1
            if not start:
                raise self._too_long()
            end = start + step
        begin = rfind(b"\n", start) + 1 or start or -self._line_length
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


_BARE_LF = Reply.of(550, "5.5.2 Message contains bare LF (RFC 5321 §2.3.8)")
_BARE_CR = Reply.of(550, "5.5.2 Message contains bare CR (RFC 5321 §2.3.8)")
_LONG_LINE = Reply.of(550, "5.5.6 Message has a line longer than 998 octets")


class DataDecoder:
    """The message back out of DATA's bytes, or out of BDAT's chunks: checked.

    The body is handled a run of complete lines at a time, with bytes
    methods (find, count, replace) rather than line by line: the checks are
    the same, their cost is C's. Only the unfinished last line is buffered,
    and at most ``MAX_LINE + 2`` octets of it.

    :param deliver: called with each run of decoded body octets (whole lines
        but for an overlong line, or the last line of a BDAT body).
    :param refused: called once, when :attr:`problem` is first set.
    :param stuffed: DATA: the lines are dot-stuffed and end at ``CRLF.CRLF``
        (:meth:`read`); else BDAT's chunks, taken as they are (:meth:`write`).
    :param lenient: take bare CRs and LFs and lines of any length (and count
        no ``Received:`` fields): a test server records what it gets.
    :param raw: BINARYMIME: octets, not lines; nothing is checked.

    :ivar problem: the refusal of a body not fit to pass on (a bare CR or LF,
        SMTP smuggling; a line over 998 octets), or the one given to
        :meth:`refuse`; nothing more is delivered once it is set.
    :ivar hops: the ``Received:`` fields of the header section.
    """

    def __init__(
        self,
        deliver: Callable[[bytes], None],
        refused: Callable[[], None],
        *,
        stuffed: bool = True,
        lenient: bool = False,
        raw: bool = False,
    ) -> None:
        self._deliver = deliver
        self._refused = refused
        self._stuffed = stuffed
        self._check = not (lenient or raw)
        self._raw = raw
        self.problem: Reply | None = None
        self.hops = 0
        self._in_headers = True
        self._long_line = False
        self._after_crlf = True
        self._tail = bytearray()

    def refuse(self, reply: Reply) -> None:
        """Refuse the message (the first refusal stands); deliver nothing more."""
        if self.problem is None:
            self.problem = reply
            self._refused()

    def read(self, buf: bytearray) -> bool:
        """DATA: consume what ``buf`` holds of the body; True once the final dot is read."""
        at_line_start = self._after_crlf and not self._long_line
        if at_line_start and buf[:3] == b".\r\n":
            end = 0
        else:
            found = buf.find(b"\r\n.\r\n")
            end = found + 2 if found >= 0 else -1
        if end >= 0:
            if end:
                self._segment(bytes(buf[:end]), at_line_start)
            del buf[: end + 3]
            return True
        last = buf.rfind(b"\n")
        if last >= 0:
            self._segment(bytes(buf[: last + 1]), at_line_start)
            del buf[: last + 1]
        self._bound(buf, at_line_start)
        return False

    def write(self, chunk: bytes) -> None:
        """BDAT: the next octets of the body."""
        if self.problem is not None:
            return
        if self._raw:
            self._deliver(chunk)  # RFC 3030 §3: octets, not lines
            return
        tail = self._tail
        tail += chunk
        last = tail.rfind(b"\n")
        if last >= 0:
            self._segment(bytes(tail[: last + 1]), self._after_crlf)
            del tail[: last + 1]
        self._bound(tail, self._after_crlf)

    def close(self) -> None:
        """BDAT: the body is complete; its last line need not end in CRLF."""
        if self._tail:
            tail = bytes(self._tail)
            self._tail.clear()
            self._segment(tail, self._after_crlf)

    def _bound(self, buf: bytearray, at_line_start: bool) -> None:
        """An unfinished line over the limit: refused, or (not checking) taken as it is."""
        if len(buf) <= MAX_LINE + 2:
            return
        cut = len(buf) - (1 if buf.endswith(b"\r") else 0)  # a final CR may begin the CRLF
        if self._check:
            self.refuse(_LONG_LINE)
            self._long_line = True
            self._after_crlf = False
        else:
            self._segment(bytes(buf[:cut]), at_line_start)
        del buf[:cut]

    def _segment(self, seg: bytes, at_line_start: bool) -> None:
        """Body lines (each ending in LF, but for an overlong or a last BDAT
        line), still dot-stuffed for DATA.

        ``at_line_start`` is False when ``seg`` begins with the rest of an
        overlong line, already refused (or taken).
        """
        self._long_line = False
        self._after_crlf = seg.endswith(b"\r\n")
        if self.problem is not None:
            return  # refused already: only looking for the end
        if self._check:
            crlf = seg.count(b"\r\n")
            if seg.count(b"\n") != crlf:
                self.refuse(_BARE_LF)
                return
            if seg.count(b"\r") != crlf:
                self.refuse(_BARE_CR)
                return
        if self._stuffed:
            if at_line_start and seg[:1] == b".":
                seg = seg[1:]
            if b"\n." in seg:
                seg = seg.replace(b"\r\n.", b"\r\n")
        if self._check:
            if len(seg) > MAX_LINE + 2 and max(map(len, seg.split(b"\r\n"))) > MAX_LINE:
                self.refuse(_LONG_LINE)
                return
            if self._in_headers:
                self._headers(seg, at_line_start)
        self._deliver(seg)

    def _headers(self, seg: bytes, at_line_start: bool) -> None:
        """Count the Received fields of the header section; note where it ends."""
        if at_line_start and seg.startswith(b"\r\n"):
            self._in_headers = False
            return
        blank = seg.find(b"\r\n\r\n")
        if blank >= 0:
            self._in_headers = False
            seg = seg[: blank + 2]
        lower = seg.lower()
        self.hops += lower.count(b"\nreceived:")
        if at_line_start and lower.startswith(b"received:"):
            self.hops += 1
