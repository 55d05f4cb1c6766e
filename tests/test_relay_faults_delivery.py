"""The relay never destroys mail for its own problems: its credentials, TLS,
the network, its configuration, a full disk, a shutdown, a bounce nobody can
take. On a fake clock, with the queue manager on a real spool, faults
injected into the transport and into the spool's committer."""

from __future__ import annotations

import errno
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import LogEvent, formatEvent, globalLogPublisher

from tests.test_relay_queue import DATA, PERM, TEMP, ScriptedTransport, accept, envelope, make
from txcolombe.client.options import MessageOptions
from txcolombe.codec.address import Mailbox
from txcolombe.codec.errors import (
    ConnectionRefused,
    DNSFailure,
    EncryptionRequired,
    InvalidAddress,
    MessageTooLarge,
    NameResolutionFailed,
    NoSuchDomain,
    ServiceUnavailable,
    Step,
    TLSFailure,
    error_for_reply,
)
from txcolombe.codec.reply import Reply
from txcolombe.delivery.outcome import DeliveryStatus, Outcome, failed
from txcolombe.relay.metrics import prometheus_text
from txcolombe.relay.queue import STATE_RETRY, QueueManager, RetryPolicy
from txcolombe.relay.spool import REMOVAL_DELAY, Spool
from txcolombe.relay.transport import LOCAL


def reply(text: str) -> Reply:
    code, rest = text.split(" ", 1)
    return Reply.of(int(code), rest)


@pytest.fixture
def logged() -> Iterator[list[str]]:
    """The text of every log event while the test runs."""
    lines: list[str] = []

    def observer(event: LogEvent) -> None:
        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observer)
    yield lines
    globalLogPublisher.removeObserver(observer)


# -- which failures are the relay's own -----------------------------------------


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (error_for_reply(reply("535 5.7.8 Authentication credentials invalid"), Step.AUTH), "auth"),
        (error_for_reply(reply("534 5.7.9 Mechanism too weak"), Step.AUTH), "auth"),
        (error_for_reply(reply("538 5.7.11 Encryption required"), Step.AUTH), "auth"),
        (error_for_reply(reply("454 4.7.0 Temporary authentication failure"), Step.AUTH), "auth"),
        (error_for_reply(reply("530 5.7.0 Authentication required"), Step.MAIL), "auth"),
        (EncryptionRequired("the server offers AUTH only in clear"), "auth"),
        (TLSFailure("certificate verify failed", step=Step.TLS), "tls"),
        (ConnectionRefused("connection refused", step=Step.CONNECT), "connection"),
        (NameResolutionFailed("smarthost.invalid: no address"), "dns"),
        (InvalidAddress("invalid port 99999"), "config"),
        (error_for_reply(reply("554 5.7.1 Go away"), Step.GREETING), "session"),
        (error_for_reply(reply("502 5.5.2 What?"), Step.EHLO), "session"),
        (KeyError("oops"), "software"),
    ],
)
def test_the_relays_own_failures_defer_never_bounce(error: BaseException, reason: str) -> None:
    out = failed("r@y.test", error, smarthost=True, mx="smarthost", port=587)
    assert out.status is DeliveryStatus.TEMPORARY, out
    assert out.local == reason
    assert out.status_code.startswith("4.")
    assert out.text and out.text != "local error: "


@pytest.mark.parametrize(
    "error",
    [
        MessageTooLarge("message of 30000000 octets over the server's SIZE 10000000"),
        error_for_reply(reply("554 5.6.0 Message rejected"), Step.DATA_END),
        NoSuchDomain("y.test does not exist"),
    ],
)
def test_the_messages_own_failures_still_fail(error: BaseException) -> None:
    out = failed("r@y.test", error, mx="mx.y.test", port=25)
    assert out.status is DeliveryStatus.PERMANENT and out.local == ""


def test_temporary_failures_of_the_next_hop_are_not_counted_as_ours() -> None:
    busy = error_for_reply(reply("421 4.3.2 Shutting down"), Step.MAIL)
    assert isinstance(busy, ServiceUnavailable)
    out = failed("r@y.test", busy, smarthost=True, mx="smarthost", port=587)
    assert out.status is DeliveryStatus.TEMPORARY and out.local == ""
    dns = failed("r@y.test", DNSFailure("SERVFAIL for y.test"))
    assert dns.status is DeliveryStatus.TEMPORARY and dns.local == ""  # deliver() classified it


# -- the queue keeps such mail -------------------------------------------------------


