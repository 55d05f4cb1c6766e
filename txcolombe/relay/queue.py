"""The queue manager: per-recipient state, scheduling, retries, bounces.

Each message in the spool has one :class:`RecipientState` per recipient:
``pending`` until it is ``delivered`` or ``failed``. A delivery attempt
sends the pending recipients, grouped by the transport's destinations; a
temporary failure keeps the recipient pending until the next attempt, after
a backoff that doubles from ``min_backoff`` to ``max_backoff`` (Postfix's
300 s and 4000 s by default); after ``lifetime`` (5 days) it fails. Failed
recipients are reported to the sender in one RFC 3464 bounce, sent from the
null sender; a message from the null sender is never bounced.

Nothing leaves the spool unaccounted for:

- a failure that is the relay's own (its smarthost credentials, TLS, the
  network, DNS, its configuration; see
  :func:`~txcolombe.delivery.outcome.local_reason`) only defers the message,
  is logged once when it starts and when it ends, and is counted
  (``deferred_local``, per reason);
- a message whose bounce (or delay warning) cannot be spooled, e.g. on a
  full disk, stays in the queue and the notice is tried again at its next
  attempt; a failed state write is retried too;
- a null-sender message (a bounce) that cannot be delivered goes to the
  ``postmaster`` address when one is set; else, at the end of its lifetime
  it is kept on hold (``list`` shows it), and on a permanent refusal it is
  discarded with a log line saying so.

On start, deferred messages keep their stored retry time; those already due
are spread over ``restart_spread`` seconds rather than all retried at once.
Time comes from the reactor (``IReactorTime.seconds``), so tests drive it
with a ``Clock``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from txcolombe.client.options import MessageOptions
from txcolombe.codec.address import Mailbox, parse_recipient, parse_sender
from txcolombe.codec.errors import SMTPError
from txcolombe.delivery.outcome import DeliveryStatus, Outcome, failed, with_class
from txcolombe.relay.bounce import RecipientReport, build_dsn
from txcolombe.relay.signing import RelaySigning, StreamSigning
from txcolombe.relay.spool import IncomingFile, Spool, new_queue_id
from txcolombe.relay.transport import LOCAL, Transport
from txcolombe.server.machine import ServerEnvelope
from txcolombe.server.received import received_header

log = Logger(namespace="txcolombe.relay")

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"

#: Messages up to this size stay in memory until their first attempt, which
#: then needs no read from the spool.
KEEP_IN_MEMORY = 256 * 1024

#: Seconds before a state write that failed (e.g. a full disk) is tried again.
STATE_RETRY = 60.0

#: The start of the last error of a recipient whose lifetime ran out.
EXPIRED = "delivery time expired"

#: Why deliveries in flight at shutdown did not finish.
SHUTDOWN_TEXT = "delivery abandoned: relay shutting down"


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
    deferred_local: int = 0
    """Recipient attempts deferred for a failure of the relay's own."""
    notices_held: int = 0
    """Undeliverable null-sender messages kept on hold at the end of their lifetime."""
    spool_errors: int = 0
    """Bounces, warnings or states that could not be written (retried later)."""
    local_reasons: dict[str, int] = field(default_factory=dict)
    """``deferred_local`` by reason (:data:`~txcolombe.delivery.outcome.LOCAL_REASONS`)."""


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
    :ivar declared: what the client declared on MAIL (BODY, SMTPUTF8), passed on.
    :ivar prefix: ``DKIM-Signature`` fields sent in front of the spooled
        message, kept in its state file (a message streamed to the spool is
        signed once its end is in; one held in memory is spooled signed).
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
    declared: MessageOptions = LOCAL
    prefix: bytes = field(default=b"", repr=False)

    @property
    def pending(self) -> list[RecipientState]:
        return [r for r in self.recipients if r.status == PENDING]

    @property
    def unreported(self) -> list[RecipientState]:
        """Failed recipients whose failure is not yet reported (nor disposed of)."""
        return [r for r in self.recipients if r.status == FAILED and not r.reported]

    def state(self) -> dict[str, Any]:
        state = {
            "held": self.held,
            "warned": self.warned,
            "attempts": self.attempts,
            "next_attempt": self.next_attempt,
            "recipients": [asdict(r) for r in self.recipients],
        }
        if self.prefix:
            state["dkim"] = self.prefix.decode("ascii")
        return state

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


