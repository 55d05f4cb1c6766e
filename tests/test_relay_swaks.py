"""swaks (a client nobody here wrote) into ``twistd -n smtprelay``: STARTTLS and
implicit TLS with AUTH PLAIN/LOGIN, AUTH refused before TLS, bare LF refused,
byte-exact delivery to the aiosmtpd smarthost; and startup errors for bad files."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import trustme

from tests.conftest import on_the_wire
from tests.test_relay_e2e import (  # noqa: F401 (fixtures)
    BODY,
    SWAKS,
    intake_ca,
    peer,
    relay,
    relay_args,
    split_received,
    strict_relay,
)
from tools.peers.aiosmtpd_peer import AiosmtpdPeer, free_port
from tools.peers.relay_process import ROOT, RelayProcess, wait_for

pytestmark = pytest.mark.skipif(not os.access(SWAKS, os.X_OK), reason="needs swaks")


def swaks(port: int, *args: str, to: str = "x@far.example") -> subprocess.CompletedProcess[str]:
    """One swaks run against 127.0.0.1:``port``; bounded by swaks' and our timeouts."""
    command = [
        SWAKS, "--server", f"127.0.0.1:{port}", "--from", "a@example.com", "--to", to,
        "--helo", "client.test", "--timeout", "10", *args,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def verified_tls(tmp_path: Path) -> list[str]:
    """swaks verifies the relay's certificate against the test CA."""
    return ["--tls-verify", "--tls-ca-path", str(tmp_path / "relay-ca.pem")]


def auth(mechanism: str, password: str = "hunter2") -> list[str]:
    return ["--auth", mechanism, "--auth-user", "bob", "--auth-password", password]


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_starttls_auth_relays_byte_exact(
    strict_relay: RelayProcess,  # noqa: F811
    peer: AiosmtpdPeer,  # noqa: F811
    tmp_path: Path,
    mechanism: str,
) -> None:
    """Only an authenticated client may relay here (loopback is not trusted)."""
    data = tmp_path / "message.eml"
    data.write_bytes(BODY[:-2])  # swaks ends DATA with CRLF "." itself
    done = swaks(
        strict_relay.port, "--tls", *verified_tls(tmp_path), *auth(mechanism),
        "--data", f"@{data}",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert " -> STARTTLS" in done.stdout and "=== TLS started" in done.stdout
    assert "<~  250 AUTH PLAIN LOGIN" in done.stdout  # offered inside TLS only
    assert f" ~> AUTH {mechanism}" in done.stdout and "<~  235 " in done.stdout
    assert "queued as" in done.stdout
    wait_for(lambda: len(peer.received) == 1, 10, "the delivery")
    got = peer.received[0]
    assert got.sender == "a@example.com" and got.recipients == ["x@far.example"]
    received, rest = split_received(got.data)
    assert rest == on_the_wire(BODY)  # swaks' dot-stuffing undone, nothing else changed
    assert got.data.count(b"Received:") == 1
    assert received.startswith(b"Received: from client.test ([127.0.0.1])\r\n\t(using TLSv1.")
    assert b" with cipher " in received and b")\r\n\tby relay.test" in received
    assert b"with ESMTPSA id" in received and b"for <x@far.example>" in received
    assert b"bob" not in received


def test_wrong_password_is_refused(
    strict_relay: RelayProcess,  # noqa: F811
    peer: AiosmtpdPeer,  # noqa: F811
    tmp_path: Path,
) -> None:
    done = swaks(strict_relay.port, "--tls", *verified_tls(tmp_path), *auth("PLAIN", "wrong"))
    assert done.returncode != 0 and "<~* 535 " in done.stdout
    assert "MAIL FROM" not in done.stdout
    assert not list((strict_relay.spool / "queue").glob("*.msg"))
    # --tls-verify means something: another CA's certificate is not accepted
    other = swaks(strict_relay.port, "--tls", "--tls-verify", "--tls-ca-path", str(peer.ca_pem))
    assert other.returncode != 0 and "=== TLS started" not in other.stdout


def test_auth_not_offered_before_tls(
    strict_relay: RelayProcess,  # noqa: F811
    peer: AiosmtpdPeer,  # noqa: F811
) -> None:
    done = swaks(strict_relay.port, *auth("PLAIN"))
    assert done.returncode != 0
    ehlo = done.stdout.split("-> EHLO client.test", 1)[1].split("\n-> ", 1)[0]
    assert "STARTTLS" in ehlo and "AUTH" not in ehlo  # the EHLO reply, before TLS
    assert "Host did not advertise authentication" in done.stdout + done.stderr
    assert "-> AUTH" not in done.stdout and "MAIL FROM" not in done.stdout
    # and without --auth, loopback is no trusted network here: no open relay
    denied = swaks(strict_relay.port)
    assert denied.returncode != 0 and "<** 554 5.7.1" in denied.stdout


def test_tls_on_connect_listener(
    tmp_path: Path,
    peer: AiosmtpdPeer,  # noqa: F811
    intake_ca: trustme.CA,  # noqa: F811
) -> None:
    tls_port = free_port()
    args = relay_args(
        tmp_path, peer, f"--listen=ssl:port={tls_port}:interface=127.0.0.1",
        "--relay-network=192.0.2.0/24",
    )  # fmt: skip
    with RelayProcess(tmp_path, free_port(), args):
        done = swaks(tls_port, "--tls-on-connect", *verified_tls(tmp_path), *auth("LOGIN"))
        assert done.returncode == 0, done.stdout + done.stderr
        assert "STARTTLS" not in done.stdout and "<~  235 " in done.stdout
        wait_for(lambda: len(peer.received) == 1, 10, "the delivery")
    received, _ = split_received(peer.received[0].data)
    assert b"with ESMTPSA id" in received


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"Subject: x\r\n\r\nbare\nLF\r\n.", "<** 550 5.5.2"),
        (b"Subject: x\r\n\r\nbare\rCR\r\n.", "<** 550 5.5.2"),
    ],
)
def test_bare_line_ends_refused(
    relay: RelayProcess,  # noqa: F811
    peer: AiosmtpdPeer,  # noqa: F811
    tmp_path: Path,
    data: bytes,
    expected: str,
) -> None:
    """--no-data-fixup: swaks sends the file as it is (it would otherwise turn
    every bare LF into CRLF), then CRLF."""
    message = tmp_path / "smuggle.eml"
    message.write_bytes(data)
    done = swaks(relay.port, "--to", "b@example.org", "--no-data-fixup", "--data", f"@{message}")
    assert done.returncode != 0 and expected in done.stdout, done.stdout
    assert "queued as" not in done.stdout
    assert not list((relay.spool / "queue").glob("*.msg"))
    assert peer.received == []


