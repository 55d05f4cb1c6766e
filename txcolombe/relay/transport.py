"""How queued mail leaves the relay: to a smarthost, or to the recipients' MX.

A :class:`Transport` routes each recipient to a destination key and sends one
message to a group of recipients of one destination, answering with one
:class:`~txcolombe.delivery.outcome.Outcome` per recipient, the type
:func:`txcolombe.deliver` reports too. :class:`SmarthostTransport` is a
:class:`~txcolombe.client.pool.Pool` with a fixed route: a few sessions to
the smarthost, each reused for message after message with the messages
pipelined. :class:`MXTransport` is :func:`txcolombe.deliver`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IResolver
from twisted.python.failure import Failure

from txcolombe.client.machine import TLSMode
from txcolombe.client.options import ConnectOptions, MessageOptions, Timeouts
from txcolombe.client.pool import Pool
from txcolombe.client.receipt import Receipt
from txcolombe.codec.address import Mailbox
from txcolombe.codec.errors import RecipientsRefused, SMTPError
from txcolombe.codec.sasl import Authentication
from txcolombe.delivery.outcome import (
    DeliveryStatus,
    Outcome,
    failed,
    local_reason,
    recipient_verdict,
)

LOCAL = MessageOptions()
"""What a message made by the relay itself (a bounce) declares: nothing, so
BODY=8BITMIME is said whenever offered. A client's message is sent with what
its MAIL declared (``body_type``, ``smtputf8``, ``utf8_headers``), passed
through as it was."""


class Transport(Protocol):
    """Where the queue manager sends mail."""

    def route(self, recipient: Mailbox) -> str:
        """The destination key of ``recipient`` (recipients are grouped by it)."""

    def send(
        self,
        destination: str,
        sender: Mailbox | None,
        recipients: Sequence[Mailbox],
        data: bytes,
        declared: MessageOptions = LOCAL,
    ) -> Deferred[dict[str, Outcome]]:
        """Send one message to recipients of one destination; never fails.

        ``declared``: what the message's MAIL declared, to pass on.
        """

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

    @property
    def options(self) -> ConnectOptions:
        """How the relay's sessions to it are set up."""
        return ConnectOptions(
            port=self.port,
            tls_mode=self.tls,
            domain=self.domain,
            trust_root=self.trust_root,
            authentication=self.authentication,
            timeouts=self.timeouts,
            # The relay logs one line per delivery; the per-exchange debug
            # trace would cost more than the transactions at its volume.
            trace=False,
        )


#: Messages in flight on one session to the smarthost before another is opened.
PIPELINE_DEPTH = 16


class SmarthostTransport:
    """Every recipient goes to one smarthost, over a few pipelined sessions.

    A message is handed to the open session with the fewest messages in
    flight; the session pipelines its MAIL, RCPT and DATA with the previous
    final dot, so a stream of messages costs about one round trip each.
    Another session is opened (at most ``concurrency``) only when every open
    one has :data:`PIPELINE_DEPTH` messages in flight. Sessions idle for
    ``idle_timeout`` seconds QUIT.
    """

    def __init__(
        self,
        smarthost: Smarthost,
        *,
        reactor: Any,
        concurrency: int = 10,
        idle_timeout: float = 30.0,
    ) -> None:
        self.smarthost = smarthost
        self.relay = f"{smarthost.host}[{smarthost.port}]"
        self._options = smarthost.options
        self.pool = Pool(
            max_per_destination=max(1, concurrency),
            idle_timeout=idle_timeout,
            max_messages=None,
            pipeline=PIPELINE_DEPTH,
            # Sessions in use are checked by the messages themselves; the
            # relay retries a message that met a dead one at its next attempt.
            reset_idle=False,
            reactor=reactor,
        )

    def route(self, recipient: Mailbox) -> str:
        return self.relay

    def send(
        self,
        destination: str,
        sender: Mailbox | None,
        recipients: Sequence[Mailbox],
        data: bytes,
        declared: MessageOptions = LOCAL,
    ) -> Deferred[dict[str, Outcome]]:
        # Small bodies are written at once by txcolombe.client.body (no reactor turn).
        sent = self.pool.send(
            self.smarthost.host, sender, list(recipients), data,
            options=self._options, message=declared,
        )  # fmt: skip
        return sent.addBoth(self._outcomes, recipients)

    def _outcomes(
        self, result: Receipt | Failure, recipients: Sequence[Mailbox]
    ) -> dict[str, Outcome]:
        host, port = self.smarthost.host, self.smarthost.port
        if isinstance(result, Failure):
            error: BaseException = result.value or RuntimeError(str(result))
        out: dict[str, Outcome] = {}
        for mailbox in recipients:
            name = str(mailbox)
            domain = mailbox.domain or ""
            if isinstance(result, Receipt):
                verdict = recipient_verdict(result, name)
            elif isinstance(error, RecipientsRefused):
                verdict = recipient_verdict(error, name)
            else:
                verdict = None
            if verdict is None and isinstance(result, Receipt):
                unanswered = SMTPError("no reply for recipient", temporary=True)
                out[name] = Outcome(
                    name, domain, DeliveryStatus.TEMPORARY, host, error=unanswered, port=port
                )
            elif verdict is None:
                out[name] = failed(name, error, smarthost=True, mx=host, port=port, domain=domain)
            else:
                delivered = verdict.status is DeliveryStatus.DELIVERED
                receipt = result if delivered and isinstance(result, Receipt) else None
                out[name] = Outcome(
                    name, domain, verdict.status, host, reply=verdict.reply,
                    error=verdict.error, receipt=receipt, port=port,
                )  # fmt: skip
        return out

    def close(self) -> Deferred[None]:
        """QUIT the idle sessions, drop the busy ones."""
        return Deferred.fromCoroutine(self.pool.close(abort=True))


