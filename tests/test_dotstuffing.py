"""The DATA encoder: CRLF lines, dot-stuffed, bounded, right across chunk boundaries."""

from __future__ import annotations

import re

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from txcolombe.codec.data import MAX_LINE, DataEncoder
from txcolombe.codec.errors import EightBitUnsupported, InvalidBody, Step, UsageError

# -- helpers ---------------------------------------------------------------------------


def normalise(body: bytes) -> bytes:
    """What the body must become: CRLF lines, a final CRLF unless empty."""
    out = re.sub(rb"\r\n|\r|\n", b"\r\n", body)
    if out and not out.endswith(b"\r\n"):
        out += b"\r\n"
    return out


def server_decode(wire: bytes) -> bytes:
    """What an SMTP server makes of DATA bytes (RFC 5321 §4.5.2), strictly."""
    assert wire.endswith(b"\r\n"), "DATA must end with CRLF"
    lines = wire[:-2].split(b"\r\n")
    body: list[bytes] = []
    for index, line in enumerate(lines):
        assert b"\r" not in line, f"bare CR in line {line!r}"
        assert b"\n" not in line, f"bare LF in line {line!r}"
        if line == b".":
            assert index == len(lines) - 1, "data after the end-of-data marker"
            return b"".join(body)
        if line.startswith(b"."):
            line = line[1:]
        body.append(line + b"\r\n")
    raise AssertionError("no end-of-data marker")


def encode(chunks: list[bytes], **kwargs: object) -> bytes:
    encoder = DataEncoder(**kwargs)  # type: ignore[arg-type]
    return b"".join(encoder.encode(c) for c in chunks) + encoder.finish()


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(max(c, 0), len(data)) for c in cuts})
    chunks = []
    start = 0
    for point in points:
        chunks.append(data[start:point])
        start = point
    chunks.append(data[start:])
    return chunks


def longest_line(body: bytes) -> int:
    return max((len(line) for line in normalise(body).split(b"\r\n")), default=0)


# -- the property ---------------------------------------------------------------------

body_bytes = st.lists(
    st.one_of(
        st.sampled_from([b".", b"\r", b"\n", b"\r\n", b"..", b".\r\n", b"\r\n.\r\n", b"a", b"b"]),
        st.binary(max_size=8),
    ),
    max_size=60,
).map(b"".join)


@settings(max_examples=500)
@given(body=body_bytes, cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12))
@example(body=b".", cuts=[])
@example(body=b"\r\n.\r\n", cuts=[1, 2, 3])
@example(body=b"a\r", cuts=[2])
@example(body=b"a\r\n.b", cuts=[2, 3])
@example(body=b"\r\r\n\n", cuts=[1])
def test_encode_then_decode_is_normalisation(body: bytes, cuts: list[int]) -> None:
    wire = encode(split_at(body, cuts))
    assert server_decode(wire) == normalise(body)


@settings(max_examples=300)
@given(body=body_bytes, cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12))
def test_chunking_does_not_change_the_output(body: bytes, cuts: list[int]) -> None:
    assert encode(split_at(body, cuts)) == encode([body])


@settings(max_examples=500)
@given(
    body=st.lists(
        st.sampled_from([b"x", b"xxxx", b".", b"\r", b"\n", b"\r\n", b"\xff"]), max_size=40
    ).map(b"".join),
    cuts=st.lists(st.integers(min_value=0, max_value=160), max_size=10),
    max_line=st.integers(min_value=1, max_value=12),
)
@example(body=b"x" * 5 + b"\r\n", cuts=[3], max_line=4)
@example(body=b"xx\rxxxxx", cuts=[3], max_line=4)
def test_line_limit_across_chunks(body: bytes, cuts: list[int], max_line: int) -> None:
    encoder = DataEncoder(max_line=max_line)
    if longest_line(body) > max_line:
        with pytest.raises(InvalidBody):
            for chunk in split_at(body, cuts):
                encoder.encode(chunk)
    else:
        out = b"".join(encoder.encode(c) for c in split_at(body, cuts)) + encoder.finish()
        assert server_decode(out) == normalise(body)


# -- explicit cases -----------------------------------------------------------------------


