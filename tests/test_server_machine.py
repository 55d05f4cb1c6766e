"""The sans-I/O server machine, in memory: bytes in, replies and events out."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from txcolombe.codec.reply import Reply, ReplyParser
from txcolombe.server.machine import (
    AuthRequest,
    BodyData,
    Close,
    DataAborted,
    Delay,
    MessageReceived,
    Rejected,
    ServerConfig,
    ServerMachine,
    ServerStartTLS,
    ServerState,
)
from txcolombe.server.received import received_header

CONFIG = ServerConfig(
    hostname="relay.test",
    max_size=2000,
    max_recipients=3,
    tls_available=True,
    auth_enabled=True,
    error_sleep=0.0,
)


def replies(machine: ServerMachine) -> list[Reply]:
    parser = ReplyParser()
    parser.feed(machine.data_to_send())
    out = []
    while (reply := parser.next_reply()) is not None:
        out.append(reply)
    return out


def codes(machine: ServerMachine, data: bytes) -> list[int]:
    machine.receive_data(data)
    return [r.code for r in replies(machine)]


def events(machine: ServerMachine) -> list[Any]:
    out: list[Any] = []
    while (event := machine.next_event()) is not None:
        out.append(event)
    return out


def fresh(relay: bool = True, tls: bool = False, config: ServerConfig = CONFIG) -> ServerMachine:
    machine = ServerMachine(config, client_address="192.0.2.7", relay_allowed=relay, tls=tls)
    greeting = replies(machine)
    assert greeting[0].code == 220 and "relay.test" in greeting[0].lines[0]
    return machine


def in_data(machine: ServerMachine) -> None:
    assert codes(
        machine, b"EHLO c.test\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n"
    ) == [
        250,
        250,
        250,
        354,
    ]


def test_pipelined_transaction_and_exact_data() -> None:
    m = fresh()
    body = b"Subject: hi\r\n\r\n..leading dot\r\nline\r\n"
    m.receive_data(
        b"EHLO c.test\r\nMAIL FROM:<a@x.test> SIZE=40 BODY=8BITMIME\r\nRCPT TO:<b@y.test>\r\n"
        b"DATA\r\n" + body + b".\r\nQUIT\r\n"
    )
    assert [r.code for r in replies(m)] == [250, 250, 250, 354]
    (event,) = events(m)
    assert isinstance(event, MessageReceived)
    assert event.data == b"Subject: hi\r\n\r\n.leading dot\r\nline\r\n"
    assert str(event.envelope.sender) == "a@x.test"
    assert [str(r) for r in event.envelope.recipients] == ["b@y.test"]
    assert event.envelope.protocol == "ESMTP"
    assert m.state is ServerState.WAIT_STORE
    # QUIT waits for the store's answer
    m.message_result(Reply.of(250, "2.0.0 Ok: queued as X"))
    assert [r.code for r in replies(m)] == [250, 221]
    assert isinstance(events(m)[0], Close)


def test_ehlo_advertises_extensions_auth_only_under_tls() -> None:
    m = fresh()
    m.receive_data(b"EHLO c.test\r\n")
    (ehlo,) = replies(m)
    words = {line.split()[0] for line in ehlo.lines[1:]}
    assert {
        "PIPELINING",
        "SIZE",
        "8BITMIME",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
        "STARTTLS",
    } <= words
    assert "AUTH" not in words
    assert codes(m, b"AUTH PLAIN AGEAYg==\r\n") == [538]
    assert codes(m, b"STARTTLS\r\nNOOP\r\n") == [220]  # the pipelined NOOP is discarded
    assert isinstance(events(m)[0], ServerStartTLS)
    m.tls_started()
    assert codes(m, b"MAIL FROM:<a@x.test>\r\n") == [503]  # EHLO again first
    m.receive_data(b"EHLO c.test\r\n")
    (ehlo,) = replies(m)
    assert "AUTH PLAIN LOGIN" in ehlo.lines and "STARTTLS" not in ehlo.lines


def test_auth_plain_and_login() -> None:
    m = fresh(relay=False, tls=True)
    codes(m, b"EHLO c.test\r\n")
    m.receive_data(b"AUTH PLAIN " + base64.b64encode(b"\0alice\0s3cret") + b"\r\n")
    (req,) = events(m)
    assert isinstance(req, AuthRequest) and (req.username, req.password) == ("alice", "s3cret")
    assert "s3cret" not in repr(req)
    m.auth_result(False)
    assert [r.code for r in replies(m)] == [535]
    assert codes(m, b"AUTH LOGIN\r\n") == [334]
    assert codes(m, base64.b64encode(b"alice") + b"\r\n") == [334]
    m.receive_data(base64.b64encode(b"s3cret") + b"\r\n")
    (req,) = events(m)
    assert isinstance(req, AuthRequest) and req.mechanism == "LOGIN"
    m.auth_result(True)
    assert [r.code for r in replies(m)] == [235]
    assert m.authenticated == "alice"
    assert codes(m, b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@far.test>\r\n") == [250, 250]
    assert codes(m, b"AUTH PLAIN\r\n") == [503]


def test_auth_cancel_and_garbage() -> None:
    m = fresh(tls=True)
    codes(m, b"EHLO c.test\r\n")
    assert codes(m, b"AUTH PLAIN\r\n*\r\n") == [334, 501]
    assert codes(m, b"AUTH PLAIN !!!\r\n") == [501]
    assert codes(m, b"AUTH CRAM-MD5\r\n") == [504]
    assert m.state is ServerState.COMMAND


def test_no_open_relay() -> None:
    m = fresh(relay=False)
    assert codes(m, b"EHLO c.test\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@far.test>\r\n") == [
        250,
        250,
        554,
    ]
    m2 = fresh(
        relay=False,
        config=ServerConfig(hostname="relay.test", local_domains=frozenset({"here.test"})),
    )
    assert codes(
        m2, b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<u@here.test>\r\nRCPT TO:<postmaster>\r\n"
    ) == [
        250,
        250,
        250,
        250,
    ]


def test_sequence_errors() -> None:
    m = fresh()
    assert codes(m, b"MAIL FROM:<a@x.test>\r\n") == [503]
    assert codes(m, b"HELO c.test\r\nRCPT TO:<b@y.test>\r\nDATA\r\n") == [250, 503, 503]
    assert codes(m, b"MAIL FROM:<a@x.test> SIZE=10\r\n") == [555]  # HELO: no parameters
    assert codes(m, b"EHLO c.test\r\nMAIL FROM:<a@x.test>\r\nMAIL FROM:<a@x.test>\r\n") == [
        250,
        250,
        503,
    ]
    assert codes(m, b"DATA\r\n") == [554]  # no recipients
    assert codes(m, b"RSET\r\nBDAT 10\r\nFOO\r\nVRFY x\r\nNOOP\r\n") == [250, 500, 500, 252, 250]
    assert codes(m, b"MAIL FROM:<not an address>\r\nMAIL FROM:a@x.test\r\n") == [553, 501]
    assert codes(m, b"MAIL FROM:<a@x.test> FOO=1\r\n") == [555]


def test_limits_size_and_recipients() -> None:
    m = fresh()
    assert codes(m, b"EHLO c\r\nMAIL FROM:<a@x.test> SIZE=2001\r\n") == [250, 552]
    assert codes(
        m, b"MAIL FROM:<a@x.test>\r\n" + b"".join(b"RCPT TO:<r%d@y.test>\r\n" % i for i in range(4))
    ) == [
        250,
        250,
        250,
        250,
        452,
    ]
    assert codes(
        m, b"DATA\r\n" + b"x" * 900 + b"\r\n" + b"y" * 900 + b"\r\n" + b"z" * 900 + b"\r\n.\r\n"
    ) == [
        354,
        552,
    ]
    # No message; each refusal is reported for the log, with its envelope.
    rejected = events(m)
    assert all(isinstance(e, Rejected) for e in rejected)
    assert [(e.stage, e.reply.code, str(e.sender), str(e.recipient)) for e in rejected] == [
        ("MAIL", 552, "a@x.test", "None"),
        ("RCPT", 452, "a@x.test", "r3@y.test"),
        ("END-OF-MESSAGE", 552, "a@x.test", "r0@y.test"),
    ]


def test_utf8_needs_smtputf8() -> None:
    m = fresh()
    assert codes(m, "EHLO c\r\nMAIL FROM:<jö@x.test>\r\n".encode()) == [250, 553]
    assert codes(m, "MAIL FROM:<jö@x.test> SMTPUTF8\r\nRCPT TO:<dö@y.test>\r\n".encode()) == [
        250,
        250,
    ]


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"a\nb\r\n", "5.5.2"),  # bare LF
        (b"a\rb\r\n", "5.5.2"),  # bare CR
        (b"x" * 999 + b"\r\n", "5.5.6"),  # 999 octets
        (b"x" * 5000 + b"\r\n", "5.5.6"),  # longer than the buffer bound (also > SIZE)
        (b"Received: x\r\n" * 100 + b"\r\nbody\r\n", "5.4.6"),  # loop
    ],
)
def test_data_rejections(body: bytes, status: str) -> None:
    config = ServerConfig(hostname="relay.test", max_size=100_000)
    m = fresh(config=config)
    in_data(m)
    m.receive_data(body + b".\r\n")
    (reply,) = replies(m)
    assert reply.code >= 550 and reply.lines[0].startswith(status), reply
    (rejected,) = events(m)  # no message: the refusal, for the log
    assert isinstance(rejected, Rejected) and rejected.reply == reply
    assert rejected.stage == "END-OF-MESSAGE" and str(rejected.recipient) == "b@y.test"
    assert m.state is ServerState.COMMAND and not m.in_transaction
    assert codes(m, b"NOOP\r\n") == [250]


def test_99_received_headers_pass_and_998_octet_line_passes() -> None:
    m = fresh(config=ServerConfig(hostname="relay.test", max_size=100_000))
    in_data(m)
    body = b"Received: x\r\n" * 99 + b"\r\n" + b"y" * 998 + b"\r\n"
    m.receive_data(body + b".\r\n")
    (event,) = events(m)
    assert isinstance(event, MessageReceived) and event.data == body


def test_smuggling_lf_dot_crlf_does_not_end_data() -> None:
    m = fresh()
    in_data(m)
    # "<LF>.<CR><LF>" followed by a smuggled command: still data, not a command.
    m.receive_data(b"Subject: x\r\n\r\nhi\n.\r\nMAIL FROM:<evil@x.test>\r\n")
    assert replies(m) == [] and m.state is ServerState.DATA
    m.receive_data(b".\r\n")
    assert [r.code for r in replies(m)] == [550]
    assert [type(e) for e in events(m)] == [Rejected]


def test_data_split_anywhere_gives_same_message() -> None:
    body = b"Subject: s\r\n\r\n.dot\r\n" + b"line\r\n" * 20
    stream = (
        b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n"
        + body.replace(b"\r\n.", b"\r\n..")
        + b".\r\n"
    )
    for cut in range(1, len(stream), 7):
        m = fresh()
        m.receive_data(stream[:cut])
        m.receive_data(stream[cut:])
        (event,) = [e for e in events(m) if isinstance(e, MessageReceived)]
        assert event.data == body.replace(b"\r\n..", b"\r\n.")


def test_overlong_command_line_and_error_limit() -> None:
    m = fresh()
    assert codes(m, b"NOOP " + b"x" * 5000 + b"\r\nNOOP\r\n") == [500, 250]
    got = codes(m, b"FOO\r\n" * 30)
    assert got[-1] == 421 and len(got) == 20
    assert isinstance(events(m)[-1], Close)


def test_timeout_closes() -> None:
    m = fresh()
    m.timed_out()
    assert [r.code for r in replies(m)] == [421]
    assert isinstance(events(m)[0], Close)


def test_received_header() -> None:
    m = fresh(tls=True)
    in_data(m)
    m.receive_data(b"x\r\n.\r\n")
    (event,) = events(m)
    assert isinstance(event, MessageReceived)
    header = received_header(event.envelope, "relay.test", "QID1", 0.0)
    assert header == (
        b"Received: from c.test ([192.0.2.7])\r\n"
        b"\tby relay.test (txcolombe) with ESMTPS id QID1\r\n"
        b"\tfor <b@y.test>; Thu, 01 Jan 1970 00:00:00 +0000\r\n"
    )


# -- the DATA path against a line-by-line model ---------------------------------------

import itertools  # noqa: E402

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

MODEL_CONFIG = ServerConfig(hostname="relay.test", max_size=3000, max_hops=3)


def model(stream: bytes) -> tuple[bytes | None, set[str], bytes]:
    """What the server must make of the bytes after DATA, read a line at a
    time: (the message, or None when refused; the statuses of its faults;
    what follows the data).

    Only <CRLF>.<CRLF> ends the data; lines are unstuffed; a bare CR or LF,
    a line over 998 octets (after unstuffing), more than ``max_size``
    octets, or ``max_hops`` Received fields in the header refuse it (with
    the status of one of its faults).
    """
    lines: list[bytes] = []
    faults: set[str] = set()
    position = 0
    after_crlf = True
    in_headers = True
    hops = 0
    size = 0
    while True:
        end = stream.find(b"\n", position)
        assert end >= 0  # the stream always ends the data
        raw = stream[position:end]
        position = end + 1
        crlf = raw.endswith(b"\r")
        content = raw[:-1] if crlf else raw
        if content == b"." and crlf and after_crlf:
            break
        if not crlf or b"\r" in content:
            faults.add("5.5.2")
        if content.startswith(b"."):
            content = content[1:]
        if len(content) > 998:
            faults.add("5.5.6")
        if in_headers:
            if not content:
                in_headers = False
            elif content[:9].lower() == b"received:":
                hops += 1
        size += len(content) + 2
        if size > MODEL_CONFIG.max_size:
            faults.add("5.3.4")
        lines.append(content)
        after_crlf = crlf
    if not faults and hops >= MODEL_CONFIG.max_hops:
        faults.add("5.4.6")
    message = None if faults else b"".join(line + b"\r\n" for line in lines)
    return message, faults, stream[position:]


PIECES = st.sampled_from(
    [b"a", b"text ", b".", b"..", b"\r\n", b"\r", b"\n", b"\r\n.\r\n", b"\n.\r\n",
     b"Received: x\r\n", b"RECEIVED:y\r\n", b"\r\n\r\n", b"z" * 400, b"\xc3\xa9"]
)  # fmt: skip


@settings(max_examples=500, deadline=None)
@given(st.lists(PIECES, max_size=40), st.lists(st.integers(0, 5000), max_size=4))
def test_data_path_agrees_with_the_line_model(pieces: list[bytes], cuts: list[int]) -> None:
    """Any body, cut anywhere: the message the model reads, or a refusal
    for one of its faults; then the command after the data is read."""
    stream = b"".join(pieces) + b"\r\n.\r\nNOOP\r\n"
    message, faults, rest = model(stream)
    m = ServerMachine(MODEL_CONFIG, client_address="192.0.2.7", relay_allowed=True)
    replies(m)
    in_data(m)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    for start, end in itertools.pairwise(points):
        m.receive_data(stream[start:end])
    got = [e for e in events(m) if isinstance(e, MessageReceived)]  # not Close
    if faults:
        refusal, *after = replies(m)
        assert got == [] and refusal.code >= 550, refusal
        assert refusal.lines[0].split()[0] in faults, (refusal, faults)
    else:
        assert len(got) == 1 and got[0].data == message
        assert replies(m) == []  # the rest waits for the store's answer
        m.message_result(Reply.of(250, "2.0.0 Ok"))
        ok, *after = replies(m)
        assert ok.code == 250
    if rest == b"NOOP\r\n":
        assert [r.code for r in after] == [250]


# -- streaming, error sleep, shutdown, MAIL check ------------------------------------------


def test_large_body_is_handed_over_in_parts_and_the_rest_at_the_end() -> None:
    m = ServerMachine(
        ServerConfig(hostname="relay.test", max_size=100_000),
        client_address="192.0.2.7",
        relay_allowed=True,
        body_chunk=1000,
    )
    replies(m)
    in_data(m)
    body = b"".join(b"line %04d\r\n" % i for i in range(400))  # 4400 octets
    for at in range(0, len(body), 700):
        m.receive_data(body[at : at + 700])
    m.receive_data(b".\r\n")
    got = events(m)
    parts = [e for e in got if isinstance(e, BodyData)]
    (end,) = [e for e in got if isinstance(e, MessageReceived)]
    assert len(parts) >= 3 and all(len(p.data) <= 1000 + 700 for p in parts)
    assert b"".join(p.data for p in parts) + end.data == body
    assert str(parts[0].envelope.recipients[0]) == "b@y.test"


def test_refused_streamed_body_is_aborted() -> None:
    m = ServerMachine(
        ServerConfig(hostname="relay.test", max_size=3000),
        client_address="192.0.2.7",
        relay_allowed=True,
        body_chunk=1000,
    )
    replies(m)
    in_data(m)
    m.receive_data(b"y" * 900 + b"\r\n" + b"z" * 900 + b"\r\n")  # a part handed over
    assert [type(e) for e in events(m)] == [BodyData]
    m.receive_data((b"w" * 900 + b"\r\n") * 3)  # over max_size
    assert [type(e) for e in events(m)] == [DataAborted]
    m.receive_data(b".\r\n")
    assert [r.code for r in replies(m)] == [552]
    assert [type(e) for e in events(m)] == [Rejected]


def test_errors_past_the_soft_limit_are_delayed() -> None:
    config = ServerConfig(hostname="relay.test", soft_error_limit=2, error_sleep=1.5, max_errors=5)
    m = fresh(config=config)
    assert codes(m, b"FOO\r\nFOO\r\nFOO\r\nNOOP\r\n") == [500, 500]  # the third waits
    (delay,) = events(m)
    assert isinstance(delay, Delay) and delay.seconds == 1.5
    assert m.state is ServerState.SLEEP and m.waiting
    m.wake()
    assert [r.code for r in replies(m)] == [500, 250]  # then the rest is read
    m.receive_data(b"FOO\r\nFOO\r\n")
    assert [r.code for r in replies(m)] == []
    m.wake()
    assert [r.code for r in replies(m)] == [500, 500, 421]  # the fifth: dropped
    assert [type(e) for e in events(m)][-2:] == [Rejected, Close]


def test_shutdown_closes_at_once_or_after_the_message_reply() -> None:
    m = fresh()
    m.receive_data(b"EHLO c.test\r\n")
    replies(m)
    m.shutdown(Reply.of(421, "4.3.2 Service shutting down"))
    assert [r.code for r in replies(m)] == [421] and isinstance(events(m)[0], Close)
    m = fresh()
    in_data(m)
    m.receive_data(b"x\r\n.\r\n")
    assert isinstance(events(m)[0], MessageReceived)
    m.shutdown(Reply.of(421, "4.3.2 Service shutting down"))
    assert replies(m) == [] and events(m) == []  # the message's fate first
    m.message_result(Reply.of(250, "2.0.0 Ok"))
    assert [r.code for r in replies(m)] == [250, 421] and isinstance(events(m)[0], Close)


def test_mail_check_refuses_mail() -> None:
    full = Reply.of(452, "4.3.1 Insufficient system storage")
    m = ServerMachine(
        CONFIG, client_address="192.0.2.7", relay_allowed=True, mail_check=lambda s: full
    )
    replies(m)
    assert codes(m, b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\n") == [250, 452, 503]
    (rejected,) = events(m)
    assert isinstance(rejected, Rejected) and rejected.reply == full
    assert str(rejected.sender) == "a@x.test" and not m.in_transaction


def test_received_header_names_the_tls_cipher() -> None:
    m = fresh(tls=True)
    m.tls_details = "TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)"
    in_data(m)
    m.receive_data(b"x\r\n.\r\n")
    (event,) = events(m)
    assert isinstance(event, MessageReceived)
    header = received_header(event.envelope, "relay.test", "QID1", 0.0)
    assert header.split(b"\r\n")[1] == (
        b"\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits))"
    )
