"""The DATA encoder against the reference it replaced: the same bytes, the same errors.

:class:`ReferenceEncoder` is the encoder as it was before it stopped
splitting chunks into lines (kept here, in the test only): it split each
chunk at CRLF, measured every line and dot-stuffed with one replace. The
encoder in :mod:`txcolombe.codec.data` must produce exactly its output,
chunk by chunk, for any body, any chunking and any options, and raise the
same exception at the same chunk.
"""

from __future__ import annotations

import re
from unittest import mock

from hypothesis import example, given, settings
from hypothesis import strategies as st

from txcolombe.codec import data
from txcolombe.codec.data import MAX_LINE, DataEncoder
from txcolombe.codec.errors import EightBitUnsupported, InvalidBody, Step

_LINE_BREAK = re.compile(rb"\r\n|\r|\n")


class ReferenceEncoder:
    """The previous DataEncoder, verbatim in behaviour: a split per chunk."""

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
        if self._skip_lf and chunk:
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
            raise EightBitUnsupported("8-bit", step=Step.BODY)
        self._skip_lf = chunk.endswith(b"\r")
        lines = chunk.split(b"\r\n")
        breaks = len(lines) - 1
        if chunk.count(b"\n") != breaks or chunk.count(b"\r") != breaks:
            chunk = _LINE_BREAK.sub(b"\r\n", chunk)
            lines = chunk.split(b"\r\n")
        if len(lines) == 1:
            self._line_length += len(lines[0])
        else:
            if (
                max(map(len, lines)) > self._max_line
                or self._line_length + len(lines[0]) > self._max_line
            ):
                raise InvalidBody("too long", step=Step.BODY)
            self._line_length = len(lines[-1])
        if self._line_length > self._max_line:
            raise InvalidBody("too long", step=Step.BODY)
        if self._stuff:
            if b"\n." in chunk:
                chunk = chunk.replace(b"\n.", b"\n..")
            if self._at_line_start and chunk.startswith(b"."):
                chunk = b"." + chunk
        self._at_line_start = chunk.endswith(b"\n")
        self.octets_out += len(chunk)
        return chunk

    def finish(self) -> bytes:
        tail = b"" if self._at_line_start or self._raw else b"\r\n"
        if self._stuff:
            tail += b".\r\n"
        self.octets_out += len(tail)
        return tail


Step_ = bytes | type[Exception]


def run(encoder: DataEncoder | ReferenceEncoder, chunks: list[bytes]) -> list[Step_]:
    """Each chunk's output, then the end marker and the counters; stops at the
    first exception, recorded by its type."""
    out: list[Step_] = []
    for chunk in chunks:
        try:
            out.append(encoder.encode(chunk))
        except (InvalidBody, EightBitUnsupported) as error:
            out.append(type(error))
            return out
    out.append(encoder.finish())
    out.append(b"%d:%d" % (encoder.octets_in, encoder.octets_out))
    return out


pieces = st.one_of(
    st.sampled_from(
        [b".", b"..", b"\r", b"\n", b"\r\n", b"\r\n.", b".\r\n", b"\r\n.\r\n", b"\n.", b"\r\r"]
    ),
    st.sampled_from([b"x", b"xxxx", b"x" * 9, b"\xff", b"\x80."]),
    st.binary(max_size=12),
)
chunkings = st.lists(st.lists(pieces, max_size=8).map(b"".join), max_size=12)
options = st.fixed_dictionaries(
    {
        "allow_8bit": st.booleans(),
        "stuff": st.booleans(),
        "raw": st.booleans(),
        "max_line": st.integers(min_value=1, max_value=14),
    }
)