def _intake_record(envelope: ServerEnvelope) -> dict[str, Any]:
    """What the spool keeps of an SMTP envelope besides sender and recipients."""
    return {"client": envelope.client_address, "helo": envelope.helo,
            "protocol": envelope.protocol, "auth": envelope.authenticated,
            "body": envelope.body_type, "smtputf8": envelope.smtputf8,
            "utf8": _as_given(envelope)}  # fmt: skip


def _as_given(envelope: ServerEnvelope) -> dict[str, str]:
    """The addresses whose domain came in U-labels, as they came (RFC 6531:
    an SMTPUTF8 next hop gets the envelope as received), by their A-label form."""
    mailboxes = [envelope.sender, *envelope.recipients]
    return {str(m): m.utf8() for m in mailboxes if m is not None and m.utf8_domain is not None}


def _declared(record: dict[str, Any]) -> MessageOptions:
    """What a spool record says its client declared on MAIL.

    A record from SMTP always has ``body`` (None: no BODY parameter, which
    is 7BIT); a message made here (a bounce) has none.
    """
    if "body" not in record:
        return LOCAL
    return MessageOptions(body_type=record["body"] or "7BIT", smtputf8=bool(record.get("smtputf8")))


def _with_headers(declared: MessageOptions, data: bytes) -> MessageOptions:
    """``declared`` and whether an SMTPUTF8 message's header has UTF-8."""
    if not declared.smtputf8:
        return declared
    end = data.find(b"\r\n\r\n")
    header = data if end < 0 else data[:end]
    return replace(declared, utf8_headers=not header.isascii())


