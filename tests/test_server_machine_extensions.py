"""The server machine's options: BDAT, a given extension list, lenient mode, intercept."""

from __future__ import annotations

import base64

import pytest

from tests.test_server_machine import codes, events, replies
from txcolombe.codec.reply import Reply
from txcolombe.server.machine import (
    END_OF_DATA,
    GREETING,
    AuthRequest,
    BodyData,
    Close,
    CommandRead,
    DataAborted,
    MessageReceived,
    Rejected,
    ServerConfig,
    ServerMachine,
    ServerStartTLS,
    ServerState,
)

CHUNKING = ServerConfig(hostname="relay.test", chunking=True, max_size=2000, error_sleep=0.0)


def machine(config: ServerConfig = CHUNKING, **options: object) -> ServerMachine:
    m = ServerMachine(config, client_address="192.0.2.7", relay_allowed=True, **options)  # type: ignore[arg-type]
    replies(m)  # the greeting
    return m


def in_transaction(m: ServerMachine, mail: bytes = b"MAIL FROM:<a@x.test>") -> None:
    assert codes(m, b"EHLO c.test\r\n" + mail + b"\r\nRCPT TO:<b@y.test>\r\n") == [250, 250, 250]


# -- BDAT -----------------------------------------------------------------------------------


def test_bdat_chunks_make_one_message_as_sent() -> None:
    m = machine()
    in_transaction(m)
    # Chunks split anywhere, a line across two of them, dots left alone, the last unended.
    sent = b"BDAT 9\r\n.one\r\ntwoBDAT 0\r\nBDAT 9 LAST\r\n\r\n..three"
    for i in range(0, len(sent), 4):  # as the network may cut it
        m.receive_data(sent[i : i + 4])
    assert [r.code for r in replies(m)] == [250, 250]
    (event,) = events(m)
    assert isinstance(event, MessageReceived) and event.data == b".one\r\ntwo\r\n..three"
    m.message_result(Reply.of(250, "2.0.0 Ok: queued as B1"))
    assert [r.lines[0] for r in replies(m)] == ["2.0.0 Ok: queued as B1"]


def test_chunking_is_advertised_only_when_configured() -> None:
    m = machine()
    m.receive_data(b"EHLO c.test\r\n")
    assert "CHUNKING" in replies(m)[0].lines
    m = machine(ServerConfig(hostname="relay.test"))
    m.receive_data(b"EHLO c.test\r\n")
    assert "CHUNKING" not in replies(m)[0].lines
    in_transaction(m)
    assert codes(m, b"BDAT 3 LAST\r\n") == [500]


def test_a_refused_chunk_is_read_whole() -> None:
    m = machine()
    # No transaction: refused, but its octets are not taken for commands.
    assert codes(m, b"EHLO c.test\r\nBDAT 6\r\nRSET\r\nNOOP\r\n") == [250, 503, 250]
    in_transaction(m)
    assert codes(m, b"BDAT 5 LAST\r\nba\nre") == [550]  # bare LF, as in DATA
    assert not m.in_transaction and events(m)[-1].reply.code == 550
    assert codes(m, b"BDAT x\r\n") == [501]
    in_transaction(m)
    assert codes(m, b"BDAT 1500\r\n" + b"x" * 998 + b"\r\n" + b"y" * 500) == [250]
    assert codes(m, b"BDAT 600\r\n" + b"z" * 600) == [550]  # a line over 998 octets
    assert codes(m, b"BDAT 2 LAST\r\nzz") == [503]  # the transaction is gone


def test_bdat_over_the_size_limit_and_mixed_with_data() -> None:
    m = machine()
    in_transaction(m)
    assert codes(m, b"BDAT 2100 LAST\r\n" + b"x\r\n" * 700) == [552]
    in_transaction(m)
    assert codes(m, b"BDAT 3\r\nx\r\nDATA\r\n") == [250, 503]


def test_binarymime_octets_pass_unchecked() -> None:
    config = ServerConfig(
        hostname="relay.test", extensions=("CHUNKING", "BINARYMIME", "8BITMIME", "PIPELINING")
    )
    m = machine(config)
    in_transaction(m, b"MAIL FROM:<a@x.test> BODY=BINARYMIME")
    assert codes(m, b"DATA\r\n") == [503]  # BINARYMIME needs BDAT
    m.receive_data(b"BDAT 4 LAST\r\n\r\0\n\r")
    (event,) = events(m)
    assert isinstance(event, MessageReceived) and event.data == b"\r\0\n\r"
    assert event.envelope.body_type == "BINARYMIME"