class FailingTransport(ScriptedTransport):
    """Every attempt fails with ``error`` (as SmarthostTransport reports it), or
    delivers when ``error`` is None."""

    error: BaseException | None = None

    def send(
        self,
        destination: str,
        sender: Mailbox | None,
        recipients: Sequence[Mailbox],
        data: bytes,
        declared: MessageOptions = LOCAL,
    ) -> Deferred[dict[str, Outcome]]:
        sent = super().send(destination, sender, recipients, data, declared)
        if self.error is None:
            return sent
        return succeed(
            {
                str(r): failed(str(r), self.error, smarthost=True, mx="smarthost", port=587)
                for r in recipients
            }
        )


def make_failing(
    tmp_path: Path, policy: RetryPolicy | None = None, **options: Any
) -> tuple[QueueManager, FailingTransport, Clock]:
    clock = Clock()
    clock.advance(1_000_000)
    transport = FailingTransport(clock)
    spool = Spool(tmp_path / "spool", reactor=clock, inline=True)
    spool.start()
    queue = QueueManager(
        spool, transport, reactor=clock, hostname="relay.test", policy=policy, **options
    )
    queue.start()
    return queue, transport, clock


def queued_files(tmp_path: Path) -> set[str]:
    return {p.name for p in (tmp_path / "spool" / "queue").iterdir()}


def test_wrong_smarthost_password_keeps_every_message(tmp_path: Path, logged: list[str]) -> None:
    queue, transport, clock = make_failing(tmp_path)
    transport.error = error_for_reply(
        reply("535 5.7.8 Authentication credentials invalid"), Step.AUTH
    )
    ids = [accept(queue, envelope("a@x.test", f"b{i}@y.test"), clock) for i in range(3)]
    clock.advance(1000)  # a retry each
    assert set(queue.messages) == set(ids)
    assert all(f"{qid}.msg" in queued_files(tmp_path) for qid in ids)
    assert not [c for c in transport.calls if c[1] is None]  # nothing bounced
    stats = queue.stats()
    assert stats["bounced"] == 0
    assert stats["deferred_local"] == stats["deferred"] == 6
    assert stats["deferred_local_auth"] == 6
    assert (
        'smtprelay_deferred_local_by_reason_total{reason="auth"} 6.0'
        in prometheus_text(queue).decode()
    )
    (item,) = [i for i in queue.list() if i["id"] == ids[0]]
    assert item["state"] == "deferred" and "535 5.7.8" in item["last_error"]
    # logged once, clearly, not once per message
    own = [line for line in logged if "relay's own failure (auth)" in line]
    assert len(own) == 1 and "535 5.7.8" in own[0] and "stay queued" in own[0]
    # fixed: everything goes
    transport.error = None
    assert queue.flush() == 3
    clock.advance(0)
    assert queue.messages == {} and queue.stats()["delivered"] == 3
    assert any("delivering again" in line for line in logged)


def test_invalid_smarthost_port_defers(tmp_path: Path) -> None:
    queue, transport, clock = make_failing(tmp_path)
    transport.error = InvalidAddress("invalid port 99999")
    qid = accept(queue, envelope("a@x.test", "b@y.test"), clock)
    assert qid in queue.messages
    assert queue.stats()["deferred_local_config"] == 1 and queue.stats()["bounced"] == 0
    assert queue.messages[qid].recipients[0].status_code == "4.3.5"


def test_own_failure_until_the_end_of_lifetime_bounces_and_the_bounce_is_kept(
    tmp_path: Path,
) -> None:
    """The bounce meets the same failure: it is retried on its own schedule and,
    at the end of its lifetime, kept on hold rather than dropped."""
    policy = RetryPolicy(min_backoff=60, max_backoff=600, lifetime=3600)
    queue, transport, clock = make_failing(tmp_path, policy)
    transport.error = ConnectionRefused("connection refused", step=Step.CONNECT)
    qid = accept(queue, envelope("a@x.test", "b@y.test"), clock)
    for _ in range(160):
        clock.advance(100)
    assert qid not in queue.messages  # expired: bounced to a@x.test
    (bounce,) = queue.messages.values()
    assert bounce.sender is None and bounce.held
    assert [r.address for r in bounce.pending] == ["a@x.test"]
    (item,) = queue.list()
    assert item["state"] == "held" and "connection refused" in item["last_error"]
    assert f"{bounce.id}.msg" in queued_files(tmp_path)
    assert queue.stats()["notices_held"] == 1
    held_calls = len(transport.calls)
    clock.advance(100_000)
    assert len(transport.calls) == held_calls  # on hold: left alone
    # the operator fixes the relay and releases it
    transport.error = None
    assert queue.release(bounce.id)
    clock.advance(0)
    assert queue.messages == {}
    assert transport.calls[-1][1] is None and transport.calls[-1][2] == ["a@x.test"]


