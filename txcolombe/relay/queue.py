"""The queue manager: per-recipient state, scheduling, retries, bounces.

Each message in the spool has one :class:`RecipientState` per recipient:
``pending`` until it is ``delivered`` or ``failed``. A delivery attempt
sends the pending recipients, grouped by the transport's destinations; a
temporary failure keeps the recipient pending until the next attempt, after
a backoff that doubles from ``min_backoff`` to ``max_backoff`` (Postfix's
300 s and 4000 s by default); after ``lifetime`` (5 days) it fails. Failed
recipients are reported to the sender in one RFC 3464 bounce, sent from the
null sender; a message from the null sender is never bounced. Time comes
from the reactor (``IReactorTime.seconds``), so tests drive it with a
``Clock``.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from txcolombe.address import Mailbox, parse_recipient, parse_sender
from txcolombe.relay.bounce import RecipientReport, build_dsn
from txcolombe.relay.spool import Spool, new_queue_id
from txcolombe.relay.transport import Outcome, Status, Transport
from txcolombe.server.machine import Envelope
from txcolombe.server.received import received_header

log = Logger(namespace="txcolombe.relay")

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"

#: Messages up to this size stay in memory until their first attempt, which
#: then needs no read from the spool.
KEEP_IN_MEMORY = 256 * 1024


@dataclass(frozen=True)
class RetryPolicy:
    """When to retry and when to give up (seconds)."""

    min_backoff: float = 300.0
    max_backoff: float = 4000.0
    lifetime: float = 5 * 86400.0
    delay_warning: float = 0.0
    """Send a "delayed" DSN once after this long; 0: never."""

    def backoff(self, attempts: int) -> float:
        """The wait after the ``attempts``-th failed attempt."""
        return float(min(self.max_backoff, self.min_backoff * 2 ** max(0, attempts - 1)))


@dataclass
class Counters:
    received: int = 0
    delivered: int = 0
    deferred: int = 0
    bounced: int = 0
    rejected: int = 0


@dataclass
class RecipientState:
    address: str
    status: str = PENDING
    attempts: int = 0
    last_error: str = ""
    status_code: str = ""
    relay: str = ""
    reported: bool = False


@dataclass
class Message:
    """A queued message as the queue manager sees it.

    :ivar data: the message itself, kept in memory from its arrival until its
        first attempt when it is small (:data:`KEEP_IN_MEMORY`); else None,
        and it is read from the spool.
    :ivar mailboxes: the parsed sender (key None) and recipients, by address.
    :ivar has_state: a state file exists in the spool.
    """

    id: str
    sender: str | None
    recipients: list[RecipientState]
    arrival: float
    size: int
    held: bool = False
    warned: bool = False
    attempts: int = 0
    next_attempt: float = 0.0
    in_flight: bool = False
    deleted: bool = False
    client: str = ""
    data: bytes | None = field(default=None, repr=False)
    mailboxes: dict[str | None, Mailbox | None] = field(default_factory=dict, repr=False)
    has_state: bool = False

    @property
    def pending(self) -> list[RecipientState]:
        return [r for r in self.recipients if r.status == PENDING]

    def state(self) -> dict[str, Any]:
        return {
            "held": self.held,
            "warned": self.warned,
            "attempts": self.attempts,
            "next_attempt": self.next_attempt,
            "recipients": [asdict(r) for r in self.recipients],
        }

    def summary(self, now: float) -> dict[str, Any]:
        pending = self.pending
        if self.held:
            state = "held"
        elif self.in_flight:
            state = "active"
        elif self.attempts == 0:
            state = "incoming"
        else:
            state = "deferred"
        errors = [r.last_error for r in pending if r.last_error]
        return {
            "id": self.id,
            "age": round(now - self.arrival, 3),
            "arrival": self.arrival,
            "size": self.size,
            "sender": self.sender or "",
            "recipients": [r.address for r in self.recipients],
            "pending": [r.address for r in pending],
            "state": state,
            "attempts": self.attempts,
            "next_attempt": self.next_attempt,
            "last_error": errors[-1] if errors else "",
        }


def event_text(log_format: str, queue_id: str, fields: dict[str, Any]) -> str:
    """One parseable log line: ``ID: key=value, ...`` or a JSON object."""
    if log_format == "json":
        return json.dumps({"id": queue_id, **fields}, ensure_ascii=False, sort_keys=False)
    parts = []
    for key, value in fields.items():
        text = str(value)
        if key in ("from", "to"):
            text = f"<{text}>"
        elif key == "reply":
            text = f"({text})"
        elif _NEEDS_QUOTES.search(text):
            text = json.dumps(text)
        parts.append(f"{key}={text}")
    return f"{queue_id}: " + ", ".join(parts)


_NEEDS_QUOTES = re.compile(r"[, ()]")


class QueueManager:
    """Accepts messages into the spool and delivers them."""

    def __init__(
        self,
        spool: Spool,
        transport: Transport,
        *,
        reactor: Any,
        hostname: str,
        policy: RetryPolicy | None = None,
        max_active: int = 1000,
        log_format: str = "kv",
        bounce_full: bool = False,
    ) -> None:
        self.spool = spool
        self.transport = transport
        self.reactor = reactor
        self.hostname = hostname
        self.policy = policy or RetryPolicy()
        self.max_active = max_active
        self.log_format = log_format
        self.bounce_full = bounce_full
        self.counters = Counters()
        self.messages: dict[str, Message] = {}
        self._due: list[tuple[float, str]] = []
        self._active: dict[str, Deferred[None]] = {}
        self._timer: IDelayedCall | None = None
        self._running = False

    # -- logging ----------------------------------------------------------------

    def event(self, queue_id: str, **fields: Any) -> None:
        text = event_text(self.log_format, queue_id, fields)
        log.info("{relay_text}", relay_text=text, relay_id=queue_id, relay_fields=fields)

    # -- life cycle ---------------------------------------------------------------

    def start(self) -> None:
        """Load the spool and start delivering."""
        now = self.reactor.seconds()
        for queue_id in self.spool.queue_ids():
            try:
                message = self._load(queue_id)
            except (OSError, ValueError) as error:
                log.error("cannot load {id}: {error}", id=queue_id, error=error)
                continue
            if not message.pending:
                self.spool.remove(queue_id)
                continue
            self.messages[queue_id] = message
            message.next_attempt = min(message.next_attempt, now)
            if not message.held:
                self._push(message)
        self._running = True
        if self.messages:
            log.info("queue recovered: {count} messages", count=len(self.messages))
        self._run_queue()

    def stop(self, grace: float = 10.0) -> Deferred[None]:
        """Stop scheduling; wait up to ``grace`` seconds for deliveries in flight,
        then abandon them (they stay pending in the spool)."""
        self._running = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        active = list(self._active.values())

        async def run() -> None:
            if active:
                waiting = DeferredList(active, consumeErrors=True)
                timer = self.reactor.callLater(grace, waiting.cancel)
                with contextlib.suppress(Exception):
                    await waiting
                if timer.active():
                    timer.cancel()
            await self.transport.close()
            await self.spool.drain()

        return Deferred.fromCoroutine(run())

    def _load(self, queue_id: str) -> Message:
        envelope = self.spool.read_envelope(queue_id)
        state = self.spool.read_state(queue_id) or {}
        recipients = [RecipientState(**r) for r in state.get("recipients", [])] or [
            RecipientState(address) for address in envelope["recipients"]
        ]
        mailboxes: dict[str | None, Mailbox | None] = {None: parse_sender(envelope["sender"])}
        for rcpt in recipients:
            mailboxes[rcpt.address] = parse_recipient(rcpt.address)
        return Message(
            id=queue_id,
            sender=envelope["sender"],
            recipients=recipients,
            arrival=envelope["arrival"],
            size=envelope["size"],
            held=state.get("held", False),
            warned=state.get("warned", False),
            attempts=state.get("attempts", 0),
            next_attempt=state.get("next_attempt", 0.0),
            client=envelope.get("client", ""),
            mailboxes=mailboxes,
            has_state=bool(state),
        )

    # -- intake -------------------------------------------------------------------------

    def accept(self, envelope: Envelope, data: bytes) -> Deferred[str]:
        """Spool a message from the SMTP server, with our Received header."""
        queue_id = new_queue_id()
        header = received_header(envelope, self.hostname, queue_id, time.time())
        sender = str(envelope.sender) if envelope.sender is not None else None
        mailboxes: dict[str | None, Mailbox | None] = {None: envelope.sender}
        for rcpt in envelope.recipients:
            mailboxes[str(rcpt)] = rcpt
        return self._spool(
            queue_id, sender, [str(r) for r in envelope.recipients], header + data,
            {"client": envelope.client_address, "helo": envelope.helo,
             "protocol": envelope.protocol, "auth": envelope.authenticated},
            mailboxes,
        )  # fmt: skip

    def inject(self, sender: str | None, recipients: Sequence[str], data: bytes) -> Deferred[str]:
        """Spool a locally made message (a bounce)."""
        mailboxes: dict[str | None, Mailbox | None] = {None: parse_sender(sender)}
        for rcpt in recipients:
            mailboxes[rcpt] = parse_recipient(rcpt)
        return self._spool(
            new_queue_id(), sender, list(recipients), data, {"client": "local"}, mailboxes
        )

    def _spool(
        self,
        queue_id: str,
        sender: str | None,
        recipients: list[str],
        data: bytes,
        extra: dict[str, Any],
        mailboxes: dict[str | None, Mailbox | None],
    ) -> Deferred[str]:
        arrival = self.reactor.seconds()
        record = {
            "id": queue_id,
            "sender": sender,
            "recipients": recipients,
            "arrival": arrival,
            "size": len(data),
            **extra,
        }
        message = Message(
            id=queue_id,
            sender=sender,
            recipients=[RecipientState(r) for r in recipients],
            arrival=arrival,
            size=len(data),
            next_attempt=arrival,
            client=str(extra.get("client", "")),
            data=data if len(data) <= KEEP_IN_MEMORY else None,
            mailboxes=mailboxes,
        )

        def stored(_: object) -> str:
            self.counters.received += 1
            self.messages[queue_id] = message
            self.event(
                queue_id, **{"from": sender or "", "size": len(data),
                             "nrcpt": len(recipients), "client": message.client},
            )  # fmt: skip
            if self._running and len(self._active) < self.max_active:
                self._dispatch(message)  # the common case: straight out
            else:
                self._push(message)
                self._run_queue()
            return queue_id

        return self.spool.write_message(queue_id, record, data).addCallback(stored)

    # -- scheduling ---------------------------------------------------------------------

    def _push(self, message: Message) -> None:
        heapq.heappush(self._due, (message.next_attempt, message.id))

    def _run_queue(self) -> None:
        if not self._running:
            return
        now = self.reactor.seconds()
        while self._due and len(self._active) < self.max_active:
            when, queue_id = self._due[0]
            if when > now:
                break
            heapq.heappop(self._due)
            message = self.messages.get(queue_id)
            if message is None or message.held or message.in_flight or message.next_attempt != when:
                continue
            self._dispatch(message)
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._due and len(self._active) < self.max_active:
            delay = max(0.0, self._due[0][0] - now)
            self._timer = self.reactor.callLater(delay, self._wake)

    def _wake(self) -> None:
        self._timer = None
        self._run_queue()

    def _dispatch(self, message: Message) -> None:
        message.in_flight = True
        data = message.data
        message.data = None
        if data is None:
            try:
                data = self.spool.read_data(message.id)
            except OSError as error:
                log.error("cannot read {id}: {error}", id=message.id, error=error)
                message.in_flight = False
                return
        mailboxes = message.mailboxes
        sender = mailboxes[None]
        groups: dict[str, list[Mailbox]] = {}
        for rcpt in message.pending:
            mailbox = mailboxes[rcpt.address]
            assert mailbox is not None
            groups.setdefault(self.transport.route(mailbox), []).append(mailbox)
        attempts = [
            self.transport.send(dest, sender, rcpts, data) for dest, rcpts in groups.items()
        ]
        started = self.reactor.seconds()

        def done(results: list[tuple[bool, Any]]) -> None:
            self._active.pop(message.id, None)
            outcomes: dict[str, Outcome] = {}
            for ok, value in results:
                if ok:
                    outcomes.update(value)
            self._finished(message, outcomes, data, started)

        finished: Deferred[Any] = DeferredList(attempts, consumeErrors=True)
        self._active[message.id] = finished
        finished.addCallback(done)

    def _finished(
        self, message: Message, outcomes: dict[str, Outcome], data: bytes, started: float
    ) -> None:
        now = self.reactor.seconds()
        message.in_flight = False
        message.attempts += 1
        newly_failed: list[RecipientState] = []
        for rcpt in message.pending:
            outcome = outcomes.get(rcpt.address) or Outcome(
                Status.DEFERRED, "delivery attempt abandoned", "4.3.0"
            )
            rcpt.attempts += 1
            rcpt.last_error = "" if outcome.status is Status.DELIVERED else outcome.text
            rcpt.status_code, rcpt.relay = outcome.status_code, outcome.relay
            status = outcome.status
            text = outcome.text
            if status is Status.DEFERRED and now - message.arrival >= self.policy.lifetime:
                status = Status.FAILED
                text = f"delivery time expired; last error: {outcome.text}"
                rcpt.last_error = text
            if status is Status.DELIVERED:
                rcpt.status = DELIVERED
                self.counters.delivered += 1
            elif status is Status.FAILED:
                rcpt.status = FAILED
                self.counters.bounced += 1
                newly_failed.append(rcpt)
            else:
                self.counters.deferred += 1
            self.event(
                message.id, **{"to": rcpt.address, "relay": outcome.relay or "none",
                               "delay": round(now - message.arrival, 3),
                               "delays": round(now - started, 3),
                               "dsn": outcome.status_code, "status": status.value,
                               "reply": text},
            )  # fmt: skip
        self._report(message, newly_failed, data, now)
        if message.deleted or not message.pending:
            self._forget(message)
            return
        if (
            self.policy.delay_warning > 0
            and not message.warned
            and now - message.arrival >= self.policy.delay_warning
        ):
            message.warned = True
            self._warn(message, data, now)
        message.next_attempt = now + self.policy.backoff(message.attempts)
        self._write_state(message)
        if not message.held:
            self._push(message)
        self._run_queue()

    def _write_state(self, message: Message) -> None:
        message.has_state = True
        d = self.spool.write_state(message.id, message.state())
        d.addErrback(lambda f: log.failure("writing the state of {id}", f, id=message.id))

    def _forget(self, message: Message) -> None:
        self.messages.pop(message.id, None)
        self.spool.remove(message.id, state=message.has_state)
        self._run_queue()

    # -- bounces ---------------------------------------------------------------------------

    def _report(
        self, message: Message, failed: list[RecipientState], data: bytes, now: float
    ) -> None:
        if not failed:
            return
        if message.sender is None:
            self.event(message.id, status="no-bounce", reason="null sender")
            return
        reports = [
            RecipientReport(r.address, "failed", _as_class(r.status_code, "5"), r.last_error,
                            _host(r.relay))
            for r in failed
        ]  # fmt: skip
        self._send_dsn(message, reports, data, now)
        for r in failed:
            r.reported = True

    def _warn(self, message: Message, data: bytes, now: float) -> None:
        if message.sender is None:
            return
        reports = [
            RecipientReport(r.address, "delayed", _as_class(r.status_code, "4"), r.last_error,
                            _host(r.relay))
            for r in message.pending
        ]  # fmt: skip
        self._send_dsn(message, reports, data, now)

    def _send_dsn(
        self, message: Message, reports: list[RecipientReport], data: bytes, now: float
    ) -> None:
        assert message.sender is not None
        dsn = build_dsn(
            reporting_mta=self.hostname,
            queue_id=message.id,
            original_sender=message.sender,
            arrival=message.arrival,
            now=now,
            reports=reports,
            original=data,
            attach_full=self.bounce_full,
        )
        d = self.inject(None, [message.sender], dsn)
        d.addCallback(
            lambda bounce_id: self.event(
                message.id, status="sender-notify", action=reports[0].action, notice=bounce_id
            )
        )
        d.addErrback(lambda f: log.failure("queuing a bounce for {id}", f, id=message.id))

    # -- queue commands ---------------------------------------------------------------------

    def list(self) -> list[dict[str, Any]]:
        now = self.reactor.seconds()
        return [m.summary(now) for m in sorted(self.messages.values(), key=lambda m: m.id)]

    def show(self, queue_id: str) -> dict[str, Any] | None:
        message = self.messages.get(queue_id)
        if message is None:
            return None
        info = message.summary(self.reactor.seconds())
        info["recipient_state"] = [asdict(r) for r in message.recipients]
        info["envelope"] = self.spool.read_envelope(queue_id)
        data = self.spool.read_data(queue_id)
        end = data.find(b"\r\n\r\n")
        info["headers"] = data[: end if end >= 0 else len(data)].decode("utf-8", "replace")
        return info

    def flush(self) -> int:
        """Retry every deferred message now; the number scheduled."""
        now = self.reactor.seconds()
        count = 0
        for message in self.messages.values():
            if not message.held and not message.in_flight:
                message.next_attempt = now
                self._push(message)
                count += 1
        self._run_queue()
        return count

    def hold(self, queue_id: str) -> bool:
        message = self.messages.get(queue_id)
        if message is None:
            return False
        message.held = True
        self._write_state(message)
        self.event(queue_id, status="hold")
        return True

    def release(self, queue_id: str) -> bool:
        message = self.messages.get(queue_id)
        if message is None:
            return False
        message.held = False
        message.next_attempt = self.reactor.seconds()
        self._write_state(message)
        self.event(queue_id, status="release")
        if not message.in_flight:
            self._push(message)
            self._run_queue()
        return True

    def delete(self, queue_id: str) -> bool:
        message = self.messages.get(queue_id)
        if message is None:
            return False
        message.deleted = True
        self.event(queue_id, status="deleted")
        if not message.in_flight:
            self._forget(message)
        return True

    def stats(self) -> dict[str, int]:
        values = asdict(self.counters)
        values["queue_size"] = len(self.messages)
        values["active"] = len(self._active)
        return values

    def wait_idle(self) -> Deferred[None]:
        """Fires when nothing is in flight (for tests and benchmarks)."""
        if not self._active:
            return succeed(None)
        return DeferredList(list(self._active.values()), consumeErrors=True).addCallback(
            lambda _: None
        )

    def retry(self, queue_id: str, *, reset: bool = False) -> bool:
        """Make one message due now (``flush ID``); held messages stay held.

        With ``reset`` (``requeue``) its attempt counts and last errors are
        cleared too, for a fresh start once the cause is fixed; its arrival
        time, and so its maximal lifetime, are kept. False if not queued.
        """
        message = self.messages.get(queue_id)
        if message is None or message.deleted:
            return False
        if reset:
            message.attempts = 0
            for rcpt in message.pending:
                rcpt.attempts = 0
                rcpt.last_error = ""
        message.next_attempt = self.reactor.seconds()
        self._write_state(message)
        self.event(queue_id, status="requeue" if reset else "flush")
        if not message.held and not message.in_flight:
            self._push(message)
            self._run_queue()
        return True


def _as_class(code: str, klass: str) -> str:
    if code and code[0] == klass:
        return code
    return klass + (code[1:] if code else ".0.0")


def _host(relay: str) -> str | None:
    if not relay:
        return None
    return relay.split("[")[0] or None