def test_large_bdat_bodies_are_handed_over_in_parts() -> None:
    m = machine(ServerConfig(hostname="relay.test", chunking=True), body_chunk=100)
    in_transaction(m)
    m.receive_data(b"BDAT 301\r\n" + b"line of text\r\n" * 21 + b"line of")
    assert [r.code for r in replies(m)] == [250]
    parts = events(m)
    assert parts and all(not isinstance(p, MessageReceived) for p in parts)
    m.receive_data(b"BDAT 7 LAST\r\n text\r\n")
    *more, last = events(m)
    assert isinstance(last, MessageReceived)
    whole = b"".join(p.data for p in [*parts, *more, last])
    assert whole == b"line of text\r\n" * 22
    m.message_result(Reply.of(250, "ok"))
    replies(m)
    in_transaction(m)
    m.receive_data(b"BDAT 300\r\n" + b"x" * 200 + b"\r\n")
    assert [type(e) for e in events(m)] == [BodyData]
    assert codes(m, b"bare\n" + b"y" * 93) == [550]  # the parts handed over are void
    assert [type(e) for e in events(m)] == [DataAborted, Rejected]


# -- a given extension list, lenient mode ---------------------------------------------------

LISTED = ServerConfig(
    hostname="mx.test",
    extensions=("PIPELINING", "SIZE 100", "STARTTLS", "AUTH LOGIN"),
    ehlo_greeting="{hostname} greets {helo}",
    auth_required=True,
    lenient=True,
)


def test_the_listed_extensions_are_offered_and_enforced() -> None:
    m = machine(LISTED)
    m.receive_data(b"EHLO c.test\r\n")
    [ehlo] = replies(m)
    assert ehlo.lines == ("mx.test greets c.test", "PIPELINING", "SIZE 100", "STARTTLS")
    # AUTH is listed, but withheld without TLS: 503, as for a server without it.
    assert codes(m, b"AUTH LOGIN\r\nMAIL FROM:<a@x.test>\r\n") == [503, 530]
    assert codes(m, b"STARTTLS\r\n") == [220]
    assert isinstance(events(m)[0], ServerStartTLS)
    m.tls_started()
    m.receive_data(b"EHLO c.test\r\n")
    assert replies(m)[0].lines[1:] == ("PIPELINING", "SIZE 100", "AUTH LOGIN")
    assert codes(m, b"AUTH PLAIN AGEAYg==\r\n") == [504]  # only LOGIN is listed
    assert codes(m, b"STARTTLS\r\n") == [503]


