"""The relay with the private Postfix as its smarthost: implicit TLS on the
``smtps`` port with AUTH PLAIN, STARTTLS on the ``submission`` port with AUTH
LOGIN. Clients nobody here wrote (smtplib) send into ``twistd smtprelay``;
what lands in Postfix's Maildir is compared byte for byte.

Postfix stores LF line endings and prepends Return-Path, X-Original-To,
Delivered-To and its own Received; under those comes the relay's one
Received header, then the message exactly as the client sent it.
"""

from __future__ import annotations

import json
import re
import smtplib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.conftest import on_the_wire
from tools.peers.aiosmtpd_peer import free_port
from tools.peers.relay_process import RelayProcess, wait_for

#: What Postfix puts on top of a message it delivers.
POSTFIX_TRACE = (b"return-path:", b"x-original-to:", b"delivered-to:")

BODY = (
    b".leading dot, stuffed on the way\r\n"
    b"..two dots\r\n"
    b"\r\n"
    b"8-bit: \xc3\xa9t\xc3\xa9 \xe2\x9c\x93\r\n" + b"x" * 998 + b"\r\n"
    b"From the start of a line\r\n"
    b"last line\r\n"
)


def new_message(to: str = "b@example.org") -> tuple[str, bytes]:
    """A token and a message with every header Postfix would otherwise add."""
    token = uuid.uuid4().hex
    headers = (
        "From: Alice <a@client.test>\r\n"
        f"To: <{to}>\r\n"
        "Date: Mon, 24 Nov 2025 10:00:00 +0000\r\n"
        f"Message-ID: <{token}@client.test>\r\n"
        f"Subject: relay test {token}\r\n"
        "\r\n"
    )
    return token, headers.encode() + BODY


def fields(data: bytes) -> list[bytes]:
    """The header fields of ``data`` (LF line ends), folded lines kept together."""
    out: list[bytes] = []
    for line in data.split(b"\n"):
        if not line:
            break
        if line[:1] in (b" ", b"\t") and out:
            out[-1] += b"\n" + line
        else:
            out.append(line)
    return out


def split_stored(stored: bytes) -> tuple[list[bytes], bytes, bytes]:
    """Postfix's trace fields (with its Received), the relay's Received field,
    and the rest: the message as the client sent it."""
    all_fields = fields(stored)
    postfix = []
    index = 0
    while all_fields[index].lower().startswith(POSTFIX_TRACE):
        postfix.append(all_fields[index])
        index += 1
    assert all_fields[index].startswith(b"Received: "), all_fields[index]
    postfix.append(all_fields[index])  # Postfix's own, on top of ours
    ours = all_fields[index + 1]
    assert ours.startswith(b"Received: from client.test "), ours
    offset = sum(len(f) + 1 for f in all_fields[: index + 2])
    return postfix, ours, stored[offset:]


def value(trace: list[bytes], name: bytes) -> list[bytes]:
    prefix = name.lower() + b":"
    return [f[len(prefix) :].strip() for f in trace if f.lower().startswith(prefix)]


def in_maildir(peer: Any, token: str, count: int = 1, timeout: float = 20) -> list[bytes]:
    needle = f"<{token}@client.test>".encode()

    def found() -> list[bytes]:
        copies = []
        for path in peer.message_paths():
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue
            if needle in data[:8192]:
                copies.append(data)
        return copies

    wait_for(lambda: len(found()) >= count, timeout, f"{token} in Postfix's Maildir")
    copies = found()
    assert len(copies) == count, f"{len(copies)} copies of {token}"
    return copies


@pytest.fixture
def postfix(postfix_peer: Any) -> Any:
    postfix_peer.clear_messages()
    return postfix_peer


@pytest.fixture
def smarthost_files(tmp_path: Path, postfix_ca: trustme.CA) -> tuple[Path, Path]:
    ca = tmp_path / "postfix-ca.pem"
    postfix_ca.cert_pem.write_to_path(str(ca))
    creds = tmp_path / "smarthost.cred"
    creds.write_text("alice:s3cret\n")
    creds.chmod(0o600)
    return ca, creds