def test_empty_body() -> None:
    encoder = DataEncoder()
    assert encoder.finish() == b".\r\n"


def test_empty_chunks() -> None:
    encoder = DataEncoder()
    assert encoder.encode(b"") == b""
    assert encoder.encode(b"") == b""
    assert encoder.finish() == b".\r\n"


def test_dot_on_first_line() -> None:
    assert encode([b".hidden\r\nnext\r\n"]) == b"..hidden\r\nnext\r\n.\r\n"


def test_line_of_just_a_dot() -> None:
    assert encode([b"a\r\n.\r\nb\r\n"]) == b"a\r\n..\r\nb\r\n.\r\n"
    assert encode([b"."]) == b"..\r\n.\r\n"
    assert encode([b".\r\n"]) == b"..\r\n.\r\n"


def test_dot_in_the_middle_of_a_line_is_untouched() -> None:
    assert encode([b"a.b\r\nc.\r\n"]) == b"a.b\r\nc.\r\n.\r\n"


def test_dot_that_continues_a_line_from_the_last_chunk_is_untouched() -> None:
    assert encode([b"a", b".b\r\n.c\r\n"]) == b"a.b\r\n..c\r\n.\r\n"
    assert encode([b"a\r\n", b".b\r\n.c\r\n"]) == b"a\r\n..b\r\n..c\r\n.\r\n"


def test_dots_dense_within_lines() -> None:
    prose = b"One. Two. Three... e.g. this.\r\n.Dot line.\r\n" * 2000
    assert encode([prose]) == prose.replace(b"\r\n.", b"\r\n..") + b".\r\n"


def test_final_crlf_added() -> None:
    assert encode([b"no newline"]) == b"no newline\r\n.\r\n"


def test_line_endings_normalised() -> None:
    assert encode([b"a\nb\rc\r\nd"]) == b"a\r\nb\r\nc\r\nd\r\n.\r\n"
    assert encode([b"\n\n"]) == b"\r\n\r\n.\r\n"
    assert encode([b"\r\r"]) == b"\r\n\r\n.\r\n"
    assert encode([b"\n\r"]) == b"\r\n\r\n.\r\n"


CHUNK = 16 * 1024