def test_undeliverable_bounce_goes_to_the_postmaster(tmp_path: Path) -> None:
    queue, transport, clock = make_failing(tmp_path, postmaster="postmaster@relay.test")
    transport.script["nobody"] = PERM
    transport.script["a"] = PERM  # the sender's address is gone too
    accept(queue, envelope("a@x.test", "nobody@y.test"), clock)
    clock.advance(0)
    to = [c[2] for c in transport.calls]
    assert to == [["nobody@y.test"], ["a@x.test"], ["postmaster@relay.test"]]
    assert transport.calls[2][3].startswith(b"From: Mail Delivery System")
    assert queue.messages == {}


def test_permanently_refused_null_sender_message_is_discarded_with_a_log_line(
    tmp_path: Path, logged: list[str]
) -> None:
    queue, transport, clock = make(tmp_path)
    transport.script["nobody"] = PERM
    qid = accept(queue, envelope(None, "nobody@y.test"), clock)
    assert queue.messages == {}
    (line,) = [line for line in logged if "status=discarded" in line]
    assert line.startswith(qid) and "550 5.1.1" in line


# -- a full disk --------------------------------------------------------------------------


class FullDisk:
    """Makes the in-process committer fail with ENOSPC, while ``full``, every
    commit that writes a file (whose name ends with ``suffix``)."""

    def __init__(self, spool: Spool, suffix: str = "") -> None:
        committer = spool._committer
        assert committer is not None
        self.full = False
        self.refused = 0
        commit = committer.commit

        def failing(ops: Any) -> bool | OSError:
            writes = [name for kind, name, _ in ops if kind == 1]
            if self.full and any(name.endswith(suffix) for name in writes):
                self.refused += 1
                return OSError(errno.ENOSPC, "No space left on device")
            return commit(ops)

        committer.commit = failing  # type: ignore[method-assign]


def test_no_removal_before_the_bounce_is_durable(tmp_path: Path, logged: list[str]) -> None:
    queue, transport, clock = make(tmp_path)
    disk = FullDisk(queue.spool)
    transport.script["nobody"] = TEMP
    qid = accept(queue, envelope("a@x.test", "nobody@y.test"), clock)  # 250'd: on disk
    transport.script["nobody"] = PERM
    disk.full = True
    clock.advance(300)  # refused for good; the bounce (and the state) cannot be written
    assert [c[2] for c in transport.calls] == [["nobody@y.test"]] * 2
    queue.flush()
    clock.advance(REMOVAL_DELAY)
    assert disk.refused >= 2
    assert qid in queue.messages and f"{qid}.msg" in queued_files(tmp_path)
    assert len(transport.calls) == 2  # not sent again to the recipient
    assert queue.stats()["spool_errors"] >= 1
    assert any("cannot queue the failed notice" in line for line in logged)
    disk.full = False  # space is freed
    queue.flush()
    clock.advance(REMOVAL_DELAY)
    assert [c[2] for c in transport.calls] == [["nobody@y.test"]] * 2 + [["a@x.test"]]
    assert b"Status: 5.1.1" in transport.calls[2][3]
    assert queue.messages == {} and not queued_files(tmp_path)


def test_bounce_retried_after_a_restart_on_a_full_disk(tmp_path: Path) -> None:
    queue, transport, clock = make(tmp_path)
    disk = FullDisk(queue.spool)
    transport.script["busy"] = TEMP
    qid = accept(queue, envelope("a@x.test", "busy@y.test"), clock)  # state: pending
    transport.script["busy"] = PERM
    disk.full = True
    clock.advance(300)  # fails for good; neither bounce nor state can be written
    assert qid in queue.messages
    queue.spool.stop()
    queue2, transport2, clock2 = make(tmp_path)  # space freed, relay restarted
    transport2.script["busy"] = PERM
    clock2.advance(300)
    # the recipient is tried again (the failure was never recorded) and bounced
    assert [c[2] for c in transport2.calls] == [["busy@y.test"], ["a@x.test"]]
    assert queue2.messages == {}