def start_relay(
    tmp_path: Path, port: int, tls: str, mechanism: str, files: tuple[Path, Path]
) -> RelayProcess:
    ca, creds = files
    args = [
        f"--smarthost=127.0.0.1:{port}",
        f"--smarthost-tls={tls}",
        f"--smarthost-ca={ca}",
        f"--smarthost-auth={creds}",
        f"--smarthost-auth-mechanism={mechanism}",
        "--log-format=json",
        "--min-backoff=1",
    ]
    return RelayProcess(tmp_path, free_port(), args).start()


@pytest.fixture
def relay_465(
    tmp_path: Path, postfix: Any, smarthost_files: tuple[Path, Path]
) -> Iterator[RelayProcess]:
    relay = start_relay(tmp_path, postfix.ports.smtps, "implicit", "PLAIN", smarthost_files)
    try:
        yield relay
    finally:
        relay.stop()


@pytest.fixture
def relay_587(
    tmp_path: Path, postfix: Any, smarthost_files: tuple[Path, Path]
) -> Iterator[RelayProcess]:
    relay = start_relay(tmp_path, postfix.ports.submission, "starttls", "LOGIN", smarthost_files)
    try:
        yield relay
    finally:
        relay.stop()


def delivery_lines(relay: RelayProcess) -> list[dict[str, Any]]:
    lines = []
    for line in relay.log_text().splitlines():
        if "txcolombe.relay#info" in line and '"status": "delivered"' in line:
            lines.append(json.loads(line.split("] ", 1)[1]))
    return lines


def postfix_log_after(peer: Any, offset: int) -> str:
    text: str = peer.log_path.read_text(errors="replace")
    return text[offset:]


def log_size(peer: Any) -> int:
    try:
        return len(peer.log_path.read_text(errors="replace"))
    except FileNotFoundError:
        return 0


def check_one(
    peer: Any, relay: RelayProcess, token: str, message: bytes, port_name: str, mechanism: str
) -> None:
    (stored,) = in_maildir(peer, token)
    postfix_trace, ours, rest = split_stored(stored)
    # the message itself: byte for byte (Postfix keeps LF line ends)
    assert rest == on_the_wire(message).replace(b"\r\n", b"\n")
    # the relay's one Received header, then Postfix's, by an authenticated TLS client
    assert re.fullmatch(
        rb"Received: from client\.test \(\[127\.0\.0\.1\]\)\n"
        rb"\tby relay\.test \(txcolombe\) with ESMTP id [0-9A-F]{20}\n"
        rb"\tfor <b@example\.org>; \w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d \+0000",
        ours,
    ), ours
    assert stored.count(b"\nReceived: ") + stored.startswith(b"Received: ") == 2
    assert value(postfix_trace, b"Return-Path") == [b"<a@client.test>"]
    assert value(postfix_trace, b"Delivered-To") == [b"b@example.org"]
    (postfix_received,) = value(postfix_trace, b"Received")
    assert b"(Authenticated sender: alice)" in postfix_received
    assert b"with ESMTPSA id " in postfix_received  # TLS and AUTH
    # Postfix logged the relay's login with the mechanism asked for
    (line,) = [d for d in delivery_lines(relay) if d["to"] == "b@example.org"]
    assert line["relay"] == f"127.0.0.1[{getattr(peer.ports, port_name)}]"
    queue_id = re.search(r"queued as (\w+)", line["reply"])
    assert queue_id is not None, line
    pattern = (
        rf"/{port_name}/smtpd\[\d+\]: {queue_id.group(1)}: client=localhost\[127\.0\.0\.1\],"
        rf" sasl_method={mechanism}, sasl_username=alice$"
    )
    wait_for(
        lambda: re.search(pattern, peer.log_path.read_text(errors="replace"), re.M) is not None,
        10,
        f"Postfix's log line for {queue_id.group(1)}",
    )


