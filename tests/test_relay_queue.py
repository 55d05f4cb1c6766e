"""The queue manager on a real spool with a fake clock: retries, expiry,
bounces, restart recovery and queue commands. The transport is scripted."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from txcolombe.client.options import MessageOptions
from txcolombe.codec.address import Mailbox
from txcolombe.codec.reply import Reply
from txcolombe.delivery.outcome import DeliveryStatus, Outcome
from txcolombe.relay.queue import QueueManager, RetryPolicy
from txcolombe.relay.spool import REMOVAL_DELAY, Spool
from txcolombe.relay.transport import LOCAL
from txcolombe.server.machine import ServerEnvelope

DATA = b"Subject: test\r\nMessage-ID: <m1@x.test>\r\n\r\nbody\r\n"


class ScriptedTransport:
    """Answers each recipient from ``script`` (local part -> Outcome)."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.calls: list[tuple[float, str | None, list[str], bytes]] = []
        self.script: dict[str, Outcome] = {}
        #: What each call passed on of the client's MAIL (BODY, SMTPUTF8).
        self.declared: list[MessageOptions] = []
        self.as_given: list[list[str]] = []

    def route(self, recipient: Mailbox) -> str:
        return recipient.domain or ""

    def send(
        self,
        destination: str,
        sender: Mailbox | None,
        recipients: Sequence[Mailbox],
        data: bytes,
        declared: MessageOptions = LOCAL,
    ) -> Deferred[dict[str, Outcome]]:
        names = [str(r) for r in recipients]
        self.calls.append((self.clock.seconds(), str(sender) if sender else None, names, data))
        self.declared.append(declared)
        self.as_given.append([m.utf8() for m in [sender, *recipients] if m is not None])
        return succeed({n: self.script.get(n.split("@")[0], OK) for n in names})

    def close(self) -> Deferred[None]:
        return succeed(None)


def scripted(status: DeliveryStatus, code: int, text: str, mx: str, port: int) -> Outcome:
    """An outcome the scripted transport gives whichever recipient it is for."""
    return Outcome("", "", status, mx, reply=Reply.of(code, text), port=port)


OK = scripted(DeliveryStatus.DELIVERED, 250, "2.0.0 Ok", "sink", 1)
TEMP = scripted(DeliveryStatus.TEMPORARY, 450, "4.2.1 Mailbox busy", "mx.y.test", 25)
PERM = scripted(DeliveryStatus.PERMANENT, 550, "5.1.1 No such user", "mx.y.test", 25)


def make(
    tmp_path: Path, policy: RetryPolicy | None = None
) -> tuple[QueueManager, ScriptedTransport, Clock]:
    clock = Clock()
    clock.advance(1_000_000)
    transport = ScriptedTransport(clock)
    spool = Spool(tmp_path / "spool", reactor=clock, inline=True)
    spool.start()
    queue = QueueManager(spool, transport, reactor=clock, hostname="relay.test", policy=policy)
    queue.start()
    return queue, transport, clock


def envelope(sender: str | None, *rcpts: str) -> ServerEnvelope:
    return ServerEnvelope(
        sender=Mailbox.parse(sender) if sender else None,
        recipients=tuple(Mailbox.parse(r) for r in rcpts),
        helo="c.test",
        client_address="127.0.0.1",
        protocol="ESMTP",
        tls=False,
        authenticated=None,
    )


def accept(queue: QueueManager, env: ServerEnvelope, clock: Clock) -> str:
    ids: list[str] = []
    queue.accept(env, DATA).addCallback(ids.append)
    clock.advance(0)
    return ids[0]


def test_delivered_message_leaves_the_spool(tmp_path: Path) -> None:
    queue, transport, clock = make(tmp_path)
    qid = accept(queue, envelope("a@x.test", "b@y.test"), clock)
    assert len(transport.calls) == 1
    _, sender, rcpts, data = transport.calls[0]
    assert sender == "a@x.test" and rcpts == ["b@y.test"]
    assert data.startswith(b"Received: from c.test ([127.0.0.1])") and data.endswith(DATA)
    assert not list((tmp_path / "spool" / "queue").iterdir())  # its file goes at once
    assert queue.stats()["delivered"] == 1 and qid not in queue.messages


