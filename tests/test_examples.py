"""The programs in examples/ run, as subprocesses, against aiosmtpd on loopback.

Each test starts :class:`~tools.peers.aiosmtpd_peer.AiosmtpdPeer` (STARTTLS
on one port, implicit TLS on another, user ``alice``/``s3cret``, recipients
``refuse*`` refused with 550), runs an example with a timeout, and checks
what it printed and what the server received.
"""

from __future__ import annotations

import email
import email.policy
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tools.peers.aiosmtpd_peer import AiosmtpdPeer

pytestmark = pytest.mark.network

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
TIMEOUT = 60


def run_example(name: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name), *map(str, args)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    path = tmp_path / "password"
    path.write_text("s3cret\n")
    return path


def auth_args(peer: AiosmtpdPeer, password_file: Path) -> list[str | Path]:
    return ["--user", "alice", "--password-file", password_file, "--ca-file", peer.ca_pem]


# -- send_attachment.py -------------------------------------------------------------------


def test_send_attachment_submit_with_auth(
    aiosmtpd_peer: AiosmtpdPeer, password_file: Path, tmp_path: Path
) -> None:
    attachment = tmp_path / "report.pdf"
    attachment.write_bytes(bytes(range(256)) * 300)
    done = run_example(
        "send_attachment.py",
        "--server", "127.0.0.1", "--port", aiosmtpd_peer.tls_port, "--mode", "submit",
        "--from", "alice@example.com", "--to", "bob@example.org",
        "--subject", "The report", "--attach", attachment,
        *auth_args(aiosmtpd_peer, password_file),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "accepted bob@example.org: 250" in done.stdout
    assert "queued as AIO00001 (TLS" in done.stdout
    [received] = aiosmtpd_peer.received
    assert received.login == "alice" and received.tls
    assert received.recipients == ["bob@example.org"]
    message = email.message_from_bytes(received.data, policy=email.policy.default)
    assert message["Subject"] == "The report"
    [part] = list(message.iter_attachments())  # type: ignore[attr-defined]
    assert part.get_filename() == "report.pdf"
    assert part.get_content_type() == "application/pdf"
    assert part.get_content() == attachment.read_bytes()


def test_send_attachment_sendmail_with_a_refused_recipient(
    aiosmtpd_peer: AiosmtpdPeer, tmp_path: Path
) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("one\ntwo\n")
    done = run_example(
        "send_attachment.py",
        "--server", "127.0.0.1", "--port", aiosmtpd_peer.starttls_port, "--mode", "sendmail",
        "--from", "alice@example.com", "--to", "bob@example.org", "--to", "refuse@example.org",
        "--attach", notes, "--ca-file", aiosmtpd_peer.ca_pem, "--ehlo", "client.example.com",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "refused refuse@example.org: 550 No such user here" in done.stdout
    [received] = aiosmtpd_peer.received
    assert received.recipients == ["bob@example.org"] and received.tls and received.login is None


def test_send_attachment_wrong_password(aiosmtpd_peer: AiosmtpdPeer, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("nope")
    done = run_example(
        "send_attachment.py",
        "--server", "127.0.0.1", "--port", aiosmtpd_peer.tls_port,
        "--from", "alice@example.com", "--to", "bob@example.org",
        "--user", "alice", "--password-file", wrong, "--ca-file", aiosmtpd_peer.ca_pem,
    )  # fmt: skip
    assert done.returncode == 1
    assert "not sent:" in done.stderr and "535" in done.stderr
    assert aiosmtpd_peer.received == []


# -- bulk_send.py -------------------------------------------------------------------------


def test_bulk_send_over_one_connection(
    aiosmtpd_peer: AiosmtpdPeer, password_file: Path, tmp_path: Path
) -> None:
    listing = tmp_path / "list.txt"
    addresses = [f"reader{n}@example.org" for n in range(30)]
    addresses[7] = "refuse7@example.org"
    listing.write_text("# readers\n" + "\n".join(addresses) + "\n")
    done = run_example(
        "bulk_send.py",
        "--server", "127.0.0.1", "--port", aiosmtpd_peer.starttls_port,
        "--from", "news@example.com", "--recipients", listing, "--window", "8",
        *auth_args(aiosmtpd_peer, password_file),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "29 sent, 1 refused, 0 failed, 30 in all" in done.stdout
    assert "over 1 connection(s)" in done.stdout
    assert "[" + "#" * 30 + "] 30/30 sent 29 refused 1 failed 0" in done.stderr
    assert "refused refuse7@example.org" in done.stderr
    received = aiosmtpd_peer.received
    assert sorted(r.recipients[0] for r in received) == sorted(
        a for a in addresses if not a.startswith("refuse")
    )
    assert all(r.login == "alice" and r.tls for r in received)


def test_bulk_send_reports_failures(aiosmtpd_peer: AiosmtpdPeer) -> None:
    # Implicit TLS to the STARTTLS port: no connection works; it says so and exits 1.
    done = run_example(
        "bulk_send.py",
        "--server", "127.0.0.1", "--port", aiosmtpd_peer.starttls_port, "--implicit-tls",
        "--from", "news@example.com", "--count", "3", "--ca-file", aiosmtpd_peer.ca_pem,
    )  # fmt: skip
    assert done.returncode == 1
    assert "0 sent, 0 refused, 3 failed, 3 in all" in done.stdout
    assert aiosmtpd_peer.received == []


# -- web_endpoint.py ------------------------------------------------------------------------


@pytest.fixture
def web_endpoint(aiosmtpd_peer: AiosmtpdPeer, password_file: Path) -> Iterator[str]:
    """The example's web server, started on a free loopback port; its base URL."""
    process = subprocess.Popen(
        [
            sys.executable, str(EXAMPLES / "web_endpoint.py"),
            "--listen", "tcp:0:interface=127.0.0.1",
            "--server", "127.0.0.1", "--port", str(aiosmtpd_peer.tls_port), "--implicit-tls",
            "--from", "app@example.com",
            "--user", "alice", "--password-file", str(password_file),
            "--ca-file", str(aiosmtpd_peer.ca_pem),
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    lines: queue.Queue[str] = queue.Queue()
    assert process.stdout is not None
    threading.Thread(target=lambda: [lines.put(ln) for ln in process.stdout], daemon=True).start()  # type: ignore[union-attr]
    try:
        try:
            first = lines.get(timeout=TIMEOUT)
        except queue.Empty:
            pytest.fail("web_endpoint.py did not start")
        assert first.startswith("listening on "), first
        yield f"http://127.0.0.1:{int(first.split()[-1])}"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def post(url: str, body: bytes) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=body, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_web_endpoint_sends_on_post(aiosmtpd_peer: AiosmtpdPeer, web_endpoint: str) -> None:
    for n in range(3):
        message = {"to": f"bob{n}@example.org", "subject": f"Hi {n}", "text": "Hello."}
        status, answer = post(f"{web_endpoint}/send", json.dumps(message).encode())
        assert status == 202, answer
        assert answer["accepted"] == [f"bob{n}@example.org"] and answer["queued_as"]
    status, answer = post(f"{web_endpoint}/send", b"{not json")
    assert status == 400 and "bad request" in answer["error"]
    status, answer = post(f"{web_endpoint}/send", b'{"subject": "no recipient"}')
    assert status == 400
    status, answer = post(f"{web_endpoint}/send", b'{"to": "refuse@example.org"}')
    assert status == 502 and "550" in answer["error"] and answer["temporary"] is False
    status, answer = post(f"{web_endpoint}/send", b'{"to": "bad address"}')
    assert status == 400
    received = aiosmtpd_peer.received
    assert [r.recipients for r in received] == [[f"bob{n}@example.org"] for n in range(3)]
    subjects = [email.message_from_bytes(r.data)["Subject"] for r in received]
    assert subjects == ["Hi 0", "Hi 1", "Hi 2"]
    assert all(r.login == "alice" and r.tls for r in received)
