"""The reply parser: bytes in, :class:`Reply` values out, bounded."""

from __future__ import annotations

import pytest

from txcolombe.codec import reply as reply_module
from txcolombe.codec.errors import MalformedReply, ReplyTooLong
from txcolombe.codec.reply import MAX_LINE, MAX_LINES, Reply, ReplyParser


def parse_all(*chunks: bytes, parser: ReplyParser | None = None) -> list[Reply]:
    parser = parser if parser is not None else ReplyParser()
    replies = []
    for chunk in chunks:
        parser.feed(chunk)
        while (reply := parser.next_reply()) is not None:
            replies.append(reply)
    return replies


# -- well-formed replies ---------------------------------------------------------


def test_single_line() -> None:
    assert parse_all(b"220 mx.example ESMTP ready\r\n") == [Reply(220, ("mx.example ESMTP ready",))]


def test_multi_line() -> None:
    (reply,) = parse_all(b"250-mx.example\r\n250-PIPELINING\r\n250 SIZE 1000\r\n")
    assert reply.code == 250
    assert reply.lines == ("mx.example", "PIPELINING", "SIZE 1000")
    assert reply.text == "mx.example\nPIPELINING\nSIZE 1000"


def test_bare_code() -> None:
    (reply,) = parse_all(b"250\r\n")
    assert reply.code == 250
    assert reply.lines == ("",)
    assert reply.enhanced_status is None


def test_bare_code_ends_a_multi_line_reply() -> None:
    (reply,) = parse_all(b"250-first\r\n250\r\n")
    assert reply.lines == ("first", "")


def test_lf_only_line_endings() -> None:
    replies = parse_all(b"250-a\n250 b\n354 go\n")
    assert replies == [Reply(250, ("a", "b")), Reply(354, ("go",))]


def test_several_replies_in_one_feed() -> None:
    replies = parse_all(b"250 one\r\n251 two\r\n550 5.1.1 three\r\n")
    assert [r.code for r in replies] == [250, 251, 550]


def test_incomplete_line_waits() -> None:
    parser = ReplyParser()
    parser.feed(b"250 partial")
    assert parser.next_reply() is None
    assert parser.pending
    parser.feed(b" line\r\n")
    assert parser.next_reply() == Reply(250, ("partial line",))
    assert not parser.pending


def test_incomplete_multi_line_waits() -> None:
    parser = ReplyParser()
    parser.feed(b"250-first\r\n")
    assert parser.next_reply() is None
    assert parser.pending
    parser.feed(b"250 last\r\n")
    assert parser.next_reply() == Reply(250, ("first", "last"))


WIRE = b"220 mx.example ready\r\n250-mx.example\r\n250-8BITMIME\r\n250 2.0.0 SIZE 10\r\n354 go\n"
EXPECTED = [
    Reply(220, ("mx.example ready",)),
    Reply(250, ("mx.example", "8BITMIME", "2.0.0 SIZE 10")),
    Reply(354, ("go",)),
]


@pytest.mark.parametrize("cut", range(len(WIRE) + 1))
def test_split_in_two_at_every_position(cut: int) -> None:
    assert parse_all(WIRE[:cut], WIRE[cut:]) == EXPECTED


def test_fed_one_byte_at_a_time() -> None:
    assert parse_all(*(WIRE[i : i + 1] for i in range(len(WIRE)))) == EXPECTED


@pytest.mark.parametrize("cut", range(1, len(WIRE)))
def test_split_in_three(cut: int) -> None:
    middle = min(cut + 7, len(WIRE))
    assert parse_all(WIRE[:cut], WIRE[cut:middle], WIRE[middle:]) == EXPECTED


def test_non_utf8_text_is_tolerated() -> None:
    (reply,) = parse_all(b"250 caf\xe9 \xff\xfe ok\r\n")
    assert reply.code == 250
    assert reply.lines[0].startswith("caf")
    assert reply.lines[0].endswith(" ok")
    assert "\ufffd" in reply.lines[0]


def test_utf8_text_is_decoded() -> None:
    (reply,) = parse_all("250 bienvenüe\r\n".encode())
    assert reply.lines == ("bienvenüe",)


# -- enhanced status and queue id --------------------------------------------------


def test_enhanced_status() -> None:
    (reply,) = parse_all(b"550 5.1.1 <x@example.org>: Recipient address rejected\r\n")
    assert reply.enhanced_status == (5, 1, 1)
    assert reply.text == "<x@example.org>: Recipient address rejected"


def test_enhanced_status_of_multi_line_comes_from_first_line() -> None:
    (reply,) = parse_all(b"451-4.3.0 first\r\n451 4.7.1 second\r\n")
    assert reply.enhanced_status == (4, 3, 0)
    assert reply.text == "first\nsecond"


