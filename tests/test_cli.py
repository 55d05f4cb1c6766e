"""The ``txcolombe send`` command line and ``tools/demo.py``, end to end.

Each test runs the command as a subprocess (``react()`` ends the process)
against aiosmtpd on loopback (:class:`~tools.peers.aiosmtpd_peer.AiosmtpdPeer`),
with a timeout, and checks the exit status, the output and what the server
received.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tools.peers.aiosmtpd_peer import AiosmtpdPeer, Received, free_port
from txcolombe.cli import (
    EXIT_INTERRUPTED,
    EXIT_PARTIAL,
    EXIT_PERMANENT,
    EXIT_TEMPORARY,
    EXIT_USAGE,
    describe_error,
)
from txcolombe.codec.errors import AuthenticationFailed, ConnectionRefused, Step
from txcolombe.codec.reply import Reply

pytestmark = pytest.mark.network

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 60


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AiosmtpdPeer]:
    with AiosmtpdPeer(tmp_path_factory.mktemp("peer"), users={"alice": "s3cret"}) as running:
        yield running


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    path = tmp_path / "password"
    path.write_text("s3cret\nthe second line is ignored\n")
    return path


def run(
    *args: str, stdin: bytes = b"", timeout: float = TIMEOUT
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.run(
        [sys.executable, "-m", "txcolombe", *args],
        input=stdin,
        capture_output=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
        check=False,
    )
    return subprocess.CompletedProcess(
        process.args,
        process.returncode,
        process.stdout.decode("utf-8", "replace"),
        process.stderr.decode("utf-8", "replace"),
    )


def send(peer: AiosmtpdPeer, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[str]:
    """``txcolombe send`` to the STARTTLS port, trusting the peer's CA."""
    return run(
        "send",
        "--server", "127.0.0.1",
        "--port", str(peer.starttls_port),
        "--ca-file", str(peer.ca_pem),
        "--helo", "client.example.com",
        "--timeout", "5",
        *args,
        stdin=stdin,
    )  # fmt: skip


def message(tag: str) -> bytes:
    return (
        f"From: alice@example.com\r\nTo: bob@example.org\r\nSubject: {tag}\r\n"
        f"Message-ID: <{tag}@example.com>\r\n\r\nHello {tag}.\r\n.leading dot\r\n"
    ).encode()


def unique() -> str:
    return f"cli-{uuid.uuid4().hex[:12]}"


def received(peer: AiosmtpdPeer, tag: str) -> list[Received]:
    with peer.lock:
        return [m for m in peer.received if tag.encode() in m.data]


def test_send_from_stdin(peer: AiosmtpdPeer) -> None:
    tag = unique()
    result = send(peer, "--from", "alice@example.com", "--to", "bob@example.org",
                  stdin=message(tag))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "accepted <bob@example.org>: 250 2.1.5 OK" in result.stdout
    assert "message: 250 2.0.0 OK queued as AIO" in result.stdout
    assert "queue id: AIO" in result.stdout
    assert "tls: TLSv1." in result.stdout and "(STARTTLS)" in result.stdout
    assert result.stderr == ""
    [got] = received(peer, tag)
    assert got.sender == "alice@example.com"
    assert got.recipients == ["bob@example.org"]
    assert got.data == message(tag)
    assert got.tls


