"""txcolombe against a private Postfix (+ Dovecot for SASL) on loopback.

The peer (``postfix_peer``, session-scoped, skipped when this machine cannot
run it) listens on three ports: ``smtp`` (STARTTLS offered, AUTH offered
too), ``smtps`` (implicit TLS) and ``submission`` (STARTTLS, AUTH only after
it, recipients refused unless authenticated). Every @example.org recipient
lands in one Maildir; ``refuse*`` gets 550, ``later*`` 450, other domains
554 5.7.1 (relay access denied).

Postfix advertises PIPELINING, so the client's pipelined path runs here (the
aiosmtpd and Twisted servers offer none). It stores messages with LF line
endings and prepends Return-Path, Delivered-To, X-Original-To (virtual(8))
and Received: the tests strip those and compare the rest byte for byte with
what was sent. Each message carries every header Postfix would otherwise add
(From, Date, Message-ID) and a fresh Message-ID, which finds it in the Maildir.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet import ssl as twisted_ssl
from twisted.internet.defer import DeferredList
from twisted.internet.task import deferLater
from twisted.logger import formatEvent, globalLogPublisher

from tests.conftest import POSTFIX_SIZE_LIMIT, on_the_wire
from txcolombe import (
    DSN,
    Authentication,
    AuthenticationFailed,
    ExtensionUnavailable,
    Mechanism,
    MessageTooLarge,
    Notify,
    Recipient,
    RecipientsRefused,
    Return,
    Step,
    StorageExceeded,
    Timeouts,
    TLSMode,
    connect,
    sendmail,
    submit,
)

reactor: Any = _reactor

pytestmark = [pytest.mark.postfix, pytest.mark.network]

QUICK = Timeouts(
    connect=5.0,
    greeting=10.0,
    command=10.0,
    mail=10.0,
    rcpt=10.0,
    data_start=10.0,
    data_block=20.0,
    data_end=30.0,
    quit=5.0,
)

ALICE_PLAIN = Authentication("alice", "s3cret", Mechanism.PLAIN)
ALICE_LOGIN = Authentication("alice", "s3cret", Mechanism.LOGIN)
TRACE_HEADERS = (b"return-path:", b"delivered-to:", b"x-original-to:", b"received:")


# -- helpers ------------------------------------------------------------------


@pytest.fixture
def postfix(postfix_peer: Any) -> Any:
    """The session's Postfix with an empty Maildir."""
    postfix_peer.clear_messages()
    return postfix_peer


def new_message(
    body: bytes = b"Hello from txcolombe.\r\n", *, to: str = "b@example.org"
) -> tuple[str, bytes]:
    """A token and a message with every header Postfix would otherwise add."""
    token = uuid.uuid4().hex
    headers = (
        "From: Alice <alice@example.org>\r\n"
        f"To: <{to}>\r\n"
        "Date: Mon, 24 Nov 2025 10:00:00 +0000\r\n"
        f"Message-ID: <{token}@example.org>\r\n"
        f"Subject: test {token}\r\n"
        "\r\n"
    )
    return token, headers.encode() + body


def split_trace(stored: bytes) -> tuple[list[bytes], bytes]:
    """Postfix's added trace headers (unfolded) and the message as sent."""
    added: list[bytes] = []
    position = 0
    while True:
        end = stored.index(b"\n", position) + 1
        line = stored[position:end]
        if line[:1] in (b" ", b"\t") and added:
            added[-1] += b" " + line.strip()
        elif line.lower().startswith(TRACE_HEADERS):
            added.append(line.strip())
        else:
            return added, stored[position:]
        position = end


def trace(added: list[bytes], name: str) -> list[bytes]:
    """The values of the added header ``name`` (e.g. ``Delivered-To``)."""
    prefix = name.lower().encode() + b":"
    return [h[len(prefix) :].strip() for h in added if h.lower().startswith(prefix)]