def test_lenient_mode_records_what_the_client_sent() -> None:
    m = machine(ServerConfig(hostname="mx.test", lenient=True, max_size=5000))
    m.receive_data(
        b"EHLO c.test\r\nMAIL FROM:<a@x.test> X-ODD=1 bare% BODY=8BITMIME\r\n"
        b"RCPT TO:<b@y.test> NOTIFY=NEVER\r\nRCPT TO:<j\xc3\xbcrgen@y.test>\r\nDATA\r\n"
        b"bare\nLF and bare\rCR\r\n" + b"l" * 1500 + b"\r\n" + b"Received: x\r\n" * 200 + b".\r\n"
    )
    assert [r.code for r in replies(m)] == [250, 250, 250, 250, 354]
    (event,) = events(m)
    assert isinstance(event, MessageReceived)
    assert event.data.startswith(b"bare\nLF and bare\rCR\r\n" + b"l" * 1500 + b"\r\n")
    envelope = event.envelope
    assert envelope.paths == ("a@x.test", "b@y.test", "jürgen@y.test")
    assert envelope.mail_parameters == ("X-ODD=1", "bare%", "BODY=8BITMIME")
    assert envelope.rcpt_parameters == (("NOTIFY=NEVER",), ())
    m.message_result(Reply.of(250, "ok"))
    replies(m)
    # An unfinished line over the limit is taken too, its leading dot unstuffed.
    m.receive_data(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n..")
    m.receive_data(b"l" * 1500)
    m.receive_data(b"\r\n.\r\n")
    assert events(m)[-1].data == b"." + b"l" * 1500 + b"\r\n"


def test_strict_mode_refuses_what_lenient_mode_records() -> None:
    m = machine(ServerConfig(hostname="mx.test"))
    in_transaction(m)
    assert codes(m, b"RSET\r\nMAIL FROM:<a@x.test> X-ODD=1\r\n") == [250, 555]
    assert codes(m, b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test> NOTIFY=NEVER\r\n") == [250, 555]


# -- intercept: a driver that scripts the replies -------------------------------------------


def held(m: ServerMachine) -> CommandRead:
    event = events(m)[-1]
    assert isinstance(event, CommandRead) and m.state is ServerState.HELD and m.waiting
    return event


def test_intercept_holds_the_greeting_each_command_and_the_end_of_data() -> None:
    m = ServerMachine(CHUNKING, client_address="192.0.2.7", relay_allowed=True, intercept=True)
    assert m.data_to_send() == b"" and held(m).verb == GREETING
    m.proceed()
    assert [r.code for r in replies(m)] == [220]
    m.receive_data(b"EHLO c.test\r\nNOOP\r\n")
    assert held(m) == CommandRead("EHLO", "c.test", "EHLO c.test")
    assert replies(m) == []  # the NOOP waits, unread
    m.proceed()
    assert [r.code for r in replies(m)] == [250] and held(m).verb == "NOOP"
    m.override(b"250 scripted\r\n", effective=True)
    assert m.data_to_send() == b"250 scripted\r\n"
    m.receive_data(b"MAIL FROM:<a@x.test>\r\n")
    m.override(b"451 no\r\n", effective=False)  # no effect: no transaction
    assert not m.in_transaction and m.data_to_send() == b"451 no\r\n"


def test_an_effective_override_takes_effect_with_its_own_reply() -> None:
    m = ServerMachine(CHUNKING, client_address="192.0.2.7", relay_allowed=True, intercept=True)
    m.proceed()
    replies(m)
    for line in (b"EHLO c.test", b"MAIL FROM:<a@x.test>", b"RCPT TO:<b@y.test>", b"DATA"):
        m.receive_data(line + b"\r\n")
        m.override(b"250 fine\r\n" if line != b"DATA" else b"354 go\r\n", effective=True)
    assert m.recipients and m.state is ServerState.DATA
    replies(m)
    m.receive_data(b"hi\r\n.\r\n")
    assert held(m).verb == END_OF_DATA
    m.override(b"250 queued\r\n", effective=True)
    (stored,) = events(m)
    assert isinstance(stored, MessageReceived) and stored.data == b"hi\r\n"
    m.message_result(Reply.of(250, "2.0.0 Ok: queued as X"))
    assert m.data_to_send() == b"250 queued\r\n"  # the scripted reply, not the store's


def test_intercepted_auth_lines_and_their_replies() -> None:
    m = ServerMachine(
        ServerConfig(hostname="mx.test", auth_enabled=True, auth_without_tls=True),
        client_address="192.0.2.7",
        intercept=True,
    )
    m.proceed()
    m.receive_data(b"EHLO c.test\r\n")
    m.proceed()
    replies(m)
    m.receive_data(b"AUTH LOGIN\r\n")
    m.proceed()
    assert [r.code for r in replies(m)] == [334]
    m.receive_data(base64.b64encode(b"alice") + b"\r\n")
    assert held(m) == CommandRead("AUTH", "YWxpY2U=", "YWxpY2U=")
    m.proceed()
    replies(m)
    m.receive_data(base64.b64encode(b"s3cret") + b"\r\n")
    held(m)
    m.override(b"235 2.7.0 scripted\r\n", effective=True)
    (request,) = events(m)
    assert isinstance(request, AuthRequest) and m.data_to_send() == b""
    m.auth_result(True)  # the reply comes when the check does
    assert m.data_to_send() == b"235 2.7.0 scripted\r\n" and m.authenticated == "alice"


@pytest.mark.parametrize("effective", [True, False])
def test_an_intercepted_bdat_is_answered_after_its_chunk(effective: bool) -> None:
    m = ServerMachine(CHUNKING, client_address="192.0.2.7", relay_allowed=True, intercept=True)
    m.proceed()
    for line in (b"EHLO c.test", b"MAIL FROM:<a@x.test>", b"RCPT TO:<b@y.test>"):
        m.receive_data(line + b"\r\n")
        m.proceed()
    replies(m)
    events(m)
    m.receive_data(b"BDAT 4\r\nab")
    assert events(m) == []  # the chunk is not read yet
    m.receive_data(b"\r\nQUIT\r\n")
    assert held(m) == CommandRead("BDAT", "4", "BDAT 4")
    m.override(b"552 scripted\r\n", effective=effective)
    assert m.data_to_send() == b"552 scripted\r\n"
    assert m.in_transaction is effective
    assert held(m).verb == "QUIT"
    m.proceed()
    assert isinstance(events(m)[-1], Close)