class IncomingStream:
    """A message from the SMTP server being spooled as it arrives
    (:meth:`QueueManager.accept_stream`)."""

    def __init__(
        self,
        queue: QueueManager,
        file: IncomingFile,
        message: Message,
        extra: dict[str, Any],
        signer: StreamSigning | None = None,
    ) -> None:
        self.queue = queue
        self.file = file
        self.message = message
        self.extra = extra
        self.signer = signer

    def write(self, data: bytes) -> None:
        self.file.write(data)
        if self.signer is not None:
            self.signer.write(data)

    def finish(self) -> Deferred[str]:
        """Fires with the queue id once the message is durable and queued.

        A signed message's signatures go to its state file first, so that
        the message file never exists without them.
        """
        self.message.size = self.file.size

        def queued(_: object) -> str:
            return self.queue._queued(self.message, self.extra)

        prefix = self.signer.finish() if self.signer is not None else b""
        if not prefix:
            return self.file.finish().addCallback(queued)
        self.message.prefix = prefix
        self.message.has_state = True
        stored = self.queue.spool.write_state(self.message.id, self.message.state())
        stored.addCallback(lambda _: self.file.finish())
        return stored.addErrback(self._failed).addCallback(queued)

    def _failed(self, failure: Failure) -> Failure:
        """Nothing of a message not answered 250 stays behind (a state file
        left by a crash here goes at the next start)."""
        self.file.abort()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.queue.spool.queue_dir / f"{self.message.id}.state")
        return failure

    def abort(self) -> None:
        self.file.abort()


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
        postmaster: str | None = None,
        restart_spread: float = 60.0,
        signing: RelaySigning | None = None,
    ) -> None:
        """:param postmaster: where undeliverable null-sender messages (bounces)
            go; None: they are kept on hold at the end of their lifetime.
        :param restart_spread: seconds over which the deferred messages that
            are due at start are spread.
        :param signing: DKIM-signs the messages it says to, at intake
            (after our Received header); may be replaced on a reload.
        """
        self.signing = signing
        self.spool = spool
        self.transport = transport
        self.reactor = reactor
        self.hostname = hostname
        self.policy = policy or RetryPolicy()
        self.max_active = max_active
        self.log_format = log_format
        self.bounce_full = bounce_full
        if postmaster:
            parse_recipient(postmaster)  # InvalidAddress now, not when it is needed
        self.postmaster = postmaster
        self.restart_spread = restart_spread
        self.counters = Counters()
        self.messages: dict[str, Message] = {}
        self._due: list[tuple[float, str]] = []
        self._active: dict[str, Deferred[None]] = {}
        self._timer: IDelayedCall | None = None
        self._running = False
        self._stopping = False
        self._state_retries: dict[str, IDelayedCall] = {}
        self._local_failure: tuple[str, str] | None = None

    # -- logging ----------------------------------------------------------------

    def event(self, queue_id: str, **fields: Any) -> None:
        text = event_text(self.log_format, queue_id, fields)
        log.info("{relay_text}", relay_text=text, relay_id=queue_id, relay_fields=fields)

    # -- life cycle ---------------------------------------------------------------

    def start(self) -> None:
        """Load the spool and start delivering."""
        now = self.reactor.seconds()
        due: list[Message] = []
        for queue_id in self.spool.queue_ids():
            try:
                message = self._load(queue_id)
            except (OSError, ValueError) as error:
                log.error("cannot load {id}: {error}", id=queue_id, error=error)
                continue
            if not message.pending and not message.unreported:
                self.spool.remove(queue_id)
                continue
            self.messages[queue_id] = message
            if message.held:
                continue
            if message.attempts > 0 and message.next_attempt <= now:
                due.append(message)
                continue
            if message.attempts == 0:
                message.next_attempt = now  # never tried: at once
            else:  # as scheduled (bounded, should the clock have jumped)
                message.next_attempt = min(message.next_attempt, now + self.policy.max_backoff)
            self._push(message)
        # The deferred messages that are due: in their order, spread out.
        due.sort(key=lambda m: m.next_attempt)
        for index, message in enumerate(due):
            message.next_attempt = now + self.restart_spread * index / len(due)
            self._push(message)
        self._stopping = False
        self._running = True
        if self.messages:
            log.info("queue recovered: {count} messages", count=len(self.messages))
        self._run_queue()

    def stop(self, grace: float = 10.0) -> Deferred[None]:
        """Stop scheduling; wait up to ``grace`` seconds for deliveries in flight,
        then abandon them (they stay pending in the spool)."""
        self._running = False
        self._stopping = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        for retry in self._state_retries.values():
            if retry.active():
                retry.cancel()
        self._state_retries.clear()
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
        given: dict[str, str] = envelope.get("utf8") or {}
        sender = envelope["sender"]
        mailboxes: dict[str | None, Mailbox | None] = {
            None: parse_sender(given.get(sender, sender) if sender is not None else None)
        }
        for rcpt in recipients:
            mailboxes[rcpt.address] = parse_recipient(given.get(rcpt.address, rcpt.address))
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
            declared=_declared(envelope),
            prefix=state.get("dkim", "").encode("ascii"),
        )

    # -- intake -------------------------------------------------------------------------

    def accept(self, envelope: ServerEnvelope, data: bytes) -> Deferred[str]:
        """Spool a message from the SMTP server, with our Received header
        (and DKIM signatures in front of it, when :attr:`signing` says so)."""
        queue_id = new_queue_id()
        data = received_header(envelope, self.hostname, queue_id, time.time()) + data
        if self.signing is not None:
            data = self.signing.sign(envelope, data) + data
        sender = str(envelope.sender) if envelope.sender is not None else None
        mailboxes: dict[str | None, Mailbox | None] = {None: envelope.sender}
        for rcpt in envelope.recipients:
            mailboxes[str(rcpt)] = rcpt
        return self._spool(
            queue_id, sender, [str(r) for r in envelope.recipients], data,
            _intake_record(envelope), mailboxes,
        )  # fmt: skip

    def accept_stream(self, envelope: ServerEnvelope) -> IncomingStream:
        """Start spooling a large message from the SMTP server as it arrives
        (our Received header first); it is queued once its end is durable."""
        queue_id = new_queue_id()
        header = received_header(envelope, self.hostname, queue_id, time.time())
        sender = str(envelope.sender) if envelope.sender is not None else None
        recipients = [str(r) for r in envelope.recipients]
        mailboxes: dict[str | None, Mailbox | None] = {None: envelope.sender}
        for rcpt in envelope.recipients:
            mailboxes[str(rcpt)] = rcpt
        extra = _intake_record(envelope)
        arrival = self.reactor.seconds()
        record = {"id": queue_id, "sender": sender, "recipients": recipients,
                  "arrival": arrival, **extra}  # fmt: skip
        message = Message(
            id=queue_id, sender=sender, recipients=[RecipientState(r) for r in recipients],
            arrival=arrival, size=0, next_attempt=arrival, client=envelope.client_address,
            mailboxes=mailboxes, declared=_declared(extra),
        )  # fmt: skip
        incoming = self.spool.incoming(queue_id, record)
        incoming.write(header)
        signer = None if self.signing is None else self.signing.stream(envelope)
        if signer is not None:
            signer.write(header)
        return IncomingStream(self, incoming, message, extra, signer)

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
            declared=_declared(extra),
        )

        return self.spool.write_message(queue_id, record, data).addCallback(
            lambda _: self._queued(message, extra)
        )

    def _queued(self, message: Message, extra: dict[str, Any]) -> str:
        """A new message is durable: log it and send it on."""
        self.counters.received += 1
        self.messages[message.id] = message
        fields = {"from": message.sender or "", "size": message.size,
                  "nrcpt": len(message.recipients), "client": message.client}  # fmt: skip
        if extra.get("auth"):
            fields["sasl_username"] = extra["auth"]
        self.event(message.id, **fields)
        if self._running and len(self._active) < self.max_active:
            self._dispatch(message)  # the common case: straight out
        else:
            self._push(message)
            self._run_queue()
        return message.id

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
        started = self.reactor.seconds()
        if data is None:
            try:
                data = message.prefix + self.spool.read_data(message.id)
            except OSError as error:
                log.error("cannot read {id}: {error}; retrying later", id=message.id, error=error)
                message.in_flight = False
                self._reschedule(message, started)
                return
        if not message.pending:  # only its notices are left to queue
            self._settle(message, data, abandoned=False)
            return
        mailboxes = message.mailboxes
        sender = mailboxes[None]
        groups: dict[str, list[Mailbox]] = {}
        for rcpt in message.pending:
            mailbox = mailboxes[rcpt.address]
            assert mailbox is not None
            groups.setdefault(self.transport.route(mailbox), []).append(mailbox)
        declared = _with_headers(message.declared, data)
        attempts = [
            self._send(dest, sender, rcpts, data, declared) for dest, rcpts in groups.items()
        ]

        def done(results: list[tuple[bool, Any]]) -> None:
            self._active.pop(message.id, None)
            outcomes: dict[str, Outcome] = {}
            for (ok, value), (dest, rcpts) in zip(results, groups.items(), strict=True):
                if ok:
                    outcomes.update(value)
                else:  # a transport that broke its promise never to fail
                    error = value.value if isinstance(value, Failure) else None
                    error = error if error is not None else RuntimeError(str(value))
                    outcomes.update({str(r): failed(str(r), error, domain=dest) for r in rcpts})
            self._finished(message, outcomes, data, started)

        finished: Deferred[Any] = DeferredList(attempts, consumeErrors=True)
        self._active[message.id] = finished
        finished.addCallback(done)

    def _send(
        self,
        destination: str,
        sender: Mailbox | None,
        rcpts: list[Mailbox],
        data: bytes,
        declared: MessageOptions,
    ) -> Deferred[dict[str, Outcome]]:
        try:
            return self.transport.send(destination, sender, rcpts, data, declared)
        except Exception:
            return fail()

    def _finished(
        self, message: Message, outcomes: dict[str, Outcome], data: bytes, started: float
    ) -> None:
        now = self.reactor.seconds()
        abandoned = True  # by a shutdown, every one of them
        for rcpt in message.pending:
            outcome = outcomes.get(rcpt.address) or _abandoned(
                rcpt.address, "delivery attempt abandoned", "software"
            )
            if self._stopping and outcome.local in ("shutdown", "software"):
                outcome = dataclasses.replace(
                    _abandoned(rcpt.address, SHUTDOWN_TEXT, "shutdown"),
                    mx=outcome.mx,
                    port=outcome.port,
                )
            abandoned = abandoned and outcome.local == "shutdown"
            if outcome.local != "shutdown":
                rcpt.attempts += 1
            self._note_local(outcome)
            rcpt.last_error = "" if outcome.delivered else outcome.text
            rcpt.status_code, rcpt.relay = outcome.status_code, relay_name(outcome)
            status = outcome.status
            text = outcome.text
            if outcome.temporary and now - message.arrival >= self.policy.lifetime:
                status = DeliveryStatus.PERMANENT
                text = f"{EXPIRED}; last error: {outcome.text}"
                rcpt.last_error = text
            if status is DeliveryStatus.DELIVERED:
                rcpt.status = DELIVERED
                self.counters.delivered += 1
            elif status is DeliveryStatus.PERMANENT:
                rcpt.status = FAILED
                self.counters.bounced += 1
            else:
                self.counters.deferred += 1
                if outcome.local:
                    self.counters.deferred_local += 1
                    reasons = self.counters.local_reasons
                    reasons[outcome.local] = reasons.get(outcome.local, 0) + 1
            self.event(
                message.id, **{"to": rcpt.address, "relay": rcpt.relay or "none",
                               "delay": round(now - message.arrival, 3),
                               "delays": round(now - started, 3),
                               "dsn": outcome.status_code, "status": _STATUS_WORDS[status],
                               "reply": text},
            )  # fmt: skip
        if not abandoned:
            message.attempts += 1
        self._settle(message, data, abandoned=abandoned)

    def _note_local(self, outcome: Outcome) -> None:
        """Log when a failure of the relay's own starts, changes or ends (not
        once per message: it meets every message alike)."""
        if outcome.local in ("", "shutdown"):
            if outcome.delivered and self._local_failure is not None:
                log.info(
                    "delivering again through {relay} after the relay's own failure ({reason})",
                    relay=relay_name(outcome), reason=self._local_failure[0],
                )  # fmt: skip
                self._local_failure = None
            return
        if self._local_failure != (outcome.local, outcome.text):
            self._local_failure = (outcome.local, outcome.text)
            log.error(
                "the relay's own failure ({reason}) delivering through {relay}: {text}; "
                "messages stay queued (deferred, not bounced) until it is fixed",
                reason=outcome.local, relay=relay_name(outcome) or "none", text=outcome.text,
            )  # fmt: skip

    def _settle(self, message: Message, data: bytes, *, abandoned: bool) -> None:
        """Queue the notices an attempt calls for, then forget or reschedule the
        message: not before its bounce is durable."""
        if message.deleted:
            self._done(message, abandoned=abandoned)
            return
        notices: list[Deferred[None]] = []
        now = self.reactor.seconds()
        if message.unreported:
            notices.append(self._report(message, data, now))
        if (
            self.policy.delay_warning > 0
            and message.pending
            and not message.warned
            and not message.held
            and now - message.arrival >= self.policy.delay_warning
        ):
            notices.append(self._warn(message, data, now))
        if not notices:
            self._done(message, abandoned=abandoned)
            return
        waiting: Deferred[Any] = DeferredList(notices, consumeErrors=True)
        waiting.addCallback(lambda _: self._done(message, abandoned=abandoned))

    def _done(self, message: Message, *, abandoned: bool) -> None:
        message.in_flight = False
        if message.deleted or (not message.pending and not message.unreported):
            self._forget(message)
            return
        now = self.reactor.seconds()
        if abandoned or any(r.attempts == 0 for r in message.pending):
            # Not really tried (a shutdown), or a new recipient (the postmaster).
            message.next_attempt = now
            self._write_state(message)
            if not message.held:
                self._push(message)
            self._run_queue()
            return
        self._reschedule(message, now)

    def _reschedule(self, message: Message, now: float) -> None:
        message.next_attempt = now + self.policy.backoff(message.attempts)
        self._write_state(message)
        if not message.held:
            self._push(message)
        self._run_queue()

    def _write_state(self, message: Message) -> None:
        message.has_state = True
        d = self.spool.write_state(message.id, message.state())
        d.addErrback(self._state_failed, message)

    def _state_failed(self, failure: Failure, message: Message) -> None:
        """A state write failed: the message stays as it is (in memory and in
        the spool) and the write is tried again."""
        self.counters.spool_errors += 1
        log.error(
            "cannot write the state of {id}: {error}; the message stays queued, "
            "retrying in {delay} s", id=message.id, error=failure.getErrorMessage(),
            delay=STATE_RETRY,
        )  # fmt: skip
        if self._stopping or message.id in self._state_retries:
            return

        def retry() -> None:
            del self._state_retries[message.id]
            if self.messages.get(message.id) is message:
                self._write_state(message)

        self._state_retries[message.id] = self.reactor.callLater(STATE_RETRY, retry)

    def _forget(self, message: Message) -> None:
        self.messages.pop(message.id, None)
        retry = self._state_retries.pop(message.id, None)
        if retry is not None and retry.active():
            retry.cancel()
        self.spool.remove(message.id, state=message.has_state)
        self._run_queue()

    # -- bounces ---------------------------------------------------------------------------

    def _report(self, message: Message, data: bytes, now: float) -> Deferred[None]:
        """Bounce the unreported failed recipients; they stay unreported (and
        the message queued) if the bounce cannot be spooled."""
        failed = message.unreported
        if message.sender is None:
            self._undeliverable_notice(message, failed)
            return succeed(None)
        reports = [
            RecipientReport(r.address, "failed", _as_class(r.status_code, PERMANENT), r.last_error,
                            _host(r.relay))
            for r in failed
        ]  # fmt: skip

        def spooled() -> None:
            for r in failed:
                r.reported = True

        return self._send_dsn(message, reports, data, now, spooled)

    def _undeliverable_notice(self, message: Message, failed: list[RecipientState]) -> None:
        """A null-sender message failed: to the postmaster, else on hold (expired)
        or discarded (refused), never silently."""
        postmaster = self.postmaster
        for rcpt in failed:
            addresses = {r.address.lower() for r in message.recipients}
            if postmaster and postmaster.lower() not in addresses:
                rcpt.reported = True
                message.recipients.append(RecipientState(postmaster))
                message.mailboxes[postmaster] = parse_recipient(postmaster)
                self.event(
                    message.id, status="redirected", to=postmaster,
                    reason=f"null sender, undeliverable to <{rcpt.address}>: {rcpt.last_error}",
                )  # fmt: skip
            elif rcpt.last_error.startswith(EXPIRED):
                rcpt.status = PENDING
                message.held = True
                self.counters.notices_held += 1
                self.event(
                    message.id, status="hold", to=rcpt.address,
                    reason=f"null sender, kept on hold: {rcpt.last_error}",
                )  # fmt: skip
            else:
                rcpt.reported = True
                self.event(
                    message.id, status="discarded", to=rcpt.address,
                    reason=f"null sender, nobody to notify: {rcpt.last_error}",
                )  # fmt: skip

    def _warn(self, message: Message, data: bytes, now: float) -> Deferred[None]:
        if message.sender is None:
            return succeed(None)
        reports = [
            RecipientReport(r.address, "delayed", _as_class(r.status_code, TEMPORARY), r.last_error,
                            _host(r.relay))
            for r in message.pending
        ]  # fmt: skip

        def spooled() -> None:
            message.warned = True

        return self._send_dsn(message, reports, data, now, spooled)

    def _send_dsn(
        self,
        message: Message,
        reports: list[RecipientReport],
        data: bytes,
        now: float,
        spooled: Callable[[], None],
    ) -> Deferred[None]:
        """Queue a DSN; ``spooled`` runs once it is durable. A failure is logged
        and swallowed: the caller's state says it is still to be sent."""
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
        action = reports[0].action

        def done(bounce_id: str) -> None:
            spooled()
            self.event(message.id, status="sender-notify", action=action, notice=bounce_id)

        def failed(failure: Failure) -> None:
            self.counters.spool_errors += 1
            log.error(
                "cannot queue the {action} notice for {id}: {error}; the message stays "
                "queued and the notice is tried again",
                action=action, id=message.id, error=failure.getErrorMessage(),
            )  # fmt: skip

        return self.inject(None, [message.sender], dsn).addCallbacks(done, failed)

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
        data = message.prefix + self.spool.read_data(queue_id)
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
        """The counters, ``deferred_local`` also by reason (``deferred_local_auth``, ...)."""
        values = asdict(self.counters)
        reasons: dict[str, int] = values.pop("local_reasons")
        for reason, count in sorted(reasons.items()):
            values[f"deferred_local_{reason}"] = count
        values["queue_size"] = len(self.messages)
        values["active"] = len(self._active)
        return values

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