def as_stored(message: bytes) -> bytes:
    """What Postfix keeps of ``message``: the transported form with LF line ends."""
    return on_the_wire(message).replace(b"\r\n", b"\n")


async def delivered(peer: Any, token: str, count: int = 1, timeout: float = 20.0) -> list[bytes]:
    """The ``count`` copies of the message with this token, once all are delivered."""
    needle = f"<{token}@example.org>".encode()
    for _ in range(int(timeout / 0.05)):
        found = []
        for path in peer.message_paths():
            try:
                with path.open("rb") as file:
                    if needle in file.read(8192):
                        found.append(path.read_bytes())
            except FileNotFoundError:
                continue
        if len(found) >= count:
            assert len(found) == count, f"{len(found)} copies of {token}, wanted {count}"
            return found
        await deferLater(reactor, 0.05, lambda: None)
    raise AssertionError(f"{token} not delivered ({count} copies) in {timeout}s\n{peer.log_tail()}")


async def log_line(peer: Any, pattern: str, timeout: float = 10.0) -> re.Match[str]:
    """The first line of Postfix's log matching ``pattern`` (waiting for it)."""
    regex = re.compile(pattern, re.MULTILINE)
    for _ in range(int(timeout / 0.05)):
        try:
            match = regex.search(peer.log_path.read_text(errors="replace"))
        except FileNotFoundError:
            match = None
        if match is not None:
            return match
        await deferLater(reactor, 0.05, lambda: None)
    raise AssertionError(f"no log line matches {pattern!r}\n{peer.log_tail()}")


_MAIL = re.compile(r"MAIL FROM:<[^>]*>((?: [A-Z0-9-]+(?:=[^\s|]+)?)*)")


