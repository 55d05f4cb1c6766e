"""``smtprelay-queue`` against a running relay whose smarthost defers
(``later*`` recipients get 450), then against the same spool once stopped."""

from __future__ import annotations

import fcntl
import json
import os
import re
import smtplib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.test_relay_e2e import intake_ca, relay_args
from tools.peers.aiosmtpd_peer import AiosmtpdPeer, free_port
from tools.peers.relay_process import ROOT, RelayProcess, wait_for
from txcolombe.relay.control import relay_running

__all__ = ["intake_ca"]  # the fixture, shared with the end-to-end tests

BODY = b"Subject: queued\r\n\r\nkeep me around\r\n"
MESSAGES = [
    ("ann@example.com", ["later1@one.example"]),
    ("ann@example.com", ["later2@two.example", "later3@one.example"]),
    ("bob@example.com", ["later4@two.example"]),
]


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[AiosmtpdPeer]:
    with AiosmtpdPeer(tmp_path) as running:
        yield running


@pytest.fixture
def relay(tmp_path: Path, peer: AiosmtpdPeer, intake_ca: trustme.CA) -> Iterator[RelayProcess]:
    """A relay holding the three deferred MESSAGES, retried every few seconds."""
    yield from queued_on(RelayProcess(tmp_path, free_port(), relay_args(tmp_path, peer)))


@pytest.fixture
def slow_relay(tmp_path: Path, peer: AiosmtpdPeer, intake_ca: trustme.CA) -> Iterator[RelayProcess]:
    """The same with a 10 minute backoff: after the first try, only a flush retries."""
    args = [*relay_args(tmp_path, peer), "--min-backoff=600"]
    yield from queued_on(RelayProcess(tmp_path, free_port(), args))


def queued_on(relay: RelayProcess) -> Iterator[RelayProcess]:
    with relay as running:
        with smtplib.SMTP("127.0.0.1", running.port, timeout=10) as client:
            for sender, rcpts in MESSAGES:
                client.sendmail(sender, rcpts, BODY)
        wait_for(lambda: len(deferred(running)) == 3, 15, "three deferrals")
        yield running


def queue(relay: RelayProcess, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "txcolombe.relay.control", "-s", str(relay.spool), *args],
        capture_output=True, text=True, timeout=30, cwd=ROOT, input=stdin,
    )  # fmt: skip


def listing(relay: RelayProcess) -> list[dict[str, object]]:
    result = queue(relay, "--json", "list")
    assert result.returncode == 0, result.stderr
    items: list[dict[str, object]] = json.loads(result.stdout)
    return items


def deferred(relay: RelayProcess) -> list[dict[str, object]]:
    return [i for i in listing(relay) if i["state"] == "deferred"]


def ids_to(relay: RelayProcess, rcpt: str) -> list[str]:
    return [str(i["id"]) for i in listing(relay) if rcpt in i["recipients"]]  # type: ignore[operator]


def held(relay: RelayProcess) -> set[str]:
    return {str(i["id"]) for i in listing(relay) if i["state"] == "held"}


def test_bulk_selectors_and_output(relay: RelayProcess) -> None:
    table = queue(relay, "list").stdout
    assert table.splitlines()[0].split() == ["ID", "ARRIVAL", "SIZE", "RCPTS", "STATE", "SENDER"]
    assert "450 4.2.1" in table and "-- 3 messages" in table

    result = queue(relay, "hold", "--sender", "ann@example.com")
    assert result.returncode == 0 and result.stdout.endswith("held 2 messages\n")
    assert held(relay) == set(
        ids_to(relay, "later1@one.example") + ids_to(relay, "later3@one.example")
    )
    assert queue(relay, "release", "--all").stdout.endswith("released 3 messages\n")
    assert held(relay) == set()

    result = queue(relay, "--json", "hold", "--domain", "two.example")
    two = set(ids_to(relay, "later2@two.example") + ids_to(relay, "later4@two.example"))
    assert set(json.loads(result.stdout)["held"]) == two == held(relay)
    queue(relay, "release", "--all")

    (bob,) = ids_to(relay, "later4@two.example")
    result = queue(relay, "hold", "--recipient", "LATER4@two.example")
    assert result.stdout == f"{bob}: held\nheld 1 messages\n" and held(relay) == {bob}

    (first,) = ids_to(relay, "later1@one.example")
    result = queue(relay, "delete", "-", stdin=f"{first}\nnosuchid\n")
    assert result.returncode == 1 and "nosuchid: no such message" in result.stderr
    assert f"{first}: deleted" in result.stdout
    wait_for(lambda: not ids_to(relay, "later1@one.example"), 10, "the message deleted")
    assert len(listing(relay)) == 2