def test_enhanced_status_ignored_when_class_mismatches_code() -> None:
    (reply,) = parse_all(b"250 5.1.1 odd\r\n")
    assert reply.enhanced_status is None
    assert Reply.of(550, "2.0.0 odd").enhanced_status is None
    assert Reply.of(450, "5.0.0 odd").enhanced_status is None


def test_enhanced_status_needs_a_separator() -> None:
    assert Reply.of(250, "2.0.0x").enhanced_status is None
    assert Reply.of(250, "2.0.0").enhanced_status == (2, 0, 0)
    assert Reply.of(250, "2.1.5 Ok").enhanced_status == (2, 1, 5)
    assert Reply.of(250, "2.0 Ok").enhanced_status is None


def test_enhanced_status_three_digit_parts() -> None:
    assert Reply.of(554, "5.123.456 x").enhanced_status == (5, 123, 456)
    assert Reply.of(554, "5.1234.4 x").enhanced_status is None


@pytest.mark.parametrize(
    ("wire", "queue_id"),
    [
        (b"250 2.0.0 Ok: queued as 4XyZ12\r\n", "4XyZ12"),
        (b"250 OK\r\n", None),
        (b"250 Ok: queued as 3F2A1B0C9D\r\n", "3F2A1B0C9D"),
        (b"250 2.0.0 OK id=1abcDE-000123-AB\r\n", "1abcDE-000123-AB"),
        (b"250 2.0.0 Queued as <abc.def@mx>\r\n", "abc.def@mx"),
        (b"250\r\n", None),
    ],
)
def test_queue_id(wire: bytes, queue_id: str | None) -> None:
    (reply,) = parse_all(wire)
    assert reply.queue_id == queue_id


# -- the value type ------------------------------------------------------------------


def test_reply_of_and_to_bytes_round_trip() -> None:
    reply = Reply.of(250, "mx.example", "PIPELINING", "SIZE 10")
    assert reply.to_bytes() == b"250-mx.example\r\n250-PIPELINING\r\n250 SIZE 10\r\n"
    assert parse_all(reply.to_bytes()) == [reply]


def test_reply_of_no_lines() -> None:
    reply = Reply.of(250)
    assert reply.lines == ("",)
    assert reply.to_bytes() == b"250 \r\n"


@pytest.mark.parametrize(
    ("code", "positive", "temporary"),
    [(220, True, False), (354, True, False), (421, False, True), (550, False, False)],
)
def test_reply_classes(code: int, positive: bool, temporary: bool) -> None:
    reply = Reply.of(code, "x")
    assert reply.positive is positive
    assert reply.temporary is temporary


def test_str() -> None:
    assert str(Reply.of(250, "a", "b")) == "250 a / 250 b"
    assert str(Reply.of(250)) == "250"
    assert str(Reply.of(354, "go ahead ")) == "354 go ahead"


# -- malformed replies ---------------------------------------------------------------


@pytest.mark.parametrize(
    "wire",
    [
        b"hello\r\n",
        b"\r\n",
        b"25\r\n",
        b"2x0 ok\r\n",
        b"abc ok\r\n",
        b"150 ok\r\n",
        b"650 ok\r\n",
        b"050 ok\r\n",
        b"250_ok\r\n",
        b"250:ok\r\n",
        b"2500 ok\r\n",
        b"250\tok\r\n",
        b" 250 ok\r\n",
        b"HTTP/1.1 400 Bad Request\r\n",
    ],
)
def test_malformed(wire: bytes) -> None:
    parser = ReplyParser()
    parser.feed(wire)
    with pytest.raises(MalformedReply):
        parser.next_reply()


def test_code_change_mid_reply() -> None:
    parser = ReplyParser()
    parser.feed(b"250-first\r\n251 second\r\n")
    with pytest.raises(MalformedReply, match="250 to 251"):
        parser.next_reply()


def test_malformed_after_good_reply() -> None:
    parser = ReplyParser()
    parser.feed(b"250 good\r\ngarbage\r\n")
    assert parser.next_reply() == Reply(250, ("good",))
    with pytest.raises(MalformedReply):
        parser.next_reply()


def test_malformed_is_not_reply_too_long() -> None:
    parser = ReplyParser()
    parser.feed(b"garbage\r\n")
    with pytest.raises(MalformedReply) as info:
        parser.next_reply()
    assert not isinstance(info.value, ReplyTooLong)


# -- bounds ----------------------------------------------------------------------------


def test_default_bounds() -> None:
    assert MAX_LINE >= 512
    assert MAX_LINES >= 1


def test_endless_line_fed_in_chunks_is_bounded() -> None:
    parser = ReplyParser()
    parser.feed(b"250 ")
    fed = 4
    chunk = b"x" * 1000
    with pytest.raises(ReplyTooLong):
        while True:
            parser.feed(chunk)
            fed += len(chunk)
            assert fed <= MAX_LINE + len(chunk), "the parser kept accepting bytes"
            assert parser.next_reply() is None
    # Raised as soon as the buffered line went over the limit, not later.
    assert MAX_LINE < fed <= MAX_LINE + len(chunk)


