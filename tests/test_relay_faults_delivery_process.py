"""The relay's own delivery problems, with real processes: ``twistd smtprelay``
in front of an aiosmtpd smarthost on loopback given a wrong password, a dead
smarthost (a closed loopback port), and a spool on a full tmpfs. Each checks
what an operator cares about: every message that got a 250 is delivered or
still queued."""

from __future__ import annotations

import json
import os
import smtplib
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tools.peers.aiosmtpd_peer import AiosmtpdPeer, free_port
from tools.peers.relay_process import RelayProcess, wait_for

BODY = b"From: a@example.com\r\nTo: b@example.org\r\nSubject: fault\r\n\r\nbody\r\n"


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[AiosmtpdPeer]:
    with AiosmtpdPeer(tmp_path) as running:
        yield running


def smarthost_args(tmp_path: Path, peer: AiosmtpdPeer, password: str) -> list[str]:
    creds = tmp_path / "smarthost.cred"
    creds.write_text(f"alice:{password}\n")
    creds.chmod(0o600)
    return [
        f"--smarthost=127.0.0.1:{peer.starttls_port}",
        "--smarthost-tls=starttls",
        f"--smarthost-ca={peer.ca_pem}",
        f"--smarthost-auth={creds}",
        "--min-backoff=1",
        "--max-backoff=2",
        "--log-format=json",
    ]


def send(relay: RelayProcess, count: int, rcpt: str = "b@example.org", body: bytes = BODY) -> int:
    """Send ``count`` messages; the number answered 250."""
    accepted = 0
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        for _ in range(count):
            client.sendmail("a@example.com", [rcpt], body)  # raises unless 250
            accepted += 1
    return accepted


def stats(relay: RelayProcess) -> dict[str, Any]:
    answer = relay.control("stats", "--json")
    assert answer.returncode == 0, answer.stderr
    result: dict[str, Any] = json.loads(answer.stdout)
    return result


def test_wrong_smarthost_password_keeps_the_mail(tmp_path: Path, peer: AiosmtpdPeer) -> None:
    args = smarthost_args(tmp_path, peer, "wrong")
    with RelayProcess(tmp_path, free_port(), args) as relay:
        assert send(relay, 3) == 3
        wait_for(lambda: stats(relay).get("deferred_local_auth", 0) >= 6, 20, "two tries each")
        counters = stats(relay)
        assert counters["queue_size"] == 3 and counters["bounced"] == 0
        assert peer.received == []  # no bounce either
        assert "relay's own failure (auth)" in relay.log_text()
        assert "535" in relay.control("list").stdout
    # the operator fixes the password and restarts: everything arrives
    args = smarthost_args(tmp_path, peer, "s3cret")
    with RelayProcess(tmp_path, free_port(), args) as relay:
        relay.control("flush")
        wait_for(lambda: len(peer.received) == 3, 20, "the three messages")
        assert {m.sender for m in peer.received} == {"a@example.com"}
        wait_for(lambda: stats(relay)["queue_size"] == 0, 10, "an empty queue")


def test_dead_smarthost_keeps_the_mail(tmp_path: Path) -> None:
    closed = free_port()  # nothing listens there
    args = [f"--smarthost=127.0.0.1:{closed}", "--smarthost-tls=none", "--min-backoff=1"]
    with RelayProcess(tmp_path, free_port(), args) as relay:
        assert send(relay, 2) == 2
        wait_for(lambda: stats(relay).get("deferred_local_connection", 0) >= 4, 20, "retries")
        counters = stats(relay)
        assert counters["queue_size"] == 2 and counters["bounced"] == 0
        assert len(list((relay.spool / "queue").glob("*.msg"))) == 2


def root_or_skip() -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("CI runs as root: this test must run there")
        pytest.skip("mounting a tmpfs needs root")


@pytest.fixture
def small_spool(tmp_path: Path) -> Iterator[Path]:
    """``tmp_path/spool`` on a 1 MiB tmpfs."""
    root_or_skip()
    spool = tmp_path / "spool"
    spool.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(spool)], check=True)
    try:
        yield spool
    finally:
        subprocess.run(["umount", "-l", str(spool)], check=False)


def test_full_disk_keeps_the_message_until_its_bounce_is_spooled(
    tmp_path: Path, peer: AiosmtpdPeer, small_spool: Path
) -> None:
    args = [*smarthost_args(tmp_path, peer, "s3cret"), "--bounce-full", "--max-size=303000"]
    with RelayProcess(tmp_path, free_port(), args) as relay:
        # Room for the message (300 kB), not for a bounce carrying it as well;
        # the free-space reserve at MAIL (1.5 x --max-size, 454 kB) still passes.
        vfs = os.statvfs(small_spool)
        free = vfs.f_bavail * vfs.f_frsize
        filler = small_spool / "filler"
        filler.write_bytes(b"\0" * max(0, free - 480_000))
        big = BODY + (b"x" * 998 + b"\r\n") * 300
        assert send(relay, 1, "refuse@example.org", big) == 1  # 250, then 550 at the smarthost
        wait_for(lambda: "cannot queue the failed notice" in relay.log_text(), 20, "ENOSPC")
        assert len(list((small_spool / "queue").glob("*.msg"))) == 1  # the original stays
        assert peer.received == []
        filler.unlink()  # space is freed: the bounce goes out, then the original goes
        wait_for(lambda: len(peer.received) == 1, 20, "the bounce")
        (bounce,) = peer.received
        assert bounce.sender in ("", "<>") and bounce.recipients == ["a@example.com"]
        assert b"Status: 5.1.1" in bounce.data and b"x" * 998 in bounce.data
        wait_for(lambda: stats(relay)["queue_size"] == 0, 10, "an empty queue")
        wait_for(lambda: not list((small_spool / "queue").glob("*.msg")), 10, "removal")
