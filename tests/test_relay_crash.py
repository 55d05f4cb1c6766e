"""Crash tests: SIGKILL the relay, or only its spool committer child, several
times under load, restart it, and check that every message that got a 250
reaches the smarthost (none lost; a duplicate is allowed only when the crash
fell between the remote 250 and recording it, so there are at most as many
as deliveries can be in flight at a kill)."""

from __future__ import annotations

import os
import signal
import smtplib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tools.peers.aiosmtpd_peer import AiosmtpdPeer, free_port
from tools.peers.relay_process import RelayProcess, wait_for

CLIENTS = 4
KILLS = 5
PER_ROUND = 60  # accepted messages between two kills
#: Duplicates allowed per SIGKILL of the relay: no more than Postfix's 3 in 3
#: kills. What is left are the deliveries in flight at the kill (taken by the
#: smarthost, its 250 not yet read); a delivered message's file is unlinked
#: as soon as the 250 is read. Measured (bench/relay_crash.py, 6 runs of 5
#: kills): 0.37 per kill, at most 5 in a run; 2.1 per kill, at least 6 in a
#: run, when the removal waited for the committer.
DUPLICATES_PER_KILL = 1


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[AiosmtpdPeer]:
    with AiosmtpdPeer(tmp_path) as running:
        yield running


class Load:
    """Clients sending through the relay, recording each message that got a 250."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.accepted: list[str] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self._counter = iter(range(1_000_000))
        self._threads = [
            threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(CLIENTS)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def finish(self) -> set[str]:
        self.stop.set()
        for thread in self._threads:
            thread.join(15)
        return set(self.accepted)

    def _client(self, number: int) -> None:
        while not self.stop.is_set():
            with self.lock:
                msgid = f"<crash-{number}-{next(self._counter)}@client.test>"
            body = f"Message-ID: {msgid}\r\nSubject: crash\r\n\r\n{'x' * 900}\r\n"
            try:
                with smtplib.SMTP("127.0.0.1", self.port, timeout=5) as smtp:
                    smtp.sendmail("load@client.test", ["sink@example.org"], body)
            except (OSError, smtplib.SMTPException):
                continue  # no 250: the message may or may not be there; not counted
            with self.lock:
                self.accepted.append(msgid)


def arrived(peer: AiosmtpdPeer) -> list[str]:
    """The Message-IDs the smarthost received, one per delivery."""
    with peer.lock:
        return [
            line.split(b" ", 1)[1].decode()
            for r in peer.received
            for line in r.data.split(b"\r\n")
            if line.startswith(b"Message-ID: ")
        ]


def committer_pids(relay_pid: int) -> list[int]:
    """The relay's committer children (found through /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == relay_pid and b"txcolombe.relay.committer" in cmdline:
            found.append(int(entry))
    return found


def relay_args(peer: AiosmtpdPeer) -> list[str]:
    return [
        f"--smarthost=127.0.0.1:{peer.starttls_port}",
        "--smarthost-tls=none",
        "--min-backoff=1",
    ]


def test_sigkill_loses_no_accepted_message(tmp_path: Path, peer: AiosmtpdPeer) -> None:
    relay = RelayProcess(tmp_path, free_port(), relay_args(peer))
    load = Load(relay.port)
    try:
        relay.start()
        load.start()
        for round_number in range(1, KILLS + 1):
            wait_for(
                lambda n=round_number: len(load.accepted) >= n * PER_ROUND, 60, "accepted mail"
            )
            relay.kill()
            relay.start()
        wanted = load.finish()
        wait_for(lambda: wanted <= set(arrived(peer)), 60, "every accepted message at the sink")
        assert len(wanted) >= KILLS * PER_ROUND
        deliveries = arrived(peer)
        duplicates = len(deliveries) - len(set(deliveries))
        print(f"\naccepted {len(wanted)}, delivered {len(deliveries)} (duplicates {duplicates})")
        assert duplicates <= KILLS * DUPLICATES_PER_KILL
    finally:
        load.stop.set()
        relay.stop()


def test_killing_the_committer_loses_no_accepted_message(
    tmp_path: Path, peer: AiosmtpdPeer
) -> None:
    """Only the spool's committer child dies, again and again, under load; then
    the relay itself is SIGKILLed and restarted. Every 250 is delivered."""
    relay = RelayProcess(tmp_path, free_port(), relay_args(peer))
    load = Load(relay.port)
    kills = 0
    try:
        relay.start()
        assert relay.proc is not None
        load.start()
        deadline = time.monotonic() + 60
        while kills < 12 and time.monotonic() < deadline:
            before = len(load.accepted)
            wait_for(lambda b=before: len(load.accepted) >= b + 10, 30, "accepted mail")
            for pid in committer_pids(relay.proc.pid):
                os.kill(pid, signal.SIGKILL)
                kills += 1
        assert kills >= 12
        wait_for(lambda: len(load.accepted) >= 200, 60, "accepted mail after the kills")
        relay.kill()
        relay.start()
        wanted = load.finish()
        wait_for(lambda: wanted <= set(arrived(peer)), 60, "every accepted message at the sink")
        assert "IndexError" not in relay.log_text()
        assert "the spool committer stopped" in relay.log_text()
    finally:
        load.stop.set()
        relay.stop()