@settings(max_examples=3000)
@given(chunks=chunkings, kwargs=options)
@example(chunks=[b"a\r", b"\n.b\r\n"], kwargs={"max_line": 5})
@example(chunks=[b"xxxx", b"x\r", b"\n"], kwargs={"max_line": 5})
@example(chunks=[b"xxxxx", b"\r\n"], kwargs={"max_line": 5})
@example(chunks=[b"xxxxx\r"], kwargs={"max_line": 4})
@example(chunks=[b"xxxx\r", b"x"], kwargs={"max_line": 4})
@example(chunks=[b"\n"], kwargs={"max_line": 1})
@example(chunks=[b".", b".\r\n."], kwargs={})
@example(chunks=[b"\xff\r\n"], kwargs={"allow_8bit": False})
@example(chunks=[b"a\n\rb", b"\rx\n", b"\r\r\n\n"], kwargs={})
@example(chunks=[b"\r\n\r", b"\r\n", b"\n\n.x"], kwargs={})
def test_same_output_as_the_reference(chunks: list[bytes], kwargs: dict[str, object]) -> None:
    expected = run(ReferenceEncoder(**kwargs), chunks)  # type: ignore[arg-type]
    assert run(DataEncoder(**kwargs), chunks) == expected  # type: ignore[arg-type]


long_lines = st.lists(
    st.one_of(
        st.integers(min_value=0, max_value=2 * MAX_LINE).map(lambda n: b"y" * n),
        st.sampled_from([b"\r\n", b"\r", b"\n", b".", b"\r\n."]),
    ),
    max_size=10,
).map(b"".join)


@settings(max_examples=500)
@given(body=long_lines, cuts=st.lists(st.integers(min_value=0, max_value=4 * MAX_LINE), max_size=6))
@example(body=b"y" * MAX_LINE + b"\r\n" + b"y" * MAX_LINE, cuts=[MAX_LINE + 1])
@example(body=b"y" * (MAX_LINE + 1), cuts=[MAX_LINE])
@example(body=b"y" * MAX_LINE + b"\r", cuts=[])
def test_same_output_at_the_real_line_limit(body: bytes, cuts: list[int]) -> None:
    points = sorted({min(c, len(body)) for c in cuts})
    chunks = [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True)]
    assert run(DataEncoder(), chunks) == run(ReferenceEncoder(), chunks)


# The encoder's work on large chunks, on small ones: ``_BLOCK`` octets of a
# chunk are checked for line ends at a time, and a chunk whose dots are mostly
# within lines is split at CRLF. instead of cut dot by dot.
dotted = st.lists(
    st.sampled_from([b".", b"..", b"x", b"xx.", b".x", b"\r\n", b"\r\n.", b"\r", b"\n", b"\r\n.."]),
    max_size=40,
).map(b"".join)


@settings(max_examples=1000)
@given(
    chunks=st.lists(dotted, max_size=6),
    block=st.integers(min_value=1, max_value=12),
    sparse=st.sampled_from([0, 2, 40]),  # 40: split after 16 dots within lines
    max_line=st.integers(min_value=1, max_value=14),
)
@example(chunks=[b"ab\r\ncd\r\nef"], block=4, sparse=0, max_line=14)
@example(chunks=[b"ab\r", b"\ncd\r\n"], block=3, sparse=0, max_line=14)
@example(chunks=[b"a", b".b\r\n.c\r\n"], block=12, sparse=2, max_line=14)  # a dot within a line
@example(chunks=[b"a\r\n", b".b\r\n.c\r\n"], block=12, sparse=2, max_line=14)
@example(chunks=[b"x." * 17 + b"\r\n.x"], block=12, sparse=40, max_line=99)
@example(chunks=[b"\r\n.", b"." + b"x." * 17 + b"\r\n.x"], block=12, sparse=40, max_line=99)
def test_same_output_in_small_blocks(
    chunks: list[bytes], block: int, sparse: int, max_line: int
) -> None:
    with mock.patch.object(data, "_BLOCK", block), mock.patch.object(data, "_SPARSE", sparse):
        ours = run(DataEncoder(max_line=max_line), chunks)
    assert ours == run(ReferenceEncoder(max_line=max_line), chunks)