def _as_class(code: str, status: DeliveryStatus) -> str:
    """A stored status code in the class of ``status`` (X.0.0 for none)."""
    try:
        major, minor, detail = (int(part) for part in code.split("."))
    except ValueError:
        return ".".join(map(str, with_class(None, status)))
    return ".".join(map(str, with_class((major, minor, detail), status)))


def relay_name(outcome: Outcome) -> str:
    """Where an outcome was decided, for logs and DSNs: ``host[port]``, the
    host alone, or else the recipient's domain."""
    if outcome.mx and outcome.port is not None:
        return f"{outcome.mx}[{outcome.port}]"
    return outcome.mx or outcome.domain


def _abandoned(recipient: str, text: str, reason: str) -> Outcome:
    """An attempt that ended without a word from the transport."""
    domain = recipient.rpartition("@")[2]
    error = SMTPError(text, temporary=True)
    return Outcome(recipient, domain, DeliveryStatus.TEMPORARY, error=error, local=reason)


TEMPORARY, PERMANENT = DeliveryStatus.TEMPORARY, DeliveryStatus.PERMANENT

#: How the relay's log words each status (Postfix's).
_STATUS_WORDS = {
    DeliveryStatus.DELIVERED: "delivered",
    DeliveryStatus.TEMPORARY: "deferred",
    DeliveryStatus.PERMANENT: "failed",
}


def _host(relay: str) -> str | None:
    if not relay:
        return None
    return relay.split("[")[0] or None
