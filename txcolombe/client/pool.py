"""A pool of SMTP sessions, reused across messages to the same server.

Sessions are keyed by everything that makes one unusable for another
message: destination, port, TLS mode and options, EHLO name, credentials.
Each key has a cap on simultaneous connections; a message waits for a free
session rather than opening more. An idle session is closed after
``idle_timeout`` seconds and every session after ``max_messages``
transactions. A reused session sends RSET pipelined before MAIL
(``reset_first``), so a server that silently dropped an idle connection is
noticed before anything of the message is at stake, and the message is
retried once on a new connection.

``sendmail()``, ``submit()`` and the relay can all send through one pool::

    pool = Pool(max_per_destination=4)
    receipt = await pool.send("smtp.example.com", sender, recipients, body,
                              port=587, tls_mode=TLSMode.REQUIRED,
                              authentication=auth)
    await pool.close()
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, fail
from twisted.internet.interfaces import IDelayedCall

from txcolombe.client.body import Body
from txcolombe.client.connect import Destination
from txcolombe.client.receipt import Receipt
from txcolombe.client.session import Session, check_message, connect
from txcolombe.client.signing import DKIM, signed_body, signers
from txcolombe.codec.address import Mailbox
from txcolombe.codec.dsn import Recipient
from txcolombe.codec.errors import ConnectionFailed, SMTPError, Step, UsageError

#: Steps at which a failure on a reused session is safe to retry elsewhere:
#: the server cannot have accepted the message yet.
_RETRYABLE_STEPS = {Step.RSET, Step.MAIL, Step.RCPT, Step.DATA, None}


@dataclass(eq=False)
class _Idle:
    session: Session
    messages: int
    timer: IDelayedCall | None = None


@dataclass(eq=False)
class _Slot:
    """The sessions of one key."""

    idle: deque[_Idle] = field(default_factory=deque)
    busy: int = 0
    waiters: deque[Deferred[None]] = field(default_factory=deque)


def _key(destination: Destination, options: dict[str, Any]) -> Hashable:
    """What makes two sessions interchangeable (objects by identity)."""
    parts: list[Hashable] = [str(destination)]
    for name in sorted(options):
        value = options[name]
        parts.append((name, value if isinstance(value, Hashable) else id(value)))
    return tuple(parts)


class Pool:
    """Sessions kept open and shared between messages.

    :param max_per_destination: simultaneous connections per key.
    :param idle_timeout: seconds an unused session stays open.
    :param max_messages: transactions per connection before it is replaced.
    :param reactor: for timers and connections (default: the global one).
    """

    def __init__(
        self,
        *,
        max_per_destination: int = 2,
        idle_timeout: float = 60.0,
        max_messages: int = 100,
        reactor: Any = None,
    ) -> None:
        if max_per_destination < 1 or max_messages < 1:
            raise UsageError("max_per_destination and max_messages must be at least 1")
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self._reactor = reactor
        self._max = max_per_destination
        self._idle_timeout = idle_timeout
        self._max_messages = max_messages
        self._slots: dict[Hashable, _Slot] = {}
        self._closed = False

    @property
    def idle_sessions(self) -> int:
        """How many sessions are open and unused now."""
        return sum(len(slot.idle) for slot in self._slots.values())

    def send(
        self,
        destination: Destination,
        sender: str | Mailbox | None,
        recipients: Iterable[str | Mailbox | Recipient],
        body: Body,
        *,
        all_or_nothing: bool = False,
        dkim: DKIM = None,
        **connect_options: Any,
    ) -> Deferred[Receipt]:
        """Send one message through a pooled session to ``destination``.

        ``connect_options`` are those of :func:`txcolombe.client.session.connect`
        (port, tls_mode, domain, tls, trust_root, authentication, timeouts,
        endpoint). A body sent twice (after a dropped idle connection) must
        be replayable: bytes, a seekable file or an ``EmailMessage``.
        ``dkim`` (one :class:`~txcolombe.codec.dkim.DKIMSigner` or several) signs
        the body first, which makes any body replayable.
        """
        try:
            recipients = list(check_message(sender, recipients, body))
            found = signers(dkim)
        except SMTPError as error:
            return fail(error)
        return Deferred.fromCoroutine(
            self._signed_send(
                destination, sender, recipients, body, found, all_or_nothing, connect_options
            )
        )

    async def _signed_send(
        self,
        destination: Destination,
        sender: str | Mailbox | None,
        recipients: list[str | Mailbox | Recipient],
        body: Body,
        dkim: DKIM,
        all_or_nothing: bool,
        options: dict[str, Any],
    ) -> Receipt:
        async with signed_body(body, dkim) as message:
            return await self._send(
                destination, sender, recipients, message, all_or_nothing, options
            )

    async def _send(
        self,
        destination: Destination,
        sender: str | Mailbox | None,
        recipients: list[str | Mailbox | Recipient],
        body: Body,
        all_or_nothing: bool,
        options: dict[str, Any],
    ) -> Receipt:
        if self._closed:
            raise UsageError("the pool is closed")
        options.setdefault("reactor", self._reactor)
        key = _key(destination, options)
        slot = self._slots.setdefault(key, _Slot())
        while slot.busy >= self._max:
            waiter: Deferred[None] = Deferred()
            slot.waiters.append(waiter)
            await waiter
        slot.busy += 1
        try:
            reused = self._take_idle(slot)
            if reused is not None:
                try:
                    receipt = await reused.session.send(
                        sender, recipients, body, all_or_nothing=all_or_nothing, reset_first=True
                    )
                except ConnectionFailed as error:
                    if error.maybe_delivered or error.step not in _RETRYABLE_STEPS:
                        raise
                    # The idle connection was gone: try once more on a new one.
                    reused = None
                else:
                    self._release(slot, reused.session, reused.messages + 1)
                    return receipt
            session = await connect(destination, **options)
            try:
                receipt = await session.send(
                    sender, recipients, body, all_or_nothing=all_or_nothing
                )
            except BaseException:
                self._release(slot, session, 1)
                raise
            self._release(slot, session, 1)
            return receipt
        finally:
            slot.busy -= 1
            if slot.waiters:
                slot.waiters.popleft().callback(None)

    def _take_idle(self, slot: _Slot) -> _Idle | None:
        while slot.idle:
            idle = slot.idle.pop()  # the most recently used first
            if idle.timer is not None and idle.timer.active():
                idle.timer.cancel()
            if not idle.session.closed.called:
                return idle
        return None

    def _release(self, slot: _Slot, session: Session, messages: int) -> None:
        """Keep ``session`` for the next message, or QUIT it."""
        if session.closed.called:
            return
        if self._closed or messages >= self._max_messages or not session.usable:
            session.quit()
            return
        idle = _Idle(session, messages)
        idle.timer = self._reactor.callLater(self._idle_timeout, self._expire, slot, idle)
        slot.idle.append(idle)

    def _expire(self, slot: _Slot, idle: _Idle) -> None:
        if idle in slot.idle:
            slot.idle.remove(idle)
            idle.session.quit()

    async def close(self) -> None:
        """QUIT every idle session and refuse new messages; waits for the QUITs."""
        self._closed = True
        closing: list[Deferred[None]] = []
        for slot in self._slots.values():
            while slot.idle:
                idle = slot.idle.pop()
                if idle.timer is not None and idle.timer.active():
                    idle.timer.cancel()
                closing.append(idle.session.quit())
        if closing:
            await DeferredList(closing, consumeErrors=True)