def test_delay_warning_retried_after_a_full_disk(tmp_path: Path) -> None:
    policy = RetryPolicy(min_backoff=100, max_backoff=100, delay_warning=150)
    queue, transport, clock = make(tmp_path, policy)
    disk = FullDisk(queue.spool)
    transport.script["busy"] = TEMP
    qid = accept(queue, envelope("a@x.test", "busy@y.test"), clock)
    disk.full = True
    clock.advance(100)
    clock.advance(100)  # warning due, cannot be spooled
    assert not queue.messages[qid].warned
    assert [c for c in transport.calls if c[2] == ["a@x.test"]] == []
    disk.full = False
    clock.advance(100)
    warnings = [c for c in transport.calls if c[2] == ["a@x.test"]]
    assert len(warnings) == 1 and b"Action: delayed" in warnings[0][3]
    assert queue.messages[qid].warned
    clock.advance(STATE_RETRY)


def test_failed_state_write_is_retried(tmp_path: Path) -> None:
    queue, transport, clock = make(tmp_path)
    disk = FullDisk(queue.spool, ".state")
    transport.script["busy"] = TEMP
    disk.full = True
    qid = accept(queue, envelope("a@x.test", "busy@y.test"), clock)
    assert disk.refused == 1 and qid in queue.messages
    assert f"{qid}.state" not in queued_files(tmp_path)
    disk.full = False
    clock.advance(STATE_RETRY)
    assert f"{qid}.state" in queued_files(tmp_path)
    assert queue.spool.read_state(qid) == queue.messages[qid].state()


# -- shutdown and restart --------------------------------------------------------------


class HangingTransport(ScriptedTransport):
    """Never answers; a cancel fails the attempt as the session would."""

    def send(
        self,
        destination: str,
        sender: Mailbox | None,
        recipients: Sequence[Mailbox],
        data: bytes,
        declared: MessageOptions = LOCAL,
    ) -> Deferred[dict[str, Outcome]]:
        super().send(destination, sender, recipients, data, declared)
        return Deferred()


def test_shutdown_says_why_a_delivery_was_abandoned(tmp_path: Path, logged: list[str]) -> None:
    clock = Clock()
    clock.advance(1_000_000)
    spool = Spool(tmp_path / "spool", reactor=clock, inline=True)
    spool.start()
    queue = QueueManager(spool, HangingTransport(clock), reactor=clock, hostname="relay.test")
    queue.start()
    qid = accept(queue, envelope("a@x.test", "b@y.test"), clock)
    stopped = queue.stop(grace=5)
    clock.advance(5)
    assert stopped.called
    (line,) = [line for line in logged if "status=deferred" in line]
    assert "reply=(delivery abandoned: relay shutting down)" in line and "dsn=4.3.2" in line
    state = spool.read_state(qid)
    assert state is not None and state["attempts"] == 0  # not counted as an attempt
    assert state["next_attempt"] == clock.seconds()  # retried at once on the next start


def test_restart_spreads_the_deferred_messages(tmp_path: Path) -> None:
    queue, transport, clock = make(tmp_path)
    transport.script["busy"] = TEMP
    for _ in range(10):
        accept(queue, envelope("a@x.test", "busy@y.test"), clock)
    queue.spool.stop()
    # restarted long after every retry was due
    clock2 = Clock()
    clock2.advance(2_000_000)
    transport2 = ScriptedTransport(clock2)
    spool2 = Spool(tmp_path / "spool", reactor=clock2, inline=True)
    spool2.start()
    queue2 = QueueManager(
        spool2, transport2, reactor=clock2, hostname="relay.test", restart_spread=60
    )
    queue2.start()
    assert len(transport2.calls) == 1  # not all ten at once
    for _ in range(60):
        clock2.advance(1)
    times = [t - 2_000_000 for t, *_ in transport2.calls]
    assert len(times) == 10 and times == sorted(times)
    assert max(times) == pytest.approx(54, abs=1)  # evenly over the minute
    assert queue2.messages == {}


def test_restart_sends_never_tried_messages_at_once(tmp_path: Path) -> None:
    queue, transport, clock = make(tmp_path)
    queue.stop()  # accepted while stopping: spooled, never tried
    for _ in range(3):
        queue.accept(envelope("a@x.test", "b@y.test"), DATA)
    clock.advance(0)
    assert transport.calls == []
    queue.spool.stop()
    _, transport2, _ = make(tmp_path)
    assert len(transport2.calls) == 3
