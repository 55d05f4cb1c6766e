"""How queued mail leaves the relay: to a smarthost, or to the recipients' MX.

A :class:`Transport` routes each recipient to a destination key and sends one
message to a group of recipients of one destination, answering with one
:class:`Outcome` per recipient. :class:`SmarthostTransport` keeps a pool of
txcolombe :class:`~txcolombe.session.Session`\\ s per destination: sessions are
reused for message after message, at most ``concurrency`` at a time, and
closed after ``idle_timeout`` seconds of idleness.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from txcolombe.address import Mailbox
from txcolombe.auth import Authentication
from txcolombe.errors import RecipientsRefused, SMTPError
from txcolombe.machine import TLSMode
from txcolombe.protocol import Timeouts
from txcolombe.reply import Reply
from txcolombe.session import Session, connect

log = Logger(namespace="txcolombe.relay")


class Status(enum.Enum):
    DELIVERED = "delivered"
    DEFERRED = "deferred"
    FAILED = "failed"


@dataclass(frozen=True)
class Outcome:
    """What became of one recipient in one attempt.

    :ivar text: the remote reply (``550 5.1.1 ...``) or our description.
    :ivar status_code: the RFC 3463 code for DSNs.
    """

    status: Status
    text: str
    status_code: str
    relay: str = ""


def outcome_from_reply(reply: Reply, relay: str) -> Outcome:
    if reply.code < 400:
        status = Status.DELIVERED
    elif reply.code < 500:
        status = Status.DEFERRED
    else:
        status = Status.FAILED
    enhanced = reply.enhanced_status
    if enhanced is not None:
        code = ".".join(map(str, enhanced))
    else:
        code = {Status.DELIVERED: "2.0.0", Status.DEFERRED: "4.0.0", Status.FAILED: "5.0.0"}[status]
    return Outcome(status, str(reply), code, relay)


def outcome_from_error(error: BaseException, relay: str) -> Outcome:
    if isinstance(error, SMTPError):
        if error.reply is not None:
            out = outcome_from_reply(error.reply, relay)
            if error.temporary and out.status is Status.FAILED:
                return Outcome(Status.DEFERRED, out.text, "4" + out.status_code[1:], relay)
            return out
        if error.temporary:
            return Outcome(Status.DEFERRED, str(error), "4.4.1", relay)
        return Outcome(Status.FAILED, str(error), "5.3.0", relay)
    return Outcome(Status.DEFERRED, f"local error: {error}", "4.3.0", relay)


class Transport(Protocol):
    """Where the queue manager sends mail."""

    def route(self, recipient: Mailbox) -> str:
        """The destination key of ``recipient`` (recipients are grouped by it)."""

    def send(
        self, destination: str, sender: Mailbox | None, recipients: Sequence[Mailbox], data: bytes
    ) -> Deferred[dict[str, Outcome]]:
        """Send one message to recipients of one destination; never fails."""

    def close(self) -> Deferred[None]:
        """Close idle connections."""


@dataclass(frozen=True)
class Smarthost:
    """Where and how to reach the smarthost."""

    host: str
    port: int = 587
    tls: TLSMode = TLSMode.REQUIRED
    authentication: Authentication | None = None
    trust_root: Any = None
    domain: str | None = None
    timeouts: Timeouts = field(default_factory=Timeouts)


class SmarthostTransport:
    """Every recipient goes to one smarthost, over pooled sessions."""

    def __init__(
        self,
        smarthost: Smarthost,
        *,
        reactor: Any,
        concurrency: int = 10,
        idle_timeout: float = 30.0,
    ) -> None:
        self.smarthost = smarthost
        self.reactor = reactor
        self.idle_timeout = idle_timeout
        self._slots = DeferredSemaphore(concurrency)
        self._idle: deque[tuple[Session, IDelayedCall]] = deque()
        self._busy: set[Session] = set()
        self.connections = 0
        self.relay = f"{smarthost.host}[{smarthost.port}]"

    def route(self, recipient: Mailbox) -> str:
        return self.relay

    def send(
        self, destination: str, sender: Mailbox | None, recipients: Sequence[Mailbox], data: bytes
    ) -> Deferred[dict[str, Outcome]]:
        return self._slots.run(lambda: Deferred.fromCoroutine(self._send(sender, recipients, data)))

    async def _session(self) -> Session:
        while self._idle:
            session, timer = self._idle.popleft()
            if timer.active():
                timer.cancel()
            if not session.closed.called:
                return session
        host = self.smarthost
        session = await connect(
            host.host, port=host.port, tls_mode=host.tls, domain=host.domain,
            trust_root=host.trust_root, authentication=host.authentication,
            timeouts=host.timeouts, reactor=self.reactor,
        )  # fmt: skip
        self.connections += 1
        return session

    async def _send(
        self, sender: Mailbox | None, recipients: Sequence[Mailbox], data: bytes
    ) -> dict[str, Outcome]:
        names = [str(r) for r in recipients]
        try:
            session = await self._session()
        except Exception as error:
            out = outcome_from_error(error, self.relay)
            return dict.fromkeys(names, out)
        self._busy.add(session)
        try:
            receipt = await session.send(sender, list(recipients), data)
        except RecipientsRefused as error:
            return {
                name: outcome_from_reply(error.refused[name], self.relay)
                if name in error.refused
                else outcome_from_error(error, self.relay)
                for name in names
            }
        except Exception as error:
            return dict.fromkeys(names, outcome_from_error(error, self.relay))
        finally:
            self._busy.discard(session)
            self._release(session)
        results: dict[str, Outcome] = {}
        for name in names:
            if name in receipt.accepted:
                results[name] = outcome_from_reply(receipt.reply, self.relay)
            elif name in receipt.refused:
                results[name] = outcome_from_reply(receipt.refused[name], self.relay)
            else:
                results[name] = Outcome(Status.DEFERRED, "no reply for recipient", "4.0.0")
        return results

    def _release(self, session: Session) -> None:
        if session.closed.called:
            return
        timer = self.reactor.callLater(self.idle_timeout, self._expire, session)
        self._idle.append((session, timer))

    def _expire(self, session: Session) -> None:
        for item in list(self._idle):
            if item[0] is session:
                self._idle.remove(item)
        session.quit()

    def close(self) -> Deferred[None]:
        closing = []
        while self._idle:
            session, timer = self._idle.popleft()
            if timer.active():
                timer.cancel()
            closing.append(session.quit())
        for session in list(self._busy):
            session.abort()
        return DeferredList(closing, consumeErrors=True).addCallback(lambda _: None)


class MXTransport:
    """Each recipient domain to its own exchangers, through ``txcolombe.deliver``.

    ``deliver()`` (issue 4) is being written alongside this module; until it
    is importable every attempt is deferred with a clear reason, so mail
    waits in the queue instead of being lost or bounced.
    """

    def __init__(self, *, reactor: Any, domain: str | None = None, **options: Any) -> None:
        self.reactor = reactor
        self.domain = domain
        self.options = options

    def route(self, recipient: Mailbox) -> str:
        return (recipient.domain or "").lower()

    def send(
        self, destination: str, sender: Mailbox | None, recipients: Sequence[Mailbox], data: bytes
    ) -> Deferred[dict[str, Outcome]]:
        return Deferred.fromCoroutine(self._send(destination, sender, recipients, data))

    async def _send(
        self, destination: str, sender: Mailbox | None, recipients: Sequence[Mailbox], data: bytes
    ) -> dict[str, Outcome]:
        names = [str(r) for r in recipients]
        from txcolombe.deliver import deliver

        try:
            result = await deliver(
                sender, names, data, domain=self.domain, reactor=self.reactor,
                **self.options,
            )  # fmt: skip
        except Exception as error:
            return dict.fromkeys(names, outcome_from_error(error, destination))
        return {name: _mx_outcome(result.get(name), destination) for name in names}

    def close(self) -> Deferred[None]:
        return Deferred.fromCoroutine(_nothing())


async def _nothing() -> None:
    return None


def _mx_outcome(outcome: Any, destination: str) -> Outcome:
    """Read one per-recipient outcome of ``deliver()`` (duck-typed until its API settles)."""
    if outcome is None:
        return Outcome(Status.DEFERRED, "no outcome for recipient", "4.0.0", destination)
    relay = str(getattr(outcome, "mx", None) or getattr(outcome, "host", None) or destination)
    reply = getattr(outcome, "reply", None)
    error = getattr(outcome, "error", None)
    if isinstance(error, BaseException):
        out = outcome_from_error(error, relay)
    elif isinstance(reply, Reply):
        out = outcome_from_reply(reply, relay)
    else:
        return Outcome(Status.DEFERRED, f"unreadable outcome {outcome!r}", "4.0.0", relay)
    # deliver() has the last word on the class (e.g. a null MX is permanent).
    if getattr(outcome, "delivered", False):
        return Outcome(Status.DELIVERED, out.text, out.status_code, relay)
    if getattr(outcome, "permanent", False) and out.status is not Status.FAILED:
        return Outcome(Status.FAILED, out.text, "5" + out.status_code[1:], relay)
    if getattr(outcome, "temporary", False) and out.status is not Status.DEFERRED:
        return Outcome(Status.DEFERRED, out.text, "4" + out.status_code[1:], relay)
    return out