def test_usage_errors_and_show(relay: RelayProcess) -> None:
    for args in (["delete"], ["hold"], ["show"], ["delete", "x", "--all"]):
        result = queue(relay, *args)
        assert result.returncode == 2 and result.stderr.strip(), args
    assert len(listing(relay)) == 3
    (qid,) = ids_to(relay, "later1@one.example")
    shown = queue(relay, "show", qid, "--body").stdout
    assert re.search(r"rcpt: +<later1@one.example> pending attempts=[1-9]\d* \(450 4.2.1", shown)
    assert re.search(r"next: +\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", shown)
    assert shown.endswith("Subject: queued\n\nkeep me around\n")
    as_json = json.loads(queue(relay, "--json", "show", qid, "--body").stdout)
    assert as_json["body"].endswith(BODY.decode()) and as_json["attempts"] >= 1
    assert queue(relay, "show", "nosuchid").returncode == 1


def test_stopped_relay_is_read_from_the_spool(relay: RelayProcess) -> None:
    assert queue(relay, "hold", "--all").returncode == 0  # held: no retries to race with
    wait_for(lambda: len(held(relay)) == 3, 5, "all held")
    running = listing(relay)
    (qid,) = ids_to(relay, "later1@one.example")
    relay.stop()
    assert not relay_running(relay.spool)
    offline = listing(relay)
    keys = ("id", "sender", "recipients", "pending", "state", "attempts", "arrival", "size")
    assert [{k: i[k] for k in keys} for i in offline] == [{k: i[k] for k in keys} for i in running]
    assert "450 4.2.1" in queue(relay, "list").stdout
    assert queue(relay, "show", qid, "--body").stdout.endswith("keep me around\n")
    stats = json.loads(queue(relay, "--json", "stats").stdout)
    assert stats == {"queue_size": 3, "incoming": 0, "deferred": 0, "held": 3}
    assert "held: 3" in queue(relay, "stats").stdout
    result = queue(relay, "release", "--all")
    assert result.returncode == 1 and "not running" in result.stderr
    assert len(held(relay)) == 3


def attempts(relay: RelayProcess) -> dict[str, int]:
    """Each message's attempts, by its first recipient's local part."""
    return {
        str(i["recipients"][0]).split("@")[0]: int(i["attempts"])  # type: ignore[index, call-overload]
        for i in listing(relay)
    }


def test_flush_and_requeue_selected_messages(slow_relay: RelayProcess) -> None:
    assert attempts(slow_relay) == {"later1": 1, "later2": 1, "later4": 1}
    result = queue(slow_relay, "flush", "--domain", "two.example")
    assert result.returncode == 0 and result.stdout.endswith("flushed 2 messages\n")
    wait_for(lambda: attempts(slow_relay)["later4"] == 2, 10, "a retry of the flushed")
    wait_for(lambda: attempts(slow_relay)["later2"] == 2, 10, "a retry of the flushed")
    assert attempts(slow_relay)["later1"] == 1  # not selected: still waiting
    (qid,) = ids_to(slow_relay, "later4@two.example")
    assert queue(slow_relay, "requeue", qid).stdout == f"{qid}: requeued\nrequeued 1 messages\n"
    # attempts reset to 0, then the immediate retry makes it 1
    wait_for(lambda: attempts(slow_relay)["later4"] == 1, 10, "the requeued retried afresh")
    assert queue(slow_relay, "requeue").returncode == 2


def test_a_held_lock_means_running(tmp_path: Path) -> None:
    (tmp_path / "lock").touch()
    assert not relay_running(tmp_path)
    fd = os.open(tmp_path / "lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert subprocess.run(
            [sys.executable, "-c", f"from txcolombe.relay.control import relay_running as r;"
             f"import sys; sys.exit(0 if r(__import__('pathlib').Path({str(tmp_path)!r})) else 1)"],
            cwd=ROOT, timeout=30,
        ).returncode == 0  # fmt: skip
    finally:
        os.close(fd)
