"""A pool of SMTP sessions, reused across messages to the same server.

Sessions are keyed by the destination and its
:class:`~txcolombe.client.options.ConnectOptions` (port, TLS mode and
options, EHLO name, credentials, ...), compared by value: two equal option
objects share sessions. Each key has a cap on simultaneous connections
(``max_per_destination``); each session takes up to ``pipeline`` messages at
once, pipelined one behind the other. A message goes to the open (or
opening) session with the fewest messages in flight; another session is
opened only when every one has ``pipeline`` in flight, and past the cap the
message waits. An idle session is closed after ``idle_timeout`` seconds and
every session after ``max_messages`` transactions.

A message sent on a session that sat idle is sent with RSET pipelined before
MAIL (``reset_idle``), so that a server that silently dropped the connection
is noticed before anything of the message is at stake; a message that met
such a dead connection is retried once on another.

``sendmail()``-like callers and the relay's smarthost mode send through it::

    pool = Pool(max_per_destination=4)
    receipt = await pool.send("smtp.example.com", sender, recipients, body,
                              port=587, tls_mode=TLSMode.REQUIRED,
                              authentication=auth)
    await pool.close()
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, fail
from twisted.internet.interfaces import (
    IDelayedCall,
    IOpenSSLClientConnectionCreator,
    IStreamClientEndpoint,
)
from twisted.python.failure import Failure

from txcolombe.client.body import Body
from txcolombe.client.connect import Destination
from txcolombe.client.machine import TLSMode
from txcolombe.client.options import (
    DEFAULT_TIMEOUTS,
    ConnectOptions,
    MessageOptions,
    Timeouts,
    TrustRoot,
    default_reactor,
    either,
)
from txcolombe.client.receipt import Receipt
from txcolombe.client.session import Session, check_message, open_session
from txcolombe.client.signing import DKIM, signed_body, signers
from txcolombe.codec.address import Mailbox
from txcolombe.codec.dsn import DSN, Recipient
from txcolombe.codec.errors import ConnectionFailed, SMTPError, Step, TransactionLimit, UsageError
from txcolombe.codec.sasl import Authentication

#: Steps at which a failure on a reused session is safe to retry elsewhere:
#: the server cannot have accepted the message yet.
_RETRYABLE_STEPS = {Step.RSET, Step.MAIL, Step.RCPT, Step.DATA, None}


class _Connection:
    """One pooled session, from its connection attempt on."""

    def __init__(self, pool: Pool, slot: _Slot, attempt: Deferred[Session]) -> None:
        self.pool = pool
        self.slot = slot
        self.session: Session | None = None
        self.in_flight = 0
        self.given = 0
        """Messages handed to it, in flight or done."""
        self.last_used = 0
        self.gone = False
        self.timer: IDelayedCall | None = None
        self._attempt = attempt
        self._ready: list[Deferred[Session]] = []
        self._error: Failure | None = None
        attempt.addCallbacks(self._connected, self._failed)

    def ready(self) -> Deferred[Session]:
        """Fires with the session once it is set up, or fails as the attempt did."""
        if self._error is not None:
            return fail(self._error)
        waiting: Deferred[Session] = Deferred(lambda d: self._ready.remove(d))
        if self.session is not None:
            waiting.callback(self.session)
        else:
            self._ready.append(waiting)
        return waiting

    @property
    def open(self) -> bool:
        """True while it may take another message (pipeline aside)."""
        session = self.session
        if self.gone or self._error is not None:
            return False
        if session is not None and (session.closed.called or not session.usable):
            return False
        limit = self.pool.max_messages
        return limit is None or self.given < limit

    def _connected(self, session: Session) -> None:
        self.session = session
        session.closed.addBoth(self._closed)
        waiting, self._ready = self._ready, []
        for d in waiting:
            d.callback(session)
        self.pool._settled(self)

    def _failed(self, failure: Failure) -> None:
        self._error = failure
        waiting, self._ready = self._ready, []
        for d in waiting:
            d.errback(failure)
        self.pool._drop(self)

    def _closed(self, _: object) -> None:
        self.pool._drop(self)

    def stop_timer(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    def close(self, *, abort: bool) -> Deferred[Any]:
        """QUIT when idle; drop at once with ``abort``; else QUIT after its messages."""
        self.stop_timer()
        if self.session is None:
            self._attempt.cancel()
            return self._attempt.addErrback(lambda _: None)
        if self.in_flight == 0:
            return self.session.quit()
        if abort:
            self.session.abort()
        return self.session.closed


@dataclass(frozen=True)
class _Key:
    """What makes two sessions interchangeable."""

    destination: str
    options: ConnectOptions
    reactor: Any


@dataclass(eq=False)
class _Slot:
    """The sessions of one key."""

    connections: list[_Connection] = field(default_factory=list)
    waiters: deque[Deferred[None]] = field(default_factory=deque)


class Pool:
    """Sessions kept open and shared between messages.

    :param max_per_destination: simultaneous connections per key.
    :param idle_timeout: seconds an unused session stays open.
    :param max_messages: transactions per connection before it is replaced
        (None: no limit).
    :param pipeline: messages in flight on one session at once (1: one
        after the other).
    :param reset_idle: send RSET before a message on a session that sat idle.
    :param reactor: for timers and connections (default: the global one).
    """

    def __init__(
        self,
        *,
        max_per_destination: int = 2,
        idle_timeout: float = 60.0,
        max_messages: int | None = 100,
        pipeline: int = 1,
        reset_idle: bool = True,
        reactor: Any = None,
    ) -> None:
        if max_per_destination < 1 or pipeline < 1:
            raise UsageError("max_per_destination and pipeline must be at least 1")
        if max_messages is not None and max_messages < 1:
            raise UsageError("max_messages must be at least 1 (or None)")
        self._reactor = reactor if reactor is not None else default_reactor()
        self._max = max_per_destination
        self._idle_timeout = idle_timeout
        self.max_messages = max_messages
        self._pipeline = pipeline
        self._reset_idle = reset_idle
        self._slots: dict[_Key, _Slot] = {}
        self._closed = False
        self._uses = 0

    @property
    def idle_sessions(self) -> int:
        """How many sessions are open and unused now."""
        return sum(
            1
            for slot in self._slots.values()
            for conn in slot.connections
            if conn.session is not None and conn.in_flight == 0
        )

    @property
    def in_flight(self) -> int:
        """How many messages are on their way through the pool's sessions."""
        return sum(conn.in_flight for slot in self._slots.values() for conn in slot.connections)

    def send(
        self,
        destination: Destination,
        sender: str | Mailbox | None,
        recipients: Iterable[str | Mailbox | Recipient],
        body: Body,
        *,
        all_or_nothing: bool = False,
        dsn: DSN | None = None,
        requiretls: bool = False,
        chunking: bool | None = None,
        binary: bool = False,
        port: int = 25,
        tls_mode: TLSMode = TLSMode.OPPORTUNISTIC,
        domain: str | None = None,
        tls: IOpenSSLClientConnectionCreator | None = None,
        trust_root: TrustRoot | None = None,
        authentication: Authentication | None = None,
        timeouts: Timeouts = DEFAULT_TIMEOUTS,
        endpoint: IStreamClientEndpoint | None = None,
        trace: bool = True,
        reactor: Any = None,
        options: ConnectOptions | None = None,
        message: MessageOptions | None = None,
        dkim: DKIM = None,
    ) -> Deferred[Receipt]:
        """Send one message through a pooled session to ``destination``.

        The connection keywords are those of :func:`txcolombe.client.session.connect`
        (or ``options``, one :class:`~txcolombe.client.options.ConnectOptions`),
        the message's those of :meth:`~txcolombe.client.session.Session.send`
        (or ``message``); ``reactor`` connects (default: the pool's). A body
        sent twice (after a dropped idle connection) must be replayable:
        bytes, a seekable file or an ``EmailMessage``. ``dkim`` (one
        :class:`~txcolombe.codec.dkim.DKIMSigner` or several) signs the body
        first, which makes any body replayable.
        """
        try:
            found = signers(dkim)
            wishes = either(
                MessageOptions(all_or_nothing, dsn, requiretls, chunking, binary), message
            )
            recipients = list(check_message(sender, recipients, body, dsn=wishes.dsn))
            connect = either(
                ConnectOptions(
                    port, tls_mode, domain, tls, trust_root, authentication, timeouts, endpoint,
                    trace,
                ),
                options,
            )  # fmt: skip
            connect.check()
        except SMTPError as error:
            return fail(error)
        key = _Key(str(destination), connect, reactor or self._reactor)
        if found:
            return Deferred.fromCoroutine(
                self._signed_send(key, sender, recipients, body, wishes, found)
            )
        return Deferred.fromCoroutine(self._send(key, sender, recipients, body, wishes))

    async def _signed_send(
        self,
        key: _Key,
        sender: str | Mailbox | None,
        recipients: list[str | Mailbox | Recipient],
        body: Body,
        message: MessageOptions,
        dkim: DKIM,
    ) -> Receipt:
        async with signed_body(body, dkim) as signed:
            return await self._send(key, sender, recipients, signed, message)

    async def _send(
        self,
        key: _Key,
        sender: str | Mailbox | None,
        recipients: list[str | Mailbox | Recipient],
        body: Body,
        message: MessageOptions,
    ) -> Receipt:
        retried = False
        while True:
            conn = self._take_now(key) or await self._take(key)
            reused = conn.given > 1 and conn.in_flight == 1
            try:
                session = conn.session or await conn.ready()
                return await session.send_message(
                    sender, recipients, body, message, reset_first=reused and self._reset_idle
                )
            except ConnectionFailed as error:
                if retried or not reused or error.maybe_delivered:
                    raise
                if error.step not in _RETRYABLE_STEPS:
                    raise
                # The idle connection was gone: try once more on another.
                self._drop(conn)
                retried = True
            except TransactionLimit:
                # The connection's LIMITS MAILMAX was reached before this message
                # began (with a pipeline, others took the last transactions):
                # nothing of it was sent, and the spent session takes no more.
                pass
            finally:
                self._release(conn)

    def _take_now(self, key: _Key) -> _Connection | None:
        """A session of ``key`` with room in its pipeline, opened if need be;
        None when the message must wait."""
        if self._closed:
            raise UsageError("the pool is closed")
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = _Slot()
        conn = self._pick(key, slot)
        if conn is not None:
            conn.stop_timer()
            conn.in_flight += 1
            conn.given += 1
            self._uses += 1
            conn.last_used = self._uses
        return conn

    async def _take(self, key: _Key) -> _Connection:
        """Wait for room in a session of ``key``."""
        slot = self._slots[key]
        while True:
            waiter: Deferred[None] = Deferred(lambda d: slot.waiters.remove(d))
            slot.waiters.append(waiter)
            await waiter
            conn = self._take_now(key)
            if conn is not None:
                return conn

    def _pick(self, key: _Key, slot: _Slot) -> _Connection | None:
        usable = [c for c in slot.connections if c.open]
        # The least loaded; among idle ones the most recently used, so that
        # the others stay idle and time out.
        best = min(usable, key=lambda c: (c.in_flight, -c.last_used), default=None)
        if best is not None and best.in_flight < self._pipeline:
            return best
        if len(slot.connections) < self._max:
            attempt = open_session(key.destination, key.options, key.reactor)
            conn = _Connection(self, slot, attempt)
            if not conn.gone:  # it may have failed at once
                slot.connections.append(conn)
            return conn
        return None

    def _release(self, conn: _Connection) -> None:
        conn.in_flight -= 1
        if conn.in_flight == 0:
            self._settled(conn)
        self._wake(conn.slot)

    def _settled(self, conn: _Connection) -> None:
        """Once a session is idle: keep it for the next message, or QUIT it."""
        session = conn.session
        if session is None or conn.in_flight:
            return
        if conn.gone or self._closed or not conn.open:
            self._drop(conn)
            if not session.closed.called:
                session.quit()
            return
        if conn.timer is None:
            conn.timer = self._reactor.callLater(self._idle_timeout, self._expire, conn)

    def _expire(self, conn: _Connection) -> None:
        conn.timer = None
        self._drop(conn)
        if conn.session is not None:
            conn.session.quit()

    def _drop(self, conn: _Connection) -> None:
        """Forget a connection that failed, closed or is closing."""
        conn.gone = True
        conn.stop_timer()
        if conn in conn.slot.connections:
            conn.slot.connections.remove(conn)
            self._wake(conn.slot)

    def _wake(self, slot: _Slot) -> None:
        if slot.waiters:
            slot.waiters.popleft().callback(None)

    async def close(self, *, abort: bool = False) -> None:
        """Refuse new messages and close every session; waits until they are closed.

        Idle sessions QUIT at once, sessions still connecting are abandoned,
        and busy ones QUIT after their messages, or with ``abort`` are
        dropped at once.
        """
        self._closed = True
        closing: list[Deferred[Any]] = []
        for slot in self._slots.values():
            for conn in list(slot.connections):
                self._drop(conn)
                closing.append(conn.close(abort=abort))
            while slot.waiters:
                slot.waiters.popleft().callback(None)  # to find the pool closed
        if closing:
            await DeferredList(closing, consumeErrors=True)