@pytest.mark.parametrize(
    ("first_end", "second_start"),
    [
        (b"\r\n", b"."),
        (b"\r\n", b".\r\n"),
        (b"\r\n", b"..x"),
        (b"\n", b"."),
        (b"\r", b"\n."),
        (b"\r", b"."),
        (b"\r\n.", b"x"),
        (b"\r\n.", b"\r\n"),
    ],
)
def test_dots_at_a_16k_chunk_boundary(first_end: bytes, second_start: bytes) -> None:
    filler = (b"y" * 70 + b"\r\n") * (CHUNK // 72 + 1)
    first = filler[: CHUNK - len(first_end) - 10] + b"z" * 10 + first_end
    assert len(first) == CHUNK
    second = second_start + b"rest\r\n"
    wire = encode([first, second])
    assert server_decode(wire) == normalise(first + second)
    assert wire == encode([first + second])


def test_cr_at_end_of_chunk_then_lf() -> None:
    encoder = DataEncoder()
    assert encoder.encode(b"line one\r") == b"line one\r\n"
    assert encoder.encode(b"\nline two\r\n") == b"line two\r\n"
    assert encoder.finish() == b".\r\n"


def test_cr_at_end_of_chunk_then_lf_alone() -> None:
    encoder = DataEncoder()
    out = encoder.encode(b"a\r") + encoder.encode(b"\n") + encoder.encode(b"b")
    assert out + encoder.finish() == b"a\r\nb\r\n.\r\n"


def test_cr_at_end_of_chunk_then_empty_chunk_then_lf() -> None:
    encoder = DataEncoder()
    out = encoder.encode(b"a\r") + encoder.encode(b"") + encoder.encode(b"\nb")
    assert out + encoder.finish() == b"a\r\nb\r\n.\r\n"


def test_cr_at_end_of_chunk_then_cr() -> None:
    encoder = DataEncoder()
    out = encoder.encode(b"a\r") + encoder.encode(b"\rb")
    assert out + encoder.finish() == b"a\r\n\r\nb\r\n.\r\n"


def test_lf_after_cr_is_skipped_only_once() -> None:
    encoder = DataEncoder()
    out = encoder.encode(b"a\r") + encoder.encode(b"\n") + encoder.encode(b"\n")
    assert out + encoder.finish() == b"a\r\n\r\n.\r\n"


def test_998_octet_line_is_accepted() -> None:
    line = b"x" * MAX_LINE
    assert MAX_LINE == 998
    assert encode([line + b"\r\n"]) == line + b"\r\n.\r\n"
    assert encode([line]) == line + b"\r\n.\r\n"
    assert encode([b"a\r\n" + line + b"\r\nb"]) == b"a\r\n" + line + b"\r\nb\r\n.\r\n"


def test_998_octet_line_starting_with_dot_is_accepted() -> None:
    # RFC 5321 §4.5.3.1.6: the stuffed dot does not count.
    line = b"." + b"x" * (MAX_LINE - 1)
    assert encode([line + b"\r\n"]) == b"." + line + b"\r\n.\r\n"


@pytest.mark.parametrize(
    "body",
    [
        b"x" * 999,
        b"x" * 999 + b"\r\n",
        b"x" * 999 + b"\n",
        b"x" * 999 + b"\r",
        b"a\r\n" + b"x" * 999 + b"\r\nb\r\n",
        b"a\n" + b"x" * 999,
        b"a\r" + b"x" * 999 + b"\rb",
        b"x" * 5000,
    ],
)
def test_999_octet_line_is_refused(body: bytes) -> None:
    encoder = DataEncoder()
    with pytest.raises(InvalidBody) as info:
        encoder.encode(body)
    assert info.value.step is Step.BODY
    assert isinstance(info.value, UsageError)


@pytest.mark.parametrize("cut", [1, 500, 997, 998, 999])
def test_999_octet_line_spanning_chunks(cut: int) -> None:
    body = b"ok\r\n" + b"x" * 999 + b"\r\nmore\r\n"
    cut += 4
    encoder = DataEncoder()
    with pytest.raises(InvalidBody):
        encoder.encode(body[:cut])
        encoder.encode(body[cut:])


def test_long_line_spanning_many_chunks() -> None:
    encoder = DataEncoder()
    with pytest.raises(InvalidBody):
        for _ in range(1000):
            encoder.encode(b"x")


def test_998_octet_line_spanning_chunks_with_crlf_split() -> None:
    encoder = DataEncoder()
    out = encoder.encode(b"x" * 500) + encoder.encode(b"x" * 498 + b"\r")
    out += encoder.encode(b"\n" + b"y" * 998)
    assert out + encoder.finish() == b"x" * 998 + b"\r\n" + b"y" * 998 + b"\r\n.\r\n"


def test_line_length_resets_after_each_line() -> None:
    encoder = DataEncoder()
    for _ in range(10):
        encoder.encode(b"x" * 600 + b"\r\n")
    encoder.encode(b"x" * 998)
    assert encoder.finish() == b"\r\n.\r\n"


def test_eight_bit_allowed_by_default() -> None:
    assert encode(["café\r\n".encode()]) == "café\r\n.\r\n".encode()


def test_eight_bit_refused() -> None:
    encoder = DataEncoder(allow_8bit=False)
    assert encoder.encode(b"ascii first\r\n") == b"ascii first\r\n"
    with pytest.raises(EightBitUnsupported) as info:
        encoder.encode(b"caf\xe9\r\n")
    assert info.value.step is Step.BODY


def test_eight_bit_refused_in_first_chunk() -> None:
    with pytest.raises(EightBitUnsupported):
        DataEncoder(allow_8bit=False).encode(b"\x80")


def test_seven_bit_passes_when_8bit_not_allowed() -> None:
    assert encode([b"plain\r\n.dot\r\n"], allow_8bit=False) == b"plain\r\n..dot\r\n.\r\n"


def test_octet_counts() -> None:
    encoder = DataEncoder()
    encoder.encode(b".a\nb")
    encoder.finish()
    assert encoder.octets_in == 4
    assert encoder.octets_out == len(b"..a\r\nb\r\n.\r\n")
