# mypy: disable-error-code="comparison-overlap"
# (the machine changes state between assertions; mypy narrows as if it could not)
"""The machine with CHUNKING (BDAT), DSN and REQUIRETLS, in memory: exact bytes out."""

from __future__ import annotations

import pytest

from tests.test_machine import QUIT, RSET, refused_before_sending, session, session_failure
from txcolombe.client.machine import (
    BDAT_CHUNK,
    BodyRefused,
    BodyWanted,
    Envelope,
    State,
    TLSMode,
    TransactionDone,
    TransactionRefused,
)
from txcolombe.codec import errors
from txcolombe.codec.address import parse_sender
from txcolombe.codec.dsn import DSN, Notify, Recipient, Return, recipient_options
from txcolombe.codec.errors import Step

MAIL = b"MAIL FROM:<from@example.org>"


def envelope(*recipients: str | Recipient, dsn: DSN | None = None, **kwargs: object) -> Envelope:
    mailboxes, options = recipient_options(recipients or ("to@example.org",), dsn)
    return Envelope(
        parse_sender("from@example.org"),
        mailboxes,
        rcpt_options=options,
        dsn=dsn,
        **kwargs,  # type: ignore[arg-type]
    )


# -- BDAT ----------------------------------------------------------------------------


def test_bdat_replaces_data_when_chunking_and_pipelining_are_offered() -> None:
    conv = session("PIPELINING", "CHUNKING", "8BITMIME")
    sent, _ = conv.do(lambda: conv.machine.start_transaction(envelope()))
    # No DATA: the body waits for the RCPT replies, then goes as BDAT chunks.
    assert sent == MAIL + b" BODY=8BITMIME\r\nRCPT TO:<to@example.org>\r\n"
    sent, events = conv.feed(b"250 ok\r\n250 ok\r\n")
    assert (sent, events) == (b"", [BodyWanted(1)])
    conv.machine.send_body(b".a dot line\r\n.\r\nbare lf\n")
    sent, _ = conv.do(conv.machine.end_body)
    # Not dot-stuffed, line endings normalised, all in the LAST chunk.
    data = b".a dot line\r\n.\r\nbare lf\r\n"
    assert sent == b"BDAT %d LAST\r\n" % len(data) + data
    sent, events = conv.reply(250, "2.0.0 queued as BDAT1")
    [done] = events
    assert isinstance(done, TransactionDone)
    assert done.reply.queue_id == "BDAT1"
    assert conv.state is State.READY


