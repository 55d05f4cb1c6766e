"""The relay end to end: swaks and smtplib in, the relay (``twistd -n smtprelay``
as a child process) out to an aiosmtpd smarthost with STARTTLS and AUTH."""

from __future__ import annotations

import base64
import json
import smtplib
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.conftest import on_the_wire
from tools.peers.aiosmtpd_peer import AiosmtpdPeer, free_port
from tools.peers.relay_process import ROOT, TWISTD, RelayProcess, wait_for
from txcolombe.relay.passwords import set_user

SWAKS = "/usr/bin/swaks"


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[AiosmtpdPeer]:
    with AiosmtpdPeer(tmp_path) as running:
        yield running


@pytest.fixture
def intake_ca(tmp_path: Path) -> trustme.CA:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    (tmp_path / "relay-cert.pem").write_bytes(b"".join(b.bytes() for b in cert.cert_chain_pems))
    (tmp_path / "relay-key.pem").write_bytes(cert.private_key_pem.bytes())
    ca.cert_pem.write_to_path(str(tmp_path / "relay-ca.pem"))
    return ca


def relay_args(tmp_path: Path, peer: AiosmtpdPeer, *extra: str) -> list[str]:
    creds = tmp_path / "smarthost.cred"
    creds.write_text("alice:s3cret\n")
    creds.chmod(0o600)
    users = tmp_path / "users"
    set_user(users, "bob", "hunter2")
    return [
        f"--smarthost=127.0.0.1:{peer.starttls_port}",
        "--smarthost-tls=starttls",
        f"--smarthost-ca={peer.ca_pem}",
        f"--smarthost-auth={creds}",
        f"--tls-cert={tmp_path / 'relay-cert.pem'}",
        f"--tls-key={tmp_path / 'relay-key.pem'}",
        f"--users={users}",
        "--max-size=20000",
        "--max-recipients=5",
        "--min-backoff=1",
        "--log-format=json",
        *extra,
    ]


@pytest.fixture
def relay(tmp_path: Path, peer: AiosmtpdPeer, intake_ca: trustme.CA) -> Iterator[RelayProcess]:
    with RelayProcess(tmp_path, free_port(), relay_args(tmp_path, peer)) as running:
        yield running


@pytest.fixture
def strict_relay(
    tmp_path: Path, peer: AiosmtpdPeer, intake_ca: trustme.CA
) -> Iterator[RelayProcess]:
    """Loopback is not a trusted network here: relaying needs AUTH."""
    args = relay_args(tmp_path, peer, "--relay-network=192.0.2.0/24")
    with RelayProcess(tmp_path, free_port(), args) as running:
        yield running


def split_received(data: bytes) -> tuple[bytes, bytes]:
    """The first (folded) Received field, and the rest."""
    assert data.startswith(b"Received: ")
    end = data.index(b"\r\n")
    while data[end + 2 : end + 3] in (b"\t", b" "):
        end = data.index(b"\r\n", end + 2)
    return data[: end + 2], data[end + 2 :]


BODY = (
    "From: a@example.com\r\nTo: b@example.org\r\nSubject: héllo\r\n\r\n"
    ".leading dot\r\n..two dots\r\n\r\nlast line ünïcode\r\n"
).encode()


def test_smtplib_in_aiosmtpd_out_byte_exact(relay: RelayProcess, peer: AiosmtpdPeer) -> None:
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        code, text = client.ehlo("client.test")
        assert code == 250 and b"SMTPUTF8" in text and b"PIPELINING" in text
        assert b"AUTH" not in text  # not before TLS
        refused = client.sendmail("a@example.com", ["b@example.org", "c@example.org"], BODY)
        assert refused == {}
    wait_for(lambda: len(peer.received) == 1, 10, "the delivery")
    got = peer.received[0]
    assert got.sender == "a@example.com" and got.recipients == ["b@example.org", "c@example.org"]
    assert got.tls and got.login == "alice"
    received, rest = split_received(got.data)
    assert rest == on_the_wire(BODY)  # nothing else changed
    assert received.startswith(b"Received: from client.test ([127.0.0.1])\r\n\tby relay.test")
    assert b"with ESMTP id " in received and b"for <" not in received  # two recipients
    assert got.data.count(b"Received:") == 1
    wait_for(lambda: "Mail queue is empty" in relay.control("list").stdout, 10, "an empty queue")
    stats = json.loads(relay.control("--json", "stats").stdout)
    assert stats["received"] == 1 and stats["delivered"] == 2 and stats["queue_size"] == 0
    lines = [
        json.loads(line.split("] ", 1)[1])
        for line in relay.log_text().splitlines()
        if "txcolombe.relay#info" in line and '"id"' in line
    ]
    delivered = [line for line in lines if line.get("status") == "delivered"]
    assert {line["to"] for line in delivered} == {"b@example.org", "c@example.org"}
    assert all("relay" in line and "delay" in line and "reply" in line for line in delivered)