def test_retry_schedule_doubles_to_the_cap(tmp_path: Path) -> None:
    queue, transport, clock = make(tmp_path)
    transport.script["busy"] = TEMP
    start = clock.seconds()
    accept(queue, envelope("a@x.test", "busy@y.test"), clock)
    for _ in range(6):  # jump to each scheduled retry
        clock.advance(min(c.getTime() for c in clock.getDelayedCalls()) - clock.seconds())
    times = [round(t - start) for t, *_ in transport.calls]
    # 300 s, doubling, capped at 4000 s
    assert times == [0, 300, 900, 2100, 4500, 8500, 12500]


def test_permanent_failure_bounces_once_from_null_sender(tmp_path: Path) -> None:
    queue, transport, clock = make(tmp_path)
    transport.script["nobody"] = PERM
    qid = accept(queue, envelope("a@x.test", "nobody@y.test", "ok@y.test"), clock)
    clock.advance(0)
    # original (both recipients in one transaction), then the bounce
    assert [c[2] for c in transport.calls] == [["nobody@y.test", "ok@y.test"], ["a@x.test"]]
    _, sender, _, dsn = transport.calls[1]
    assert sender is None
    assert b"Content-Type: multipart/report; report-type=delivery-status" in dsn
    for field in (
        b"Reporting-MTA: dns; relay.test",
        b"Final-Recipient: rfc822; nobody@y.test",
        b"Action: failed",
        b"Status: 5.1.1",
        b"Remote-MTA: dns; mx.y.test",
        b"Diagnostic-Code: smtp; 550 5.1.1 No such user",
        b"Content-Type: text/rfc822-headers",
        b"Message-ID: <m1@x.test>",
        f"X-Queue-ID: {qid}".encode(),
    ):
        assert field in dsn, field
    assert b"ok@y.test" not in dsn.split(b"message/delivery-status")[1]
    assert b"\n" not in dsn.replace(b"\r\n", b"")  # CRLF only
    assert queue.messages == {}
    assert queue.stats()["bounced"] == 1


def test_null_sender_is_never_bounced(tmp_path: Path) -> None:
    queue, transport, clock = make(tmp_path)
    transport.script["nobody"] = PERM
    accept(queue, envelope(None, "nobody@y.test"), clock)
    clock.advance(1000)
    assert len(transport.calls) == 1
    assert queue.messages == {}


def test_expiry_bounces_after_lifetime_and_delay_warning(tmp_path: Path) -> None:
    policy = RetryPolicy(min_backoff=60, max_backoff=600, lifetime=3600, delay_warning=200)
    queue, transport, clock = make(tmp_path, policy)
    transport.script["busy"] = TEMP
    accept(queue, envelope("a@x.test", "busy@y.test"), clock)
    for _ in range(50):
        clock.advance(100)
    to_sender = [c for c in transport.calls if c[2] == ["a@x.test"]]
    assert len(to_sender) == 2
    warning, bounce = to_sender[0][3], to_sender[1][3]
    assert b"Action: delayed" in warning and b"Status: 4.2.1" in warning
    assert b"Action: failed" in bounce and b"delivery time expired" in bounce
    assert to_sender[1][0] - transport.calls[0][0] >= 3600
    assert queue.messages == {}


def test_restart_resumes_with_state(tmp_path: Path) -> None:
    queue, transport, clock = make(tmp_path)
    transport.script["busy"] = TEMP
    qid = accept(queue, envelope("a@x.test", "busy@y.test", "ok@y.test"), clock)
    assert queue.messages[qid].attempts == 1
    queue.spool.stop()
    # a new process: same spool, the busy recipient only, attempt count kept
    queue2, transport2, clock2 = make(tmp_path)
    assert transport2.calls == []  # not before its stored retry time
    clock2.advance(300)
    assert [c[2] for c in transport2.calls] == [["busy@y.test"]]
    assert qid not in queue2.messages
    clock2.advance(REMOVAL_DELAY)
    assert not list((tmp_path / "spool" / "queue").iterdir())