REUSE_TIME = 2.0
"""Seconds the MX mode keeps an idle session for the next message (Postfix's
``smtp_connection_cache_time_limit``)."""


class MXTransport:
    """Each recipient domain to its own exchangers, through ``txcolombe.delivery.deliver``,
    with one :class:`~txcolombe.delivery.deliverer.Deliverer` for the relay's
    lifetime (its DNS cache, limits, memory of dead hosts, kept sessions and,
    with ``shaping``, the traffic shaping of each destination site)."""

    def __init__(
        self,
        *,
        reactor: Any,
        domain: str | None = None,
        port: int = 25,
        resolver: IResolver | None = None,
        shaping: Any = None,
    ) -> None:
        from txcolombe.delivery.deliverer import Deliverer

        self.reactor = reactor
        self.domain = domain
        self.port = port
        self.deliverer = Deliverer(
            resolver=resolver, reactor=reactor, reuse_time=REUSE_TIME, shaping=shaping
        )

    def route(self, recipient: Mailbox) -> str:
        return (recipient.domain or "").lower()

    def send(
        self,
        destination: str,
        sender: Mailbox | None,
        recipients: Sequence[Mailbox],
        data: bytes,
        declared: MessageOptions = LOCAL,
    ) -> Deferred[dict[str, Outcome]]:
        return Deferred.fromCoroutine(self._send(destination, sender, recipients, data, declared))

    async def _send(
        self,
        destination: str,
        sender: Mailbox | None,
        recipients: Sequence[Mailbox],
        data: bytes,
        declared: MessageOptions,
    ) -> dict[str, Outcome]:
        names = [str(r) for r in recipients]
        from txcolombe.delivery.deliver import deliver

        try:
            result = await deliver(
                # The mailboxes themselves: a domain given in U-labels stays so.
                sender, list(recipients), data, domain=self.domain, reactor=self.reactor,
                port=self.port, deliverer=self.deliverer,
                body_type=declared.body_type, smtputf8=declared.smtputf8,
                utf8_headers=declared.utf8_headers,
            )  # fmt: skip
        except Exception as error:
            return {name: failed(name, error, domain=destination) for name in names}
        return {name: _ours(name, result.get(name), destination) for name in names}

    def close(self) -> Deferred[None]:
        return self.deliverer.close()


def _ours(name: str, outcome: Outcome | None, destination: str) -> Outcome:
    """``deliver()``'s outcome, with a temporary failure of the relay's own named as such."""
    if outcome is None:
        missing = SMTPError("no outcome for recipient", temporary=True)
        return Outcome(name, destination, DeliveryStatus.TEMPORARY, error=missing)
    if outcome.temporary and outcome.error is not None:
        return dataclasses.replace(outcome, local=local_reason(outcome.error))
    return outcome


def shaping_snapshot(transport: object) -> dict[str, dict[str, Any]]:
    """The shaper's :meth:`~txcolombe.delivery.shaping.Shaper.snapshot` of a relay's
    transport; empty when it is not shaped (smarthost mode, no ``[shaping]``, or
    nothing delivered yet)."""
    shaper = getattr(getattr(transport, "deliverer", None), "shaper", None)
    return shaper.snapshot() if shaper is not None else {}