def test_swaks_starttls_auth_and_no_open_relay(
    strict_relay: RelayProcess, peer: AiosmtpdPeer, tmp_path: Path
) -> None:
    base = [
        SWAKS,
        "--server",
        f"127.0.0.1:{strict_relay.port}",
        "--from",
        "a@example.com",
        "--to",
        "x@far.example",
        "--helo",
        "client.test",
        "--timeout",
        "10",
    ]
    denied = subprocess.run(base, capture_output=True, text=True, timeout=30)
    assert denied.returncode != 0 and "554 5.7.1" in denied.stdout
    # AUTH is refused before TLS, with 538, and not advertised
    with smtplib.SMTP("127.0.0.1", strict_relay.port, timeout=10) as client:
        client.ehlo("client.test")
        assert not client.has_extn("auth")
        code, _ = client.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0bob\0hunter2").decode())
        assert code == 538
    # swaks runs in plaintext here; tests/test_relay_swaks.py covers it over TLS with AUTH.
    context = ssl.create_default_context(cafile=str(tmp_path / "relay-ca.pem"))
    with smtplib.SMTP("127.0.0.1", strict_relay.port, timeout=10) as client:
        client.starttls(context=context)
        client.ehlo("client.test")
        assert client.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
        with pytest.raises(smtplib.SMTPAuthenticationError) as failed:
            client.login("bob", "wrong")
        assert failed.value.smtp_code == 535
    for mechanism in ("PLAIN", "LOGIN"):
        with smtplib.SMTP("127.0.0.1", strict_relay.port, timeout=10) as client:
            client.starttls(context=context)
            client.ehlo("client.test")
            client.user, client.password = "bob", "hunter2"
            code, _ = client.auth(mechanism, getattr(client, f"auth_{mechanism.lower()}"))
            assert code == 235
            client.sendmail("a@example.com", ["x@far.example"], BODY)
    wait_for(lambda: len(peer.received) == 2, 10, "two deliveries")
    for got in peer.received:
        received, _ = split_received(got.data)
        assert b"with ESMTPSA id" in received and b"for <x@far.example>" in received
        assert b"bob" not in received  # no credentials, not even the name


def raw_session(port: int, commands: bytes) -> bytes:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(commands)
        sock.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
    return out


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"Subject: x\r\n\r\nbare\nLF\r\n", b"550 5.5.2"),
        (b"Subject: x\r\n\r\nbare\rCR\r\n", b"550 5.5.2"),
        (b"Subject: x\r\n\r\n" + b"y" * 999 + b"\r\n", b"550 5.5.6"),
        (b"Subject: x\r\n\r\n" + (b"y" * 900 + b"\r\n") * 30, b"552 5.3.4"),
        (b"Received: from a\r\n" * 100 + b"\r\nloop\r\n", b"554 5.4.6"),
    ],
)
def test_rejections_over_the_wire(
    relay: RelayProcess, peer: AiosmtpdPeer, data: bytes, expected: bytes
) -> None:
    out = raw_session(
        relay.port,
        b"EHLO c.test\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
        + data
        + b".\r\nQUIT\r\n",
    )
    assert expected in out and b"queued as" not in out
    assert not list((relay.spool / "queue").glob("*.msg"))


def test_size_and_recipient_limits(relay: RelayProcess) -> None:
    rcpts = b"".join(b"RCPT TO:<r%d@example.org>\r\n" % i for i in range(6))
    out = raw_session(
        relay.port,
        b"EHLO c.test\r\nMAIL FROM:<a@example.com> SIZE=20001\r\n"
        b"MAIL FROM:<a@example.com> SIZE=100\r\n" + rcpts + b"QUIT\r\n",
    )
    lines = out.split(b"\r\n")
    assert b"552 5.3.4 Message size exceeds fixed limit" in lines
    assert lines.count(b"250 2.1.5 Ok") == 5 and b"452 4.5.3 Error: too many recipients" in lines


