"""codec.data.DataDecoder: what DataEncoder writes, read back, whatever the cuts."""

from __future__ import annotations

import itertools
import re

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from txcolombe.codec.data import DataDecoder, DataEncoder
from txcolombe.codec.errors import InvalidBody

_BODY = st.lists(
    st.one_of(
        st.sampled_from([b".", b"..", b".\r\n", b"\r", b"\n", b"\r\n", b"\r\n.\r\n", b"x" * 500]),
        st.binary(max_size=40),
    ),
    max_size=20,
).map(b"".join)
_CUTS = st.lists(st.integers(min_value=0, max_value=3000), max_size=8)


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    points = [0, *sorted({min(c, len(data)) for c in cuts}), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


def expected(body: bytes) -> bytes:
    normal = re.sub(rb"\r\n|\r|\n", b"\r\n", body)
    return normal if not normal or normal.endswith(b"\r\n") else normal + b"\r\n"


class Sink:
    def __init__(self) -> None:
        self.data = bytearray()
        self.refusals = 0

    def decoder(self, **options: bool) -> DataDecoder:
        return DataDecoder(self.data.extend, self.refused, **options)

    def refused(self) -> None:
        self.refusals += 1


@settings(max_examples=200, deadline=None)
@given(body=_BODY, body_cuts=_CUTS, wire_cuts=_CUTS, stuffed=st.booleans())
def test_the_decoder_reads_back_what_the_encoder_wrote(
    body: bytes, body_cuts: list[int], wire_cuts: list[int], stuffed: bool
) -> None:
    encoder = DataEncoder(stuff=stuffed)
    try:
        wire = b"".join(encoder.encode(p) for p in pieces(body, body_cuts)) + encoder.finish()
    except InvalidBody:  # a line over 998 octets: the client sends nothing of it
        assume(False)
    sink = Sink()
    decoder = sink.decoder(stuffed=stuffed)
    buf = bytearray()
    ended = False
    for piece in filter(None, pieces(wire, wire_cuts)):
        if stuffed:
            buf += piece
            assert not ended
            ended = decoder.read(buf)
        else:
            decoder.write(piece)
    if not stuffed:
        decoder.close()
    assert ended or not stuffed
    assert bytes(buf) == b""
    assert decoder.problem is None and sink.refusals == 0
    assert bytes(sink.data) == expected(body)


def test_what_the_decoder_refuses_and_what_lenient_takes() -> None:
    for bad, code_text in [
        (b"bare\nLF\r\n.\r\n", "bare LF"),
        (b"bare\rCR\r\n.\r\n", "bare CR"),
        (b"l" * 999 + b"\r\n.\r\n", "longer than 998"),
    ]:
        sink = Sink()
        decoder = sink.decoder()
        assert decoder.read(bytearray(bad))
        assert decoder.problem is not None and code_text in decoder.problem.lines[0]
        assert sink.refusals == 1 and bytes(sink.data) == b""
        lenient = Sink()
        assert lenient.decoder(lenient=True).read(bytearray(bad))
        assert bytes(lenient.data) == bad[:-3]


def test_received_fields_are_counted_in_the_header_section_only() -> None:
    sink = Sink()
    decoder = sink.decoder()
    decoder.read(bytearray(b"Received: a\r\nX: y\r\nreceived: b\r\n\r\nReceived: body\r\n"))
    assert decoder.hops == 2