def test_smarthost_465_implicit_tls_auth_plain(postfix: Any, relay_465: RelayProcess) -> None:
    token, message = new_message()
    with smtplib.SMTP("127.0.0.1", relay_465.port, "client.test", timeout=10) as client:
        assert client.sendmail("a@client.test", ["b@example.org"], message) == {}
    check_one(postfix, relay_465, token, message, "smtps", "PLAIN")
    wait_for(lambda: "Mail queue is empty" in relay_465.control("list").stdout, 10, "empty queue")


def test_smarthost_587_starttls_auth_login_pipelined_on_one_session(
    postfix: Any, relay_587: RelayProcess
) -> None:
    start = log_size(postfix)
    messages = [new_message() for _ in range(12)]
    with smtplib.SMTP("127.0.0.1", relay_587.port, "client.test", timeout=10) as client:
        for _, message in messages:
            assert client.sendmail("a@client.test", ["b@example.org"], message) == {}
    for token, message in messages:
        (stored,) = in_maildir(postfix, token)
        _, ours, rest = split_stored(stored)
        assert rest == on_the_wire(message).replace(b"\r\n", b"\n")
        assert b"\tfor <b@example.org>; " in ours
    stats = json.loads(relay_587.control("--json", "stats").stdout)
    assert stats["delivered"] == 12 and stats["received"] == 12
    # one session carried them (the relay pipelines its transactions)
    log = postfix_log_after(postfix, start)
    logins = re.findall(r"/submission/smtpd\[\d+\]: \w+: client=localhost\[127\.0\.0\.1\],"
                        r" sasl_method=LOGIN, sasl_username=alice$", log, re.M)  # fmt: skip
    assert len(logins) == 12
    connects = re.findall(r"/submission/smtpd\[\d+\]: connect from ", log)
    assert 1 <= len(connects) <= 2, connects


def test_smarthost_587_refusals_bounce_and_defer(postfix: Any, relay_587: RelayProcess) -> None:
    """Postfix's 550 and 450 at RCPT: a bounce to the sender, a deferral."""
    token, message = new_message()
    with smtplib.SMTP("127.0.0.1", relay_587.port, "client.test", timeout=10) as client:
        refused = client.sendmail(
            "b@example.org", ["refuse-me@example.org", "later@example.org"], message
        )
        assert refused == {}  # the relay took responsibility for both
    # the sender (an @example.org mailbox, so in the Maildir) gets one DSN
    wait_for(lambda: len(postfix.message_paths()) == 1, 20, "the bounce")
    (bounce,) = postfix.messages()
    _, _, rest = split_stored_bounce(bounce)
    for line in (
        b"Final-Recipient: rfc822; refuse-me@example.org",
        b"Action: failed",
        b"Status: 5.1.1",
        b"Reporting-MTA: dns; relay.test",
    ):
        assert line in rest, line
    assert b"later@example.org" not in rest.split(b"message/delivery-status")[1].split(b"\n--")[0]
    listing = json.loads(relay_587.control("--json", "list").stdout)
    (item,) = [i for i in listing if i["sender"] == "b@example.org"]
    assert item["pending"] == ["later@example.org"] and "450 4.2.1" in item["last_error"]
    assert token  # the original's id names it in the bounce's headers
    assert f"<{token}@client.test>".encode() in rest


def split_stored_bounce(stored: bytes) -> tuple[list[bytes], bytes, bytes]:
    """A bounce is made by the relay: Postfix's trace, then the DSN (no client Received)."""
    all_fields = fields(stored)
    index = 0
    while all_fields[index].lower().startswith((*POSTFIX_TRACE, b"received:")):
        index += 1
    offset = sum(len(f) + 1 for f in all_fields[:index])
    return all_fields[:index], b"", stored[offset:]