def test_refused_recipient_bounces_to_sender_from_null(
    relay: RelayProcess, peer: AiosmtpdPeer
) -> None:
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        client.sendmail("a@example.com", ["refuse-me@example.org", "b@example.org"], BODY)
        client.sendmail("<>", ["refuse-too@example.org"], BODY)  # never bounced
    wait_for(lambda: len(peer.received) == 2, 10, "delivery and bounce")
    delivered, bounce = sorted(peer.received, key=lambda r: r.sender in ("", "<>"))
    assert delivered.recipients == ["b@example.org"]
    assert bounce.sender in ("", "<>") and bounce.recipients == ["a@example.com"]
    for field in (
        b"Action: failed",
        b"Status: 5.1.1",
        b"Final-Recipient: rfc822; refuse-me@example.org",
        b"Diagnostic-Code: smtp; 550 5.1.1 No such user here",
        b"Reporting-MTA: dns; relay.test",
        b"Subject: h\xc3\xa9llo",
    ):
        assert field in bounce.data, field
    wait_for(lambda: "Mail queue is empty" in relay.control("list").stdout, 10, "an empty queue")
    assert len(peer.received) == 2


def test_queue_commands_on_a_deferred_message(relay: RelayProcess, peer: AiosmtpdPeer) -> None:
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        client.sendmail("a@example.com", ["later@example.org"], BODY)
    wait_for(lambda: "450 4.2.1" in relay.control("list").stdout, 10, "a deferral")
    listing = json.loads(relay.control("--json", "list").stdout)
    (item,) = listing
    qid = item["id"]
    assert item["sender"] == "a@example.com" and item["recipients"] == ["later@example.org"]
    shown = json.loads(relay.control("--json", "show", qid).stdout)
    assert "Subject:" in shown["headers"] and shown["recipient_state"][0]["status"] == "pending"
    assert relay.control("hold", qid).returncode == 0
    assert json.loads(relay.control("--json", "list").stdout)[0]["state"] == "held"
    assert relay.control("release", qid).returncode == 0
    assert relay.control("flush").returncode == 0
    assert relay.control("delete", qid).returncode == 0
    wait_for(lambda: "Mail queue is empty" in relay.control("list").stdout, 10, "an empty queue")
    # removals are not waited for: done within the spool's REMOVAL_DELAY
    wait_for(lambda: not list((relay.spool / "queue").glob(f"{qid}.*")), 5, "the files removed")
    assert relay.control("show", qid).returncode == 1


def test_plugin_help_documents_every_option() -> None:
    out = subprocess.run(
        [str(TWISTD), "smtprelay", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    ).stdout
    for option in (
        "--listen",
        "--tls-cert",
        "--tls-key",
        "--users",
        "--relay-network",
        "--smarthost",
        "--smarthost-auth",
        "--spool",
        "--max-size",
        "--max-recipients",
        "--min-backoff",
        "--max-backoff",
        "--queue-lifetime",
        "--log-format",
        "--config",
        "--smarthost-auth-mechanism",
        "--dns-server",
        "--mx-port",
    ):
        assert option in out, option


def test_config_file_and_defaults(tmp_path: Path) -> None:
    from txcolombe.relay.options import DEFAULT_LISTEN, Options

    config = tmp_path / "relay.toml"
    config.write_text('max_size = 1234\nlisten = ["tcp:port=2999:interface=127.0.0.1"]\n')
    options = Options()
    options.parseOptions(["--config", str(config), "--max-recipients", "7"])
    assert options["max-size"] == 1234 and options["max-recipients"] == 7
    assert options["listen"] == ["tcp:port=2999:interface=127.0.0.1"]
    defaults = Options()
    defaults.parseOptions([])
    assert defaults["listen"] == [DEFAULT_LISTEN] and "127.0.0.1" in DEFAULT_LISTEN
    assert defaults["spool"] == "smtprelay-spool" and defaults["min-backoff"] == 300


def test_implicit_tls_listener(tmp_path: Path, peer: AiosmtpdPeer, intake_ca: trustme.CA) -> None:
    tls_port = free_port()
    args = relay_args(tmp_path, peer, f"--listen=ssl:port={tls_port}:interface=127.0.0.1")
    with RelayProcess(tmp_path, free_port(), args):
        context = ssl.create_default_context(cafile=str(tmp_path / "relay-ca.pem"))
        with smtplib.SMTP_SSL("127.0.0.1", tls_port, context=context, timeout=10) as client:
            client.ehlo("client.test")
            assert client.has_extn("auth") and not client.has_extn("starttls")
            client.login("bob", "hunter2")
            client.sendmail("a@example.com", ["b@example.org"], BODY)
        wait_for(lambda: len(peer.received) == 1, 10, "the delivery")
        assert b"with ESMTPSA" in peer.received[0].data
