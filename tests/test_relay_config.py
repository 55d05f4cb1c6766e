"""Starting ``twistd smtprelay``: one relay per spool, and every configuration
mistake is one line on stderr with exit status 2 (real twistd processes)."""

from __future__ import annotations

import json
import os
import smtplib
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tools.peers.aiosmtpd_peer import free_port
from tools.peers.relay_process import ROOT, TWISTD, RelayProcess, port_open
from txcolombe.relay.options import Options


def run_twistd(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``twistd -n ... smtprelay ARGS`` to its end (for starts that must fail)."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    command = [str(TWISTD), "-n", f"--logfile={cwd / 'bad.log'}", "smtprelay", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def assert_one_line_exit_2(result: subprocess.CompletedProcess[str]) -> str:
    """Exit status 2, one line on stderr, no traceback, no ``--help`` dump."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "--help" not in result.stdout and "Options:" not in result.stdout, result.stdout
    return lines[0]


class PidRelay(RelayProcess):
    """A relay that writes a pid file, like a production twistd."""

    def command(self) -> list[str]:
        command = super().command()
        command[command.index("--pidfile=")] = f"--pidfile={self.workdir / 'twistd.pid'}"
        return command


@pytest.fixture
def queued_relay(tmp_path: Path) -> Iterator[PidRelay]:
    """A relay with one message held in its queue (the smarthost port is closed)."""
    args = [f"--smarthost=127.0.0.1:{free_port()}", "--smarthost-tls=none", "--min-backoff=600"]
    with PidRelay(tmp_path, free_port(), args) as relay:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
            client.sendmail("a@example.com", ["b@example.net"], b"Subject: held\r\n\r\nbody\r\n")
        yield relay


def queue_ids(relay: RelayProcess) -> list[str]:
    """The ids the relay's control socket lists (so: the queue still answers)."""
    return [item["id"] for item in json.loads(relay.control("--json", "list").stdout)]


def test_second_relay_on_the_spool_exits_2_and_touches_nothing(queued_relay: PidRelay) -> None:
    pid_file = queued_relay.workdir / "twistd.pid"
    control = queued_relay.spool / "control.sock"
    before = (pid_file.read_text(), control.stat().st_ino, queue_ids(queued_relay))
    assert len(before[2]) == 1
    port = free_port()
    result = run_twistd(
        queued_relay.workdir,
        f"--listen=tcp:port={port}:interface=127.0.0.1",
        f"--spool={queued_relay.spool}",
        f"--smarthost=127.0.0.1:{free_port()}",
    )
    assert_one_line_exit_2(result)
    assert "another relay" in result.stderr
    assert not port_open(port)
    after = (pid_file.read_text(), control.stat().st_ino, queue_ids(queued_relay))
    assert after == before
    assert queued_relay.proc is not None and queued_relay.proc.poll() is None


@pytest.fixture
def files(tmp_path: Path) -> Path:
    """Good and bad files for the configuration mistakes, in ``tmp_path``."""
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    other = ca.issue_cert("other")
    cert_pem = b"".join(b.bytes() for b in cert.cert_chain_pems)
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    (tmp_path / "key.pem").write_bytes(cert.private_key_pem.bytes())
    (tmp_path / "other-key.pem").write_bytes(other.private_key_pem.bytes())
    (tmp_path / "truncated.pem").write_bytes(cert_pem[: len(cert_pem) // 2])
    (tmp_path / "not-pem.pem").write_bytes(b"hello\n")
    (tmp_path / "binary-users").write_bytes(b"\xff\xfe\x00\x01garbage")
    (tmp_path / "malformed-users").write_text("alice:plaintext\n")
    (tmp_path / "a-file").write_text("")
    (tmp_path / "wrong-type.toml").write_text('max_size = "big"\n')
    (tmp_path / "wrong-list.toml").write_text("listen = 10025\n")
    return tmp_path


TLS = ("--tls-cert={d}/cert.pem", "--tls-key={d}/key.pem")

BAD_CONFIGURATIONS = {
    "non-PEM certificate": ("--tls-cert={d}/not-pem.pem", "--tls-key={d}/key.pem"),
    "truncated certificate": ("--tls-cert={d}/truncated.pem", "--tls-key={d}/key.pem"),
    "certificate/key mismatch": ("--tls-cert={d}/cert.pem", "--tls-key={d}/other-key.pem"),
    "binary users file": (*TLS, "--users={d}/binary-users"),
    "malformed users file": (*TLS, "--users={d}/malformed-users"),
    "bad smarthost CA": ("--smarthost=127.0.0.1:2525", "--smarthost-ca={d}/not-pem.pem"),
    "non-numeric port": ("--listen=tcp:port=smtp:interface=127.0.0.1",),
    "out-of-range port": ("--listen=tcp:port=99999:interface=127.0.0.1",),
    "smarthost port out of range": ("--smarthost=localhost:99999",),
    "smarthost port not a number": ("--smarthost=localhost:abc",),
    "bad CIDR": ("--relay-network=10.0.0.0/33",),
    "unknown endpoint type": ("--listen=carrier-pigeon:port=1",),
    "spool is a file": ("--spool={d}/a-file",),
    "spool under a file": ("--spool={d}/a-file/spool",),
    "wrong type in TOML": ("--config={d}/wrong-type.toml",),
    "wrong list type in TOML": ("--config={d}/wrong-list.toml",),
    "unknown option": ("--no-such-option",),
}


@pytest.mark.parametrize("mistake", BAD_CONFIGURATIONS)
def test_configuration_mistake_is_one_line_and_exit_2(files: Path, mistake: str) -> None:
    port = free_port()
    args = [a.format(d=files) for a in BAD_CONFIGURATIONS[mistake]]
    listen = [] if any(a.startswith("--listen") for a in args) else [f"--listen=tcp:{port}"]
    spool = [] if any(a.startswith("--spool") for a in args) else [f"--spool={files / 'spool'}"]
    line = assert_one_line_exit_2(run_twistd(files, *listen, *spool, *args))
    assert line.startswith("twistd smtprelay: ")
    assert not port_open(port)


def test_port_in_use_is_one_line_and_exit_2(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_twistd(
            tmp_path, f"--listen=tcp:port={port}:interface=127.0.0.1", f"--spool={tmp_path / 's'}"
        )
    line = assert_one_line_exit_2(result)
    assert str(port) in line and "in use" in line


def run_passwords(*args: str, stdin: int | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "txcolombe.relay.passwords", *args]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=30, cwd=ROOT, stdin=stdin
    )


def test_password_tool_stdin_closed(tmp_path: Path) -> None:
    result = run_passwords("--stdin", str(tmp_path / "users"), "alice", stdin=subprocess.DEVNULL)
    assert_one_line_exit_2(result)
    assert not (tmp_path / "users").exists()


def test_password_tool_stdin_really_closed(tmp_path: Path) -> None:
    script = 'exec "$0" -m txcolombe.relay.passwords --stdin "$1" alice <&-'
    result = subprocess.run(
        ["sh", "-c", script, sys.executable, str(tmp_path / "users")],
        capture_output=True, text=True, timeout=30, cwd=ROOT,
    )  # fmt: skip
    assert_one_line_exit_2(result)
    assert not (tmp_path / "users").exists()


def test_password_tool_missing_directory(tmp_path: Path) -> None:
    users = str(tmp_path / "no" / "u")
    result = subprocess.run(
        [sys.executable, "-m", "txcolombe.relay.passwords", "--stdin", users, "a"],
        input="s3cret\n", capture_output=True, text=True, timeout=30, cwd=ROOT,
    )  # fmt: skip
    assert_one_line_exit_2(result)


def test_command_line_wins_over_the_file_even_at_the_default(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text('max_size = 20000000\nidle_timeout = 60\nhostname = "file.test"\n')
    options = Options()
    options.parseOptions([f"--config={config}", "--max-size=10240000", "--hostname=cli.test"])
    assert options["max-size"] == 10240000  # the built-in default, given on the command line
    assert options["hostname"] == "cli.test"
    assert options["idle-timeout"] == 60  # not on the command line: the file's value


@pytest.mark.parametrize(
    ("description", "tcp"),
    [
        ("ssl:port=465:interface=127.0.0.1", "tcp:port=465:interface=127.0.0.1"),
        ("ssl:4650", "tcp:4650"),
        ("ssl:port=465:interface=\\:\\:1:backlog=5", "tcp:port=465:interface=\\:\\:1:backlog=5"),
        ("ssl:port=465:privateKey=own.pem", None),  # its own certificate: kept as given
        ("ssl:port=465:certKey=c.pem:privateKey=k.pem", None),
        ("tcp:port=25", None),
        ("unix:/tmp/smtp.sock", None),
    ],
)
def test_implicit_tls_listener_under_the_reloadable_certificate(
    description: str, tcp: str | None
) -> None:
    from txcolombe.relay.options import implicit_tls_tcp

    assert implicit_tls_tcp(description) == tcp