def test_endless_line_one_byte_at_a_time() -> None:
    parser = ReplyParser(max_line=50)
    parser.feed(b"250 ")
    fed = 4
    with pytest.raises(ReplyTooLong):
        while fed < 1000:
            parser.feed(b"y")
            fed += 1
            parser.next_reply()
    assert fed == 51


def test_long_line_in_one_feed() -> None:
    parser = ReplyParser(max_line=100)
    parser.feed(b"250 " + b"z" * 200 + b"\r\n")
    with pytest.raises(ReplyTooLong):
        parser.next_reply()


@pytest.mark.parametrize("ending", [b"\r\n", b"\n"])
@pytest.mark.parametrize("bytewise", [False, True])
def test_line_of_exactly_max_line_is_accepted(ending: bytes, bytewise: bool) -> None:
    line = b"250 " + b"a" * 96
    assert len(line) == 100
    wire = line + ending
    chunks = [wire[i : i + 1] for i in range(len(wire))] if bytewise else [wire]
    assert parse_all(*chunks, parser=ReplyParser(max_line=100)) == [Reply(250, ("a" * 96,))]


@pytest.mark.parametrize("ending", [b"\r\n", b"\n"])
def test_line_of_max_line_plus_one_is_refused(ending: bytes) -> None:
    parser = ReplyParser(max_line=100)
    parser.feed(b"250 " + b"a" * 97 + ending)
    with pytest.raises(ReplyTooLong):
        parser.next_reply()


def test_endless_multi_line_reply() -> None:
    parser = ReplyParser(max_lines=10)
    with pytest.raises(ReplyTooLong, match="10 lines"):
        for _ in range(1000):
            parser.feed(b"250-more\r\n")
            assert parser.next_reply() is None
    assert len(parser._lines) <= 11


def test_endless_multi_line_reply_default_bound() -> None:
    parser = ReplyParser()
    parser.feed(b"250-more\r\n" * (MAX_LINES + 1))
    with pytest.raises(ReplyTooLong):
        parser.next_reply()


def test_multi_line_at_the_bound_is_accepted() -> None:
    parser = ReplyParser(max_lines=10)
    parser.feed(b"250-x\r\n" * 9 + b"250 y\r\n")
    reply = parser.next_reply()
    assert reply is not None
    assert len(reply.lines) == 10


# -- discard ---------------------------------------------------------------------------


def test_discard_drops_unparsed_bytes() -> None:
    parser = ReplyParser()
    parser.feed(b"220 go ahead\r\n250 injected\r\n250-also")
    assert parser.next_reply() == Reply(220, ("go ahead",))
    assert parser.discard() == len(b"250 injected\r\n250-also")
    assert not parser.pending
    assert parser.next_reply() is None
    parser.feed(b"250 fresh\r\n")
    assert parser.next_reply() == Reply(250, ("fresh",))


def test_discard_when_empty() -> None:
    parser = ReplyParser()
    assert parser.discard() == 0
    assert parser.next_reply() is None


def test_discard_after_partial_scan() -> None:
    parser = ReplyParser()
    parser.feed(b"250 no newline yet")
    assert parser.next_reply() is None
    parser.discard()
    parser.feed(b"354 ok\r\n")
    assert parser.next_reply() == Reply(354, ("ok",))


def test_discard_forgets_a_partial_multi_line_reply() -> None:
    parser = ReplyParser()
    parser.feed(b"250-injected\r\n")
    assert parser.next_reply() is None
    parser.discard()
    assert not parser.pending
    parser.feed(b"220 fresh\r\n")
    assert parser.next_reply() == Reply(220, ("fresh",))


# -- replies seen before ----------------------------------------------------------


def test_a_repeated_single_line_reply_is_parsed_once() -> None:
    first, second = parse_all(b"250 2.1.0 Ok\r\n250 2.1.0 Ok\r\n")
    assert first is second
    assert first == Reply(250, ("2.1.0 Ok",), (2, 1, 0))


def test_a_multi_line_reply_is_not_confused_with_its_lines() -> None:
    (single,) = parse_all(b"250 SIZE 1000\r\n")
    (multi,) = parse_all(b"250-mx.example\r\n250 SIZE 1000\r\n")
    assert multi.lines == ("mx.example", "SIZE 1000")
    assert single.lines == ("SIZE 1000",)


def test_the_replies_kept_are_bounded() -> None:
    unique = b"".join(b"250 queued as %d\r\n" % n for n in range(5 * reply_module._SEEN_MAX))
    replies = parse_all(unique)
    assert [reply.queue_id for reply in replies] == [
        str(n) for n in range(5 * reply_module._SEEN_MAX)
    ]
    assert len(reply_module._SEEN) <= reply_module._SEEN_MAX