def test_bdat_chunks_are_gathered_and_pipelined() -> None:
    conv = session("PIPELINING", "CHUNKING")
    conv.do(lambda: conv.machine.start_transaction(envelope()))
    conv.feed(b"250 ok\r\n250 ok\r\n")
    line = b"x" * 78 + b"\r\n"
    pieces = [line * 100] * (BDAT_CHUNK // len(line * 100) + 1)
    for piece in pieces:
        conv.machine.send_body(piece)
    sent, _ = conv.flush()
    assert sent.startswith(b"BDAT %d\r\n" % sum(map(len, pieces)))
    sent, _ = conv.do(conv.machine.end_body)
    assert sent == b"BDAT 0 LAST\r\n"
    assert conv.waiting_for is Step.BODY  # the first chunk's reply comes first
    _, events = conv.feed(b"250 chunk ok\r\n250 message ok\r\n")
    assert isinstance(events[0], TransactionDone)


def test_bdat_refused_stops_the_body_and_resets() -> None:
    conv = session("PIPELINING", "CHUNKING")
    conv.do(lambda: conv.machine.start_transaction(envelope()))
    conv.feed(b"250 ok\r\n250 ok\r\n")
    conv.machine.send_body(b"y" * 80 + b"\r\n" * (BDAT_CHUNK // 2))
    conv.machine.send_body(b"z\r\n" * BDAT_CHUNK)
    conv.flush()
    # The machine ends the transaction; the driver is told to stop the body.
    sent, events = conv.feed(b"552 5.3.4 message too big\r\n")
    assert (sent, events) == (RSET, [BodyRefused(1)])
    assert conv.state is State.RESETTING
    with pytest.raises(errors.UsageError):
        conv.machine.send_body(b"more\r\n")  # nothing more is sent for it
    assert conv.flush() == (b"", [])
    # The second chunk's reply, then RSET's.
    _, events = conv.feed(b"503 5.5.1 no\r\n250 reset\r\n")
    [failed] = events
    assert isinstance(failed, TransactionRefused)
    assert isinstance(failed.error, errors.StorageExceeded)
    assert failed.error.step is Step.BODY
    assert conv.state is State.READY


def test_bdat_with_every_recipient_refused_sends_no_body() -> None:
    conv = session("PIPELINING", "CHUNKING")
    conv.do(lambda: conv.machine.start_transaction(envelope("a@example.org")))
    sent, events = conv.feed(b"250 ok\r\n550 no such user\r\n")
    assert sent == RSET
    assert events == []
    _, events = conv.reply(250, "reset")
    [failed] = events
    assert isinstance(failed, TransactionRefused)
    assert isinstance(failed.error, errors.RecipientsRefused)
    assert b"BDAT" not in conv.sent


def test_chunking_false_keeps_data() -> None:
    conv = session("PIPELINING", "CHUNKING")
    sent, _ = conv.do(lambda: conv.machine.start_transaction(envelope(chunking=False)))
    assert sent.endswith(b"DATA\r\n")


def test_bdat_needs_pipelining_here() -> None:
    conv = session("CHUNKING")
    sent, _ = conv.do(lambda: conv.machine.start_transaction(envelope()))
    assert sent == MAIL + b"\r\n"  # no PIPELINING: lock-step DATA, not BDAT
    error = refused_before_sending(session("CHUNKING"), envelope(chunking=True))
    assert isinstance(error, errors.ExtensionUnavailable)
    assert error.extension == "PIPELINING"


def test_binarymime_sends_the_body_untouched() -> None:
    conv = session("PIPELINING", "CHUNKING", "BINARYMIME")
    sent, _ = conv.do(lambda: conv.machine.start_transaction(envelope(binary=True)))
    assert b" BODY=BINARYMIME" in sent
    conv.feed(b"250 ok\r\n250 ok\r\n")
    body = b"\x00\xff\r.\n" + bytes(range(256))
    conv.machine.send_body(body)
    sent, _ = conv.do(conv.machine.end_body)
    assert sent == b"BDAT %d LAST\r\n" % len(body) + body


@pytest.mark.parametrize("keywords", [("PIPELINING", "CHUNKING"), ("PIPELINING",)])
def test_binarymime_not_offered(keywords: tuple[str, ...]) -> None:
    conv = session(*keywords)
    error = refused_before_sending(conv, envelope(binary=True))
    assert isinstance(error, errors.ExtensionUnavailable)


# -- DSN -------------------------------------------------------------------------------


def test_dsn_parameters() -> None:
    conv = session("DSN")
    dsn = DSN(ret=Return.FULL, envid="id+1=x", notify=frozenset({Notify.DELAY}), orcpt=True)
    rcpts = (Recipient("a@example.org", notify={Notify.SUCCESS, Notify.FAILURE}), "b@example.org")
    sent, _ = conv.do(lambda: conv.machine.start_transaction(envelope(*rcpts, dsn=dsn)))
    assert sent == MAIL + b" RET=FULL ENVID=id+2B1+3Dx\r\n"
    sent, _ = conv.reply(250, "ok")
    assert sent == b"RCPT TO:<a@example.org> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a@example.org\r\n"
    sent, _ = conv.reply(250, "ok")
    assert sent == b"RCPT TO:<b@example.org> NOTIFY=DELAY ORCPT=rfc822;b@example.org\r\n"


def test_dsn_not_offered_is_refused_before_sending() -> None:
    conv = session()
    error = refused_before_sending(conv, envelope(dsn=DSN(ret=Return.HDRS)))
    assert isinstance(error, errors.ExtensionUnavailable)
    assert error.extension == "DSN"
    env = envelope(Recipient("a@example.org", notify={Notify.NEVER}))
    assert isinstance(refused_before_sending(conv, env), errors.ExtensionUnavailable)


def test_dsn_option_errors() -> None:
    with pytest.raises(errors.UsageError):
        DSN(envid="x" * 101)
    with pytest.raises(errors.UsageError):
        DSN(envid="not ascii é")
    with pytest.raises(errors.UsageError):
        DSN(notify=frozenset({Notify.NEVER, Notify.FAILURE}))
    with pytest.raises(errors.UsageError):
        recipient_options([Recipient("a@example.org", notify={Notify.NEVER, Notify.DELAY})], None)


# -- REQUIRETLS --------------------------------------------------------------------------


def test_requiretls_sent_under_tls_when_offered() -> None:
    conv = session("REQUIRETLS", tls=TLSMode.IMPLICIT)
    sent, _ = conv.do(lambda: conv.machine.start_transaction(envelope(requiretls=True)))
    assert sent.startswith(MAIL + b" REQUIRETLS\r\n")


@pytest.mark.parametrize(
    ("keywords", "tls"),
    [((), TLSMode.IMPLICIT), (("REQUIRETLS",), TLSMode.NONE)],
    ids=["not offered", "no TLS"],
)
def test_requiretls_impossible(keywords: tuple[str, ...], tls: TLSMode) -> None:
    conv = session(*keywords, tls=tls)
    error = refused_before_sending(conv, envelope(requiretls=True))
    assert isinstance(error, errors.ExtensionUnavailable)
    assert error.extension == "REQUIRETLS"


# -- RSET probe (the pool's reused sessions) -------------------------------------------


def test_reset_first_is_pipelined_before_mail() -> None:
    conv = session("PIPELINING")
    sent, _ = conv.do(lambda: conv.machine.start_transaction(envelope(reset_first=True)))
    assert sent.startswith(RSET + MAIL)


def test_reset_first_lock_step_waits_for_its_reply() -> None:
    conv = session()
    sent, _ = conv.do(lambda: conv.machine.start_transaction(envelope(reset_first=True)))
    assert sent == RSET
    sent, _ = conv.reply(250, "ok")
    assert sent.startswith(MAIL)


def test_reset_first_refused_is_fatal() -> None:
    conv = session()
    conv.do(lambda: conv.machine.start_transaction(envelope(reset_first=True)))
    sent, events = conv.reply(502, "no RSET here")
    assert sent == QUIT
    error = session_failure(events, errors.CommandRejected)
    assert error.step is Step.RSET
