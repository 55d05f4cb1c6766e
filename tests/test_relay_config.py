"""Starting ``twistd smtprelay``: one relay per spool, and every configuration
mistake is one line on stderr with exit status 2 (real twistd processes)."""

from __future__ import annotations

import json
import os
import smtplib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tools.peers.aiosmtpd_peer import free_port
from tools.peers.relay_process import ROOT, TWISTD, RelayProcess, port_open


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