class ClientLog:
    """What txcolombe logged (namespace "txcolombe") while the test ran."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "txcolombe":
            self.lines.append(formatEvent(event))

    def mail_parameters(self) -> list[list[str]]:
        """The parameters of each MAIL command sent, e.g. ``[["BODY=8BITMIME"]]``.

        Relies only on the debug trace showing the commands sent, not on its layout.
        """
        return [m.group(1).split() for m in _MAIL.finditer("\n".join(self.lines))]


@pytest.fixture
def client_log() -> Iterator[ClientLog]:
    observer = ClientLog()
    globalLogPublisher.addObserver(observer)
    try:
        yield observer
    finally:
        globalLogPublisher.removeObserver(observer)


# -- TLS, AUTH and the three ports ------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_sendmail_starttls_to_smtp_port(
    postfix: Any, postfix_trust_root: twisted_ssl.Certificate
) -> None:
    token, message = new_message()
    receipt = await sendmail(
        "127.0.0.1",
        "alice@example.org",
        ["b@example.org"],
        message,
        port=postfix.ports.smtp,
        trust_root=postfix_trust_root,
        timeouts=QUICK,
    )
    assert receipt.tls is not None
    assert receipt.tls.implicit is False
    assert receipt.reply.code == 250
    assert receipt.reply.enhanced_status == (2, 0, 0)
    assert "PIPELINING" in receipt.extensions
    queue_id = receipt.queue_id
    assert queue_id is not None and re.fullmatch(r"[0-9A-Za-z]+", queue_id)
    [stored] = await delivered(postfix, token)
    added, rest = split_trace(stored)
    assert rest == as_stored(message)
    assert trace(added, "Return-Path") == [b"<alice@example.org>"]
    assert trace(added, "Delivered-To") == [b"b@example.org"]
    assert trace(added, "X-Original-To") == [b"b@example.org"]
    [received] = trace(added, "Received")
    assert f"with ESMTPS id {queue_id}".encode() in received
    await log_line(postfix, rf"/smtp/smtpd\[\d+\]: {queue_id}: client=localhost\[127\.0\.0\.1\]$")
    await log_line(postfix, rf"{queue_id}: to=<b@example\.org>, .*status=sent")


@pytest_twisted.ensureDeferred
async def test_submit_implicit_tls_auth_plain(
    postfix: Any, postfix_trust_root: twisted_ssl.Certificate
) -> None:
    token, message = new_message()
    receipt = await submit(
        "127.0.0.1",
        "alice@example.org",
        ["b@example.org"],
        message,
        port=postfix.ports.smtps,
        trust_root=postfix_trust_root,
        authentication=ALICE_PLAIN,
        timeouts=QUICK,
    )
    assert receipt.tls is not None
    assert receipt.tls.implicit is True
    queue_id = receipt.queue_id
    [stored] = await delivered(postfix, token)
    added, rest = split_trace(stored)
    assert rest == as_stored(message)
    [received] = trace(added, "Received")
    assert b"(Authenticated sender: alice)" in received
    assert f"with ESMTPSA id {queue_id}".encode() in received  # TLS and authenticated
    await log_line(
        postfix,
        rf"/smtps/smtpd\[\d+\]: {queue_id}: client=localhost\[127\.0\.0\.1\],"
        r" sasl_method=PLAIN, sasl_username=alice$",
    )


@pytest_twisted.ensureDeferred
async def test_submit_starttls_auth_login_to_submission_port(
    postfix: Any, postfix_trust_root: twisted_ssl.Certificate
) -> None:
    token, message = new_message()
    receipt = await submit(
        "127.0.0.1",
        "alice@example.org",
        ["b@example.org"],
        message,
        port=postfix.ports.submission,
        starttls=True,
        trust_root=postfix_trust_root,
        authentication=ALICE_LOGIN,
        timeouts=QUICK,
    )
    assert receipt.tls is not None
    assert receipt.tls.implicit is False
    assert {"PLAIN", "LOGIN"} <= receipt.extensions.auth_mechanisms
    queue_id = receipt.queue_id
    [stored] = await delivered(postfix, token)
    added, rest = split_trace(stored)
    assert rest == as_stored(message)
    [received] = trace(added, "Received")
    assert f"with ESMTPSA id {queue_id}".encode() in received
    await log_line(
        postfix,
        rf"/submission/smtpd\[\d+\]: {queue_id}: client=localhost\[127\.0\.0\.1\],"
        r" sasl_method=LOGIN, sasl_username=alice$",
    )


@pytest_twisted.ensureDeferred
async def test_auth_offered_only_after_starttls(
    postfix: Any, postfix_trust_root: twisted_ssl.Certificate
) -> None:
    plain = await connect(
        "127.0.0.1", port=postfix.ports.submission, tls_mode=TLSMode.NONE, timeouts=QUICK
    )
    try:
        assert plain.tls is None
        assert "STARTTLS" in plain.extensions
        assert "AUTH" not in plain.extensions
    finally:
        await plain.quit()
    upgraded = await connect(
        "127.0.0.1",
        port=postfix.ports.submission,
        tls_mode=TLSMode.REQUIRED,
        trust_root=postfix_trust_root,
        timeouts=QUICK,
    )
    try:
        assert upgraded.tls is not None
        assert "STARTTLS" not in upgraded.extensions
        assert {"PLAIN", "LOGIN"} <= upgraded.extensions.auth_mechanisms
    finally:
        await upgraded.quit()


@pytest_twisted.ensureDeferred
async def test_submission_port_refuses_unauthenticated(
    postfix: Any, postfix_trust_root: twisted_ssl.Certificate
) -> None:
    _, message = new_message()
    with pytest.raises(RecipientsRefused) as info:
        await submit(
            "127.0.0.1",
            "alice@example.org",
            ["b@example.org"],
            message,
            port=postfix.ports.submission,
            starttls=True,
            trust_root=postfix_trust_root,
            timeouts=QUICK,
        )
    [reply] = info.value.refused.values()
    assert (reply.code, reply.enhanced_status) == (554, (5, 7, 1))


# -- recipients -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_per_recipient_results(
    postfix: Any, postfix_trust_root: twisted_ssl.Certificate
) -> None:
    token, message = new_message()
    receipt = await sendmail(
        "127.0.0.1",
        "alice@example.org",
        [
            "one@example.org",
            "refuse@example.org",
            "later@example.org",
            "someone@elsewhere.example",
            "two@example.org",
        ],
        message,
        port=postfix.ports.smtp,
        trust_root=postfix_trust_root,
        timeouts=QUICK,
    )
    assert sorted(receipt.accepted) == ["one@example.org", "two@example.org"]
    refused = {r: (reply.code, reply.enhanced_status) for r, reply in receipt.refused.items()}
    assert refused == {
        "refuse@example.org": (550, (5, 1, 1)),
        "later@example.org": (450, (4, 2, 1)),
        "someone@elsewhere.example": (554, (5, 7, 1)),
    }
    assert "Relay access denied" in receipt.refused["someone@elsewhere.example"].text
    copies = await delivered(postfix, token, count=2)
    targets = sorted(b"".join(trace(split_trace(copy)[0], "Delivered-To")) for copy in copies)
    assert targets == [b"one@example.org", b"two@example.org"]
    assert all(split_trace(copy)[1] == as_stored(message) for copy in copies)


@pytest_twisted.ensureDeferred
async def test_null_sender(postfix: Any, postfix_trust_root: twisted_ssl.Certificate) -> None:
    token, message = new_message()
    receipt = await sendmail(
        "127.0.0.1",
        None,
        ["b@example.org"],
        message,
        port=postfix.ports.smtp,
        trust_root=postfix_trust_root,
        timeouts=QUICK,
    )
    [stored] = await delivered(postfix, token)
    added, rest = split_trace(stored)
    assert trace(added, "Return-Path") == [b"<>"]
    assert rest == as_stored(message)
    await log_line(postfix, rf"{receipt.queue_id}: from=<>, size=")


@pytest.mark.parametrize("all_or_nothing", [False, True])
@pytest_twisted.ensureDeferred
async def test_all_recipients_refused(
    postfix: Any, postfix_trust_root: twisted_ssl.Certificate, all_or_nothing: bool
) -> None:
    token, message = new_message()
    with pytest.raises(RecipientsRefused) as info:
        await sendmail(
            "127.0.0.1",
            "alice@example.org",
            ["refuse@example.org", "someone@elsewhere.example"],
            message,
            port=postfix.ports.smtp,
            trust_root=postfix_trust_root,
            all_or_nothing=all_or_nothing,
            timeouts=QUICK,
        )
    codes = {r: reply.code for r, reply in info.value.refused.items()}
    assert codes == {"refuse@example.org": 550, "someone@elsewhere.example": 554}
    assert info.value.temporary is False
    with pytest.raises(AssertionError):
        await delivered(postfix, token, timeout=0.5)


@pytest_twisted.ensureDeferred
async def test_all_or_nothing_refuses_partial(
    postfix: Any, postfix_trust_root: twisted_ssl.Certificate
) -> None:
    token, message = new_message()
    with pytest.raises(RecipientsRefused) as info:
        await sendmail(
            "127.0.0.1",
            "alice@example.org",
            ["one@example.org", "later@example.org"],
            message,
            port=postfix.ports.smtp,
            trust_root=postfix_trust_root,
            all_or_nothing=True,
            timeouts=QUICK,
        )
    assert list(info.value.refused) == ["later@example.org"]
    assert info.value.temporary is True
    with pytest.raises(AssertionError):
        await delivered(postfix, token, timeout=1.0)


@pytest_twisted.ensureDeferred
async def test_session_over_pipelining(
    postfix: Any, postfix_trust_root: twisted_ssl.Certificate
) -> None:
    tokens, receipts = [], []
    async with await connect(
        "127.0.0.1",
        port=postfix.ports.smtps,
        tls_mode=TLSMode.IMPLICIT,
        trust_root=postfix_trust_root,
        authentication=ALICE_PLAIN,
        timeouts=QUICK,
    ) as session:
        assert "PIPELINING" in session.extensions
        for i in range(3):
            token, message = new_message(b"message %d\r\n" % i)
            tokens.append(token)
            if i == 1:  # a refused transaction in the middle; the session goes on
                with pytest.raises(RecipientsRefused):
                    await session.send("alice@example.org", ["refuse@example.org"], message)
            receipts.append(await session.send("alice@example.org", ["b@example.org"], message))
    queue_ids = [r.queue_id for r in receipts]
    assert len(set(queue_ids)) == 3
    for token in tokens:
        await delivered(postfix, token)
    pids = set()
    for queue_id in queue_ids:
        match = await log_line(postfix, rf"/smtps/smtpd\[(\d+)\]: {queue_id}: client=")
        pids.add(match.group(1))
    assert len(pids) == 1  # one smtpd process: one connection


@pytest_twisted.ensureDeferred
async def test_session_queued_transactions(
    postfix: Any, postfix_trust_root: twisted_ssl.Certificate
) -> None:
    # Three sends queued at once: with PIPELINING each one's MAIL/RCPT/DATA
    # leave with the previous final dot; the refused one fails on its own.
    messages = [new_message(b"queued %d\r\n" % i) for i in range(3)]
    recipients = [["b@example.org"], ["refuse@example.org"], ["c@example.org"]]
    async with await connect(
        "127.0.0.1", port=postfix.ports.smtp, trust_root=postfix_trust_root, timeouts=QUICK
    ) as session:
        sent = [
            session.send("alice@example.org", rcpts, message)
            for (_, message), rcpts in zip(messages, recipients, strict=True)
        ]
        results = await DeferredList(sent, consumeErrors=True)
    (ok0, first), (ok1, refused), (ok2, last) = results
    assert (ok0, ok1, ok2) == (True, False, True)
    assert isinstance(refused.value, RecipientsRefused)
    assert list(refused.value.refused) == ["refuse@example.org"]
    assert first.queue_id != last.queue_id
    for (token, message), rcpts in ((messages[0], ["b"]), (messages[2], ["c"])):
        [stored] = await delivered(postfix, token)
        added, rest = split_trace(stored)
        assert rest == as_stored(message)
        assert trace(added, "Delivered-To") == [f"{rcpts[0]}@example.org".encode()]
    with pytest.raises(AssertionError):
        await delivered(postfix, messages[1][0], timeout=0.5)


# -- bodies -------------------------------------------------------------------------

TRICKY = (
    b".leading dot\r\n..two dots\r\n.\r\nline after a lone dot\r\n"
    b"bare LF\nmixed\r\n\r\n\r\n"
    b"caf\xc3\xa9 8-bit\r\n"
    b"no final line break"
)


@pytest_twisted.ensureDeferred
async def test_body_byte_exact(postfix: Any, postfix_trust_root: twisted_ssl.Certificate) -> None:
    token, message = new_message(TRICKY)
    await sendmail(
        "127.0.0.1",
        "alice@example.org",
        ["b@example.org"],
        message,
        port=postfix.ports.smtp,
        trust_root=postfix_trust_root,
        timeouts=QUICK,
    )
    [stored] = await delivered(postfix, token)
    assert split_trace(stored)[1] == as_stored(message)


@pytest_twisted.ensureDeferred
async def test_smtputf8_recipient(
    postfix: Any, postfix_trust_root: twisted_ssl.Certificate, client_log: ClientLog
) -> None:
    token, message = new_message("Grüße\r\n".encode(), to="josé@example.org")
    receipt = await sendmail(
        "127.0.0.1",
        "alice@example.org",
        ["josé@example.org"],
        message,
        port=postfix.ports.smtp,
        trust_root=postfix_trust_root,
        timeouts=QUICK,
    )
    assert list(receipt.accepted) == ["josé@example.org"]
    [mail] = client_log.mail_parameters()
    assert "SMTPUTF8" in mail
    [stored] = await delivered(postfix, token)
    added, rest = split_trace(stored)
    assert trace(added, "Delivered-To") == ["josé@example.org".encode()]
    assert rest == as_stored(message)


@pytest_twisted.ensureDeferred
async def test_20_mib_body_streamed_with_size(
    postfix: Any,
    postfix_trust_root: twisted_ssl.Certificate,
    tmp_path: Path,
    client_log: ClientLog,
) -> None:
    lines = (
        (b"." if i % 4 == 0 else b"") + b"%09d the quick brown fox jumps over the lazy dog" % i
        for i in range(20 * 1024 * 1024 // 55 + 1)
    )
    token, message = new_message(b"\r\n".join(lines) + b"\r\n")
    assert len(message) > 20 * 1024 * 1024
    path = tmp_path / "big.eml"
    path.write_bytes(message)
    with path.open("rb") as file:
        receipt = await submit(
            "127.0.0.1",
            "alice@example.org",
            ["b@example.org"],
            file,
            port=postfix.ports.smtps,
            trust_root=postfix_trust_root,
            authentication=ALICE_PLAIN,
            timeouts=QUICK,
        )
    assert receipt.extensions.size == POSTFIX_SIZE_LIMIT
    [mail] = client_log.mail_parameters()
    assert f"SIZE={len(message)}" in mail
    [stored] = await delivered(postfix, token, timeout=30.0)
    assert split_trace(stored)[1] == as_stored(message)
    await log_line(postfix, rf"{receipt.queue_id}: to=<b@example\.org>, .*status=sent")


@pytest_twisted.ensureDeferred
async def test_over_size_limit_known_length(
    postfix: Any, postfix_trust_root: twisted_ssl.Certificate, client_log: ClientLog
) -> None:
    # The length is known: the client refuses before MAIL, sending nothing.
    _, message = new_message(b"x" * 900 + b"\r\n")
    message += (b"y" * 998 + b"\r\n") * (POSTFIX_SIZE_LIMIT // 1000 + 1)
    with pytest.raises(MessageTooLarge) as info:
        await sendmail(
            "127.0.0.1",
            "alice@example.org",
            ["b@example.org"],
            message,
            port=postfix.ports.smtp,
            trust_root=postfix_trust_root,
            timeouts=QUICK,
        )
    assert info.value.step is Step.MAIL
    assert client_log.lines, "the client logged nothing: is its trace still on?"
    assert client_log.mail_parameters() == []


@pytest.mark.parametrize(
    ("chunking", "step"), [(False, Step.DATA_END), (None, Step.BODY)], ids=["DATA", "BDAT"]
)
@pytest_twisted.ensureDeferred
async def test_over_size_limit_streamed(
    postfix: Any,
    postfix_trust_root: twisted_ssl.Certificate,
    client_log: ClientLog,
    chunking: bool | None,
    step: Step,
) -> None:
    # Unknown length: no SIZE in MAIL. With DATA Postfix refuses at the end of
    # data; with BDAT it refuses the chunk that crosses the limit, and the
    # client stops reading the body there.
    token, head = new_message(b"")
    pulled = 0
    line = b"z" * 998 + b"\r\n"

    rounds = 4 * POSTFIX_SIZE_LIMIT // (len(line) * 256) + 2

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal pulled
        yield head
        for _ in range(rounds):
            pulled += 1
            yield line * 256

    with pytest.raises(StorageExceeded) as info:
        await sendmail(
            "127.0.0.1",
            "alice@example.org",
            ["b@example.org"],
            chunks(),
            port=postfix.ports.smtp,
            trust_root=postfix_trust_root,
            timeouts=QUICK,
            chunking=chunking,
        )
    assert info.value.code == 552
    assert info.value.enhanced_status == (5, 3, 4)
    assert info.value.step is step
    if step is Step.BODY:
        assert pulled < rounds, "the body was read to the end after BDAT was refused"
    [mail] = client_log.mail_parameters()
    assert "BODY=8BITMIME" in mail
    assert not any(p.startswith("SIZE=") for p in mail)
    with pytest.raises(AssertionError):
        await delivered(postfix, token, timeout=0.5)


# -- ESMTP extensions: CHUNKING, DSN, REQUIRETLS -------------------------------------


@pytest.mark.parametrize("chunking", [None, False], ids=["BDAT", "DATA"])
@pytest_twisted.ensureDeferred
async def test_bdat_and_data_deliver_the_same_bytes(
    postfix: Any,
    postfix_trust_root: twisted_ssl.Certificate,
    client_log: ClientLog,
    chunking: bool | None,
) -> None:
    body = b"".join(b".dot %d\r\n.\r\nplain line\r\n" % i for i in range(40000))
    token, message = new_message(body)
    receipt = await sendmail(
        "127.0.0.1",
        "alice@example.org",
        ["b@example.org"],
        message,
        port=postfix.ports.smtp,
        trust_root=postfix_trust_root,
        timeouts=QUICK,
        chunking=chunking,
    )
    assert "CHUNKING" in receipt.extensions
    [stored] = await delivered(postfix, token)
    assert split_trace(stored)[1] == as_stored(message)
    conversation = "\n".join(client_log.lines)
    if chunking is None:
        assert "BDAT" in conversation and "> DATA" not in conversation
        assert conversation.count("BDAT") >= 3, "a 1 MB body should take several chunks"
    else:
        assert "BDAT" not in conversation and "> DATA" in conversation


@pytest_twisted.ensureDeferred
async def test_dsn_success_notification(
    postfix: Any, postfix_trust_root: twisted_ssl.Certificate, client_log: ClientLog
) -> None:
    # NOTIFY=SUCCESS for b: Postfix sends alice (a local mailbox) a delivery
    # status notification carrying our ENVID and ORCPT; NEVER for c: none.
    envid = f"env+{uuid.uuid4().hex}"
    _, message = new_message(b"dsn\r\n")
    receipt = await sendmail(
        "127.0.0.1",
        "alice@example.org",
        [Recipient("b@example.org", notify={Notify.SUCCESS}), "c@example.org"],
        message,
        port=postfix.ports.smtp,
        trust_root=postfix_trust_root,
        timeouts=QUICK,
        dsn=DSN(ret=Return.HDRS, envid=envid, notify=frozenset({Notify.NEVER}), orcpt=True),
    )
    assert set(receipt.accepted) == {"b@example.org", "c@example.org"}
    [mail] = client_log.mail_parameters()
    assert "RET=HDRS" in mail and f"ENVID=env+2B{envid[4:]}" in mail
    conversation = "\n".join(client_log.lines)
    assert "RCPT TO:<b@example.org> NOTIFY=SUCCESS ORCPT=rfc822;b@example.org" in conversation
    assert "RCPT TO:<c@example.org> NOTIFY=NEVER ORCPT=rfc822;c@example.org" in conversation
    for _ in range(100):
        reports = [m for m in postfix.messages() if f"Original-Envelope-Id: {envid}".encode() in m]
        if reports:
            break
        await deferLater(reactor, 0.1, lambda: None)
    [report] = reports
    assert b"Original-Recipient: rfc822;b@example.org" in report
    assert b"Action: delivered" in report
    assert b"rfc822;c@example.org" not in report


@pytest_twisted.ensureDeferred
async def test_requiretls_not_offered_is_a_clear_error(
    postfix: Any, postfix_trust_root: twisted_ssl.Certificate
) -> None:
    # Postfix 3.7 does not implement REQUIRETLS: the client refuses locally.
    with pytest.raises(ExtensionUnavailable) as info:
        await sendmail(
            "127.0.0.1",
            "alice@example.org",
            ["b@example.org"],
            b"x\r\n",
            port=postfix.ports.smtp,
            trust_root=postfix_trust_root,
            timeouts=QUICK,
            requiretls=True,
        )
    assert info.value.extension == "REQUIRETLS"


# -- SASL: SCRAM-SHA-256 against Dovecot ----------------------------------------------


@pytest_twisted.ensureDeferred
async def test_scram_chosen_and_verified_with_dovecot(
    postfix: Any, postfix_trust_root: twisted_ssl.Certificate
) -> None:
    # No mechanism named: the strongest offered (SCRAM-SHA-256) is chosen, and
    # the session only succeeds if Dovecot's server signature checks out.
    token, message = new_message()
    receipt = await submit(
        "127.0.0.1",
        "alice@example.org",
        ["b@example.org"],
        message,
        port=postfix.ports.smtps,
        trust_root=postfix_trust_root,
        authentication=Authentication("alice", "s3cret"),
        timeouts=QUICK,
    )
    assert "SCRAM-SHA-256" in receipt.extensions.auth_mechanisms
    await log_line(
        postfix,
        rf"/smtps/smtpd\[\d+\]: {receipt.queue_id}: client=localhost\[127\.0\.0\.1\],"
        r" sasl_method=SCRAM-SHA-256, sasl_username=alice$",
    )
    await delivered(postfix, token)


@pytest_twisted.ensureDeferred
async def test_scram_wrong_password_with_dovecot(
    postfix: Any, postfix_trust_root: twisted_ssl.Certificate
) -> None:
    _, message = new_message()
    with pytest.raises(AuthenticationFailed) as info:
        await submit(
            "127.0.0.1",
            "alice@example.org",
            ["b@example.org"],
            message,
            port=postfix.ports.smtps,
            trust_root=postfix_trust_root,
            authentication=Authentication("alice", "wrong", Mechanism.SCRAM_SHA_256),
            timeouts=QUICK,
        )
    assert info.value.code == 535
    assert info.value.step is Step.AUTH


# -- failed authentication, last: Dovecot delays every later AUTH from the same
# address after a failure (its anvil "auth penalty", 2 s then 4 s...), unless
# the peer's dovecot.conf disables it.


@pytest.mark.parametrize(
    ("port", "authentication"),
    [("submission", ALICE_LOGIN), ("smtps", ALICE_PLAIN)],
)
@pytest_twisted.ensureDeferred
async def test_wrong_password(
    postfix: Any,
    postfix_trust_root: twisted_ssl.Certificate,
    port: str,
    authentication: Authentication,
) -> None:
    _, message = new_message()
    wrong = Authentication(authentication.username, "wrong", authentication.mechanism)
    with pytest.raises(AuthenticationFailed) as info:
        await submit(
            "127.0.0.1",
            "alice@example.org",
            ["b@example.org"],
            message,
            port=getattr(postfix.ports, port),
            starttls=port == "submission",
            trust_root=postfix_trust_root,
            authentication=wrong,
            timeouts=QUICK,
        )
    assert info.value.code == 535
    assert info.value.enhanced_status == (5, 7, 8)
    assert info.value.step is Step.AUTH


@pytest_twisted.ensureDeferred
async def test_more_than_100_recipients_in_several_transactions(
    postfix: Any, postfix_trust_root: twisted_ssl.Certificate
) -> None:
    # RFC 5321 §4.5.3.1.8: 100 a transaction is what every server must take.
    token, message = new_message()
    people = [f"bulk{i}@example.org" for i in range(130)]
    receipt = await sendmail(
        "127.0.0.1",
        "alice@example.org",
        people,
        message,
        port=postfix.ports.smtp,
        trust_root=postfix_trust_root,
        timeouts=QUICK,
    )
    assert sorted(receipt.accepted) == sorted(people)
    assert [len(part.accepted) for part in receipt.parts] == [100, 30]
    assert len({part.queue_id for part in receipt.parts}) == 2  # two queue files
    copies = await delivered(postfix, token, count=130)
    targets = {b"".join(trace(split_trace(copy)[0], "Delivered-To")) for copy in copies}
    assert targets == {p.encode() for p in people}