def test_send_by_host_name_with_auth_and_body_file(
    peer: AiosmtpdPeer, password_file: Path, tmp_path: Path
) -> None:
    tag = unique()
    body = tmp_path / "message.eml"
    body.write_bytes(message(tag))
    result = run(
        "send", "--server", "localhost", "--port", str(peer.starttls_port),
        "--ca-file", str(peer.ca_pem), "--helo", "client.example.com",
        "--from", "alice@example.com", "--to", "bob@example.org", "--to", "carol@example.org",
        "--user", "alice", "--password-file", str(password_file), "--body", str(body),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "accepted <bob@example.org>" in result.stdout
    assert "accepted <carol@example.org>" in result.stdout
    [got] = received(peer, tag)
    assert got.login == "alice"
    assert got.recipients == ["bob@example.org", "carol@example.org"]
    assert got.data == message(tag)


def test_submit_implicit_tls_auth_login(peer: AiosmtpdPeer, password_file: Path) -> None:
    tag = unique()
    result = run(
        "send", "--mode", "submit", "--server", "127.0.0.1", "--port", str(peer.tls_port),
        "--ca-file", str(peer.ca_pem), "--helo", "client.example.com",
        "--from", "alice@example.com", "--to", "bob@example.org",
        "--user", "alice", "--password-file", str(password_file), "--mechanism", "login",
        stdin=message(tag),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "(implicit TLS)" in result.stdout
    [got] = received(peer, tag)
    assert got.login == "alice" and got.tls


def test_implicit_tls_on_a_starttls_port_suggests_starttls(peer: AiosmtpdPeer) -> None:
    result = send(
        peer, "--mode", "submit", "--from", "alice@example.com", "--to", "bob@example.org"
    )
    assert result.returncode != 0
    assert "wrong version number" in result.stderr
    assert "hint: " in result.stderr and "--starttls" in result.stderr


def test_submit_with_starttls(peer: AiosmtpdPeer, password_file: Path) -> None:
    tag = unique()
    result = send(
        peer, "--mode", "submit", "--starttls", "--from", "alice@example.com",
        "--to", "bob@example.org", "--user", "alice", "--password-file", str(password_file),
        stdin=message(tag),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "(STARTTLS)" in result.stdout
    assert received(peer, tag)[0].login == "alice"


def test_ca_file_may_hold_several_certificates(peer: AiosmtpdPeer, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(trustme.CA().cert_pem.bytes() + peer.ca_pem.read_bytes())
    result = run(
        "send", "--server", "127.0.0.1", "--port", str(peer.starttls_port),
        "--ca-file", str(bundle), "--helo", "client.example.com",
        "--from", "alice@example.com", "--to", "bob@example.org", stdin=message(unique()),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "(STARTTLS)" in result.stdout


def test_plaintext_sendmail(peer: AiosmtpdPeer) -> None:
    tag = unique()
    result = send(peer, "--no-starttls", "--from", "", "--to", "bob@example.org",
                  stdin=message(tag))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "tls: none (plaintext)" in result.stdout
    [got] = received(peer, tag)
    assert not got.tls
    assert got.sender in ("", "<>")  # the null sender (aiosmtpd records "<>")


def test_refused_recipient_exits_3(peer: AiosmtpdPeer) -> None:
    tag = unique()
    result = send(
        peer, "--from", "alice@example.com", "--to", "bob@example.org",
        "--to", "refuse-me@example.org", stdin=message(tag),
    )  # fmt: skip
    assert result.returncode == EXIT_PARTIAL == 3, result.stderr
    assert "accepted <bob@example.org>: 250 2.1.5 OK" in result.stdout
    assert "refused <refuse-me@example.org>: 550 5.1.1 No such user here" in result.stdout
    assert received(peer, tag)[0].recipients == ["bob@example.org"]


def test_all_or_nothing_sends_nothing(peer: AiosmtpdPeer) -> None:
    tag = unique()
    result = send(
        peer, "--all-or-nothing", "--from", "alice@example.com", "--to", "bob@example.org",
        "--to", "refuse-me@example.org", stdin=message(tag),
    )  # fmt: skip
    assert result.returncode == EXIT_PERMANENT, result.stderr
    assert "error: RecipientsRefused at RCPT" in result.stderr
    assert "refused <refuse-me@example.org>: 550 5.1.1" in result.stdout
    assert received(peer, tag) == []


def test_every_recipient_refused_for_now_is_temporary(peer: AiosmtpdPeer) -> None:
    result = send(peer, "--from", "alice@example.com", "--to", "later@example.org",
                  stdin=message(unique()))  # fmt: skip
    assert result.returncode == EXIT_TEMPORARY == 75, result.stderr
    assert "error: RecipientsRefused at RCPT" in result.stderr
    assert "450 4.2.1" in result.stdout


def test_wrong_password_exits_1(peer: AiosmtpdPeer, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password\n")
    tag = unique()
    result = send(
        peer, "--from", "alice@example.com", "--to", "bob@example.org",
        "--user", "alice", "--password-file", str(wrong), stdin=message(tag),
    )  # fmt: skip
    assert result.returncode == EXIT_PERMANENT == 1
    [line] = result.stderr.splitlines()
    assert line.startswith("error: AuthenticationFailed at AUTH: 535 5.7.8 ")
    assert result.stdout == ""
    assert received(peer, tag) == []


def test_connection_refused_exits_75() -> None:
    result = run(
        "send", "--server", "127.0.0.1", "--port", str(free_port()), "--timeout", "5",
        "--helo", "client.example.com", "--from", "alice@example.com", "--to", "bob@example.org",
    )  # fmt: skip
    assert result.returncode == EXIT_TEMPORARY
    assert "error: ConnectionRefused at connect: " in result.stderr


def test_untrusted_certificate_is_a_tls_failure(peer: AiosmtpdPeer) -> None:
    result = run(
        "send", "--server", "127.0.0.1", "--port", str(peer.starttls_port), "--timeout", "5",
        "--helo", "client.example.com", "--from", "alice@example.com", "--to", "bob@example.org",
    )  # fmt: skip
    # Not temporary: retrying changes nothing until the certificate or the CA does.
    assert result.returncode == EXIT_PERMANENT
    assert "error: TLSFailure at " in result.stderr
    assert "certificate verify failed" in result.stderr


def test_verbose_shows_the_conversation_without_credentials(
    peer: AiosmtpdPeer, password_file: Path
) -> None:
    result = send(
        peer, "-v", "--from", "alice@example.com", "--to", "bob@example.org",
        "--user", "alice", "--password-file", str(password_file), stdin=message(unique()),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "> EHLO client.example.com" in result.stderr
    assert "> STARTTLS" in result.stderr
    assert "> AUTH PLAIN ****" in result.stderr
    assert "< 235 " in result.stderr
    assert "> RCPT TO:<bob@example.org>" in result.stderr
    assert "s3cret" not in result.stderr
    assert "AGFsaWNlAHMzY3JldA==" not in result.stderr  # base64 of \0alice\0s3cret


def test_large_body_is_streamed_intact(peer: AiosmtpdPeer, tmp_path: Path) -> None:
    tag = unique()
    line = b"x" * 76 + b"\r\n"
    data = message(tag) + line * 60_000  # about 4.7 MB
    body = tmp_path / "big.eml"
    body.write_bytes(data)
    result = send(peer, "--from", "alice@example.com", "--to", "bob@example.org",
                  "--body", str(body))  # fmt: skip
    assert result.returncode == 0, result.stderr
    [got] = received(peer, tag)
    assert got.data == data


def test_progress_shows_bytes_and_rate(peer: AiosmtpdPeer, tmp_path: Path) -> None:
    tag = unique()
    data = message(tag) + (b"y" * 998 + b"\r\n") * 3_000  # about 2.9 MiB
    body = tmp_path / "big.eml"
    body.write_bytes(data)
    result = send(peer, "--from", "alice@example.com", "--to", "bob@example.org",
                  "--body", str(body), "--progress")  # fmt: skip
    assert result.returncode == 0, result.stderr
    [got] = received(peer, tag)
    assert got.data == data
    # Not a terminal: plain lines, the last one at the whole size.
    lines = [line for line in result.stderr.splitlines() if "MiB/s" in line]
    assert lines, result.stderr
    assert lines[-1].startswith("2.9 MiB of 2.9 MiB sent (100%), ")


def test_no_progress_unless_asked_off_a_terminal(peer: AiosmtpdPeer) -> None:
    tag = unique()
    result = send(peer, "--from", "alice@example.com", "--to", "bob@example.org",
                  stdin=message(tag))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "MiB" not in result.stderr


def _silent_listener() -> socket.socket:
    """A loopback server that accepts connections and never says a word."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(5)
    return listener


def test_timeout_covers_a_silent_server() -> None:
    listener = _silent_listener()
    try:
        started = time.monotonic()
        result = run(
            "send", "--server", "127.0.0.1", "--port", str(listener.getsockname()[1]),
            "--timeout", "1", "--helo", "client.example.com",
            "--from", "alice@example.com", "--to", "bob@example.org",
        )  # fmt: skip
        elapsed = time.monotonic() - started
    finally:
        listener.close()
    assert result.returncode == EXIT_TEMPORARY
    assert "error: ResponseTimeout at greeting" in result.stderr
    assert elapsed < 20  # the greeting's own default is 5 minutes


def test_ctrl_c_reports_an_interruption() -> None:
    listener = _silent_listener()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-m", "txcolombe", "send", "--server", "127.0.0.1",
         "--port", str(listener.getsockname()[1]), "--helo", "client.example.com",
         "--from", "alice@example.com", "--to", "bob@example.org"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=env,
    )  # fmt: skip
    try:
        listener.settimeout(TIMEOUT)
        connection, _ = listener.accept()  # the send is under way: its handler is set
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=TIMEOUT)
        connection.close()
    finally:
        listener.close()
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == EXIT_INTERRUPTED == 130
    assert b"interrupted" in stderr
    assert b"Traceback" not in stderr


def test_an_overlong_line_is_a_usage_error(peer: AiosmtpdPeer) -> None:
    body = message(unique()) + b"x" * 2000 + b"\r\n"
    result = send(peer, "--from", "alice@example.com", "--to", "bob@example.org", stdin=body)
    assert result.returncode == EXIT_USAGE
    assert "InvalidBody" in result.stderr


# -- usage errors: exit 2, nothing sent --------------------------------------------


def test_missing_to_is_a_usage_error() -> None:
    result = run("send", "--server", "127.0.0.1", "--from", "alice@example.com")
    assert result.returncode == EXIT_USAGE == 2
    assert "--to" in result.stderr


def test_missing_command_is_a_usage_error() -> None:
    assert run().returncode == EXIT_USAGE


def test_user_without_password_file_and_no_terminal(peer: AiosmtpdPeer) -> None:
    result = send(peer, "--from", "alice@example.com", "--to", "bob@example.org",
                  "--user", "alice", stdin=b"")  # fmt: skip
    assert result.returncode == EXIT_USAGE
    assert "--password-file" in result.stderr
    assert "not a terminal" in result.stderr


def test_no_password_option(peer: AiosmtpdPeer) -> None:
    result = send(peer, "--from", "a@example.com", "--to", "b@example.org", "--password", "x")
    assert result.returncode == EXIT_USAGE


@pytest.mark.parametrize(
    ("option", "value", "complaint"),
    [
        ("--to", "not an address", "no local part and domain"),
        ("--body", "/nonexistent/message.eml", "cannot open the message"),
        ("--ca-file", "/nonexistent/ca.pem", "cannot read the CA file"),
        ("--password-file", "/nonexistent/password", "needs --user"),
        ("--port", "70000", "port out of range"),
        ("--timeout", "-1", "must be positive"),
        ("--mechanism", "XOAUTH2", "invalid choice"),
    ],
)
def test_bad_option_values(peer: AiosmtpdPeer, option: str, value: str, complaint: str) -> None:
    result = run(
        "send", "--server", "127.0.0.1", "--from", "alice@example.com",
        "--to", "bob@example.org", option, value,
    )  # fmt: skip
    assert result.returncode == EXIT_USAGE, result.stderr
    assert complaint in result.stderr


def test_auth_in_plaintext_is_refused_up_front(password_file: Path) -> None:
    result = run(
        "send", "--server", "127.0.0.1", "--no-starttls", "--from", "alice@example.com",
        "--to", "bob@example.org", "--user", "alice", "--password-file", str(password_file),
    )  # fmt: skip
    assert result.returncode == EXIT_USAGE
    assert "--no-starttls" in result.stderr


def test_help_lists_the_exit_statuses() -> None:
    result = run("send", "--help")
    assert result.returncode == 0
    for text in ("--server", "--password-file", "--ca-file", "EX_TEMPFAIL", "  3   "):
        assert text in result.stdout


# -- the error line -------------------------------------------------------------------


def test_describe_error_with_a_reply() -> None:
    error = AuthenticationFailed(
        "authentication refused",
        reply=Reply.of(535, "5.7.8 authentication failed"),
        step=Step.AUTH,
    )
    assert describe_error(error) == "AuthenticationFailed at AUTH: 535 5.7.8 authentication failed"


def test_describe_error_without_a_reply() -> None:
    error = ConnectionRefused("192.0.2.1 port 25 refused the connection", step=Step.CONNECT)
    assert describe_error(error) == (
        "ConnectionRefused at connect: 192.0.2.1 port 25 refused the connection"
    )


def test_describe_error_multiline_reply() -> None:
    error = AuthenticationFailed(
        "x", reply=Reply.of(535, "5.7.8 first", "5.7.8 second"), step=Step.AUTH
    )
    assert describe_error(error) == "AuthenticationFailed at AUTH: 535 5.7.8 first / second"


# -- the demo -----------------------------------------------------------------------------


def test_demo_runs_direct_and_relayed_deliveries() -> None:
    process = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "demo.py")],
        capture_output=True,
        timeout=90,
        cwd=ROOT,
        check=False,
        text=True,
    )
    out = process.stdout
    assert process.returncode == 0, out + process.stderr
    # (a) and (b): straight to aiosmtpd
    assert "txcolombe.sendmail()" in out and "txcolombe.submit()" in out
    assert "queued as AIO00001" in out and "queued as AIO00002" in out
    assert "refused   <refuse-me@example.org>: 550 5.1.1" in out
    assert "(STARTTLS)" in out and "(implicit TLS)" in out
    assert "message 1: envelope, TLS, login and all" in out
    assert "message 2: envelope, TLS, login and all" in out
    # (c) and (d): through twistd smtprelay, which forwards to aiosmtpd
    assert "==> starting our relay: twistd -n smtprelay" in out
    assert "txcolombe.relay.passwords --stdin" in out
    assert "(c) txcolombe.sendmail() to our relay" in out
    assert "(d) txcolombe.submit() to our relay" in out
    queue_ids = re.findall(r"final reply: 250 2\.0\.0 Ok: queued as (\S+)", out)
    assert len(queue_ids) == 2 and len(set(queue_ids)) == 2, out
    for queue_id in queue_ids:
        assert f"with ESMTPSA id {queue_id}" in out  # the relay's Received: header
        assert re.search(
            rf"{queue_id}: to=<\S+>, relay=127\.0\.0\.1\[\d+\], .*status=delivered, "
            r"reply=\(250 2\.0\.0 OK queued as AIO0000[34]\)",
            out,
        ), out
    assert out.count("| Received: from client.example.com ([127.0.0.1])") == 2
    assert out.count("TLS: yes, authenticated as: alice") == 4  # the relay too, as alice
    for label in ("(c)", "(d)"):
        assert re.search(
            rf"message [34] {re.escape(label)}: envelope, TLS, login, the relay's Received: "
            r"header \(id \S+\) and all \d+ octets sent match",
            out,
        ), out
    assert "the relay shut down cleanly on SIGTERM" in out
    assert "error lines (odd)" not in out
    assert "==> stopping aiosmtpd" in out
    assert out.rstrip().endswith("arrived intact")
    assert process.stderr == ""
    [workdir] = re.findall(r"\(\$WORK is (\S+)\)", out)
    assert not Path(workdir).exists()  # temporary files removed