def test_the_clients_body_and_smtputf8_are_passed_on(tmp_path: Path) -> None:
    """What the client declared goes with every attempt, after a restart too;
    no BODY is 7BIT; a bounce (made here) declares nothing."""
    queue, transport, clock = make(tmp_path)
    transport.script["busy"] = TEMP
    transport.script["nobody"] = PERM
    plain = envelope("a@x.test", "busy@y.test")
    accept(queue, replace(plain, body_type="8BITMIME", smtputf8=True), clock)
    accept(queue, plain, clock)
    utf8 = b"Subject: Gr\xc3\xbc\xc3\x9fe\r\n\r\nbody\r\n"
    queue.accept(replace(envelope("a@x.test", "ok@y.test"), smtputf8=True), utf8)
    accept(queue, envelope("a@x.test", "nobody@y.test"), clock)  # and its bounce
    assert transport.declared == [
        MessageOptions(body_type="8BITMIME", smtputf8=True),
        MessageOptions(body_type="7BIT"),
        MessageOptions(body_type="7BIT", smtputf8=True, utf8_headers=True),
        MessageOptions(body_type="7BIT"),
        LOCAL,
    ]
    queue.spool.stop()
    _, transport2, clock2 = make(tmp_path)
    clock2.advance(300)
    assert transport2.declared == [
        MessageOptions(body_type="8BITMIME", smtputf8=True),
        MessageOptions(body_type="7BIT"),
    ]


def test_domains_given_in_u_labels_are_kept_across_a_restart(tmp_path: Path) -> None:
    """The spool keeps each address as it came (RFC 6531), beside its A-label
    form, which stays its key."""
    queue, transport, clock = make(tmp_path)
    transport.script["busy"] = TEMP
    accept(queue, envelope("jörg@bücher.test", "busy@zürich.test", "ok@y.test"), clock)
    assert sorted(transport.as_given) == [  # one attempt per destination domain
        ["jörg@bücher.test", "busy@zürich.test"],
        ["jörg@bücher.test", "ok@y.test"],
    ]
    queue.spool.stop()
    _, transport2, clock2 = make(tmp_path)
    clock2.advance(300)
    assert transport2.as_given == [["jörg@bücher.test", "busy@zürich.test"]]
    assert transport2.calls[0][2] == ["busy@xn--zrich-kva.test"]


def test_queue_commands(tmp_path: Path) -> None:
    queue, transport, clock = make(tmp_path)
    transport.script["busy"] = TEMP
    qid = accept(queue, envelope("a@x.test", "busy@y.test"), clock)
    (item,) = queue.list()
    assert item["id"] == qid and item["state"] == "deferred" and "450 4.2.1" in item["last_error"]
    assert queue.hold(qid) and queue.list()[0]["state"] == "held"
    clock.advance(10_000)
    assert len(transport.calls) == 1  # held: not retried
    transport.script.clear()
    assert queue.release(qid)
    clock.advance(0)
    assert len(transport.calls) == 2 and queue.messages == {}
    qid2 = accept(queue, envelope("a@x.test", "busy2@y.test"), clock)
    transport.script["busy2"] = TEMP
    assert queue.show(qid2) is None  # delivered at once: gone
    transport.script["busy3"] = TEMP
    qid3 = accept(queue, envelope("a@x.test", "busy3@y.test"), clock)
    shown = queue.show(qid3)
    assert shown is not None and "Subject: test" in shown["headers"]
    del transport.script["busy3"]
    assert queue.flush() == 1
    clock.advance(0)
    assert queue.messages == {}
    transport.script["busy4"] = TEMP
    qid4 = accept(queue, envelope("a@x.test", "busy4@y.test"), clock)
    assert queue.delete(qid4) and queue.messages == {}
    clock.advance(REMOVAL_DELAY)
    assert not (tmp_path / "spool" / "queue" / f"{qid4}.msg").exists()