BAD_FILES = ["tls-cert", "tls-key", "users", "smarthost-auth", "smarthost-ca"]


@pytest.mark.parametrize("option", BAD_FILES)
@pytest.mark.parametrize("bad", ["missing", "directory", "unreadable"])
def test_bad_file_is_a_clean_usage_error(
    tmp_path: Path,
    peer: AiosmtpdPeer,  # noqa: F811
    intake_ca: trustme.CA,  # noqa: F811
    option: str,
    bad: str,
) -> None:
    path = tmp_path / f"bad-{option}"
    if bad == "directory":
        path.mkdir()
    elif bad == "unreadable":
        if os.geteuid() == 0:
            pytest.skip("root reads a mode 000 file")
        path.write_text("x")
        path.chmod(0)
    args = [a for a in relay_args(tmp_path, peer) if not a.startswith(f"--{option}=")]
    process = RelayProcess(tmp_path, free_port(), [*args, f"--{option}={path}"])
    done = subprocess.run(
        process.command(), capture_output=True, text=True, timeout=60, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert done.returncode != 0
    assert "Traceback" not in done.stdout + done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.endswith(f"--{option} {path}: cannot read: " + {
        "missing": "No such file or directory",
        "directory": "Is a directory",
        "unreadable": "Permission denied",
    }[bad]), last  # fmt: skip
    assert not process.spool.exists()  # stopped before anything was set up


def test_late_usage_error_is_clean(tmp_path: Path) -> None:
    """Found only when the service is built (a malformed credentials file)."""
    creds = tmp_path / "smarthost.cred"
    creds.write_text("no colon here\n")
    process = RelayProcess(
        tmp_path, free_port(), ["--smarthost=127.0.0.1:2525", f"--smarthost-auth={creds}"]
    )
    done = subprocess.run(
        process.command(), capture_output=True, text=True, timeout=60, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert done.returncode != 0 and "Traceback" not in done.stdout + done.stderr
    assert f"{creds}: expected one line 'user:password'" in done.stderr
