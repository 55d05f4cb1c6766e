"""MX delivery through a :class:`~txcolombe.delivery.shaping.Shaper`.

:class:`ShapedTransport` wraps the relay's MX transport: before each
delivery it finds the recipient domain's site (from its MX records), waits
for a lease of that site (a connection slot, a connection-rate token, no
suspension) and a message-rate token, delivers, gives the lease back, and
reports every deferral or refusal to the shaper, so that a "slow down"
reply suspends the site. ``deliver()`` opens one connection per call, so a
delivery is one lease and one message (``messages_per_connection`` does
not bind here; it is for a delivery engine that keeps connections).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger

from txcolombe.codec.address import Mailbox
from txcolombe.codec.errors import RoutingError, SMTPError
from txcolombe.delivery.outcome import DeliveryStatus, Outcome, failed
from txcolombe.delivery.shaping import Lease, Shaper, SiteResolver
from txcolombe.relay.transport import Transport

log = Logger(namespace="txcolombe.relay")


class ShapedTransport:
    """``inner`` (an MX transport), with each delivery shaped by ``shaper``."""

    def __init__(self, inner: Transport, shaper: Shaper, sites: SiteResolver) -> None:
        self.inner = inner
        self.shaper = shaper
        self.sites = sites

    def route(self, recipient: Mailbox) -> str:
        return self.inner.route(recipient)

    def send(
        self,
        destination: str,
        sender: Mailbox | None,
        recipients: Sequence[Mailbox],
        data: bytes,
        *args: Any,
        **kwargs: Any,
    ) -> Deferred[dict[str, Outcome]]:
        return Deferred.fromCoroutine(
            self._send(destination, sender, recipients, data, *args, **kwargs)
        )

    async def _send(
        self,
        destination: str,
        sender: Mailbox | None,
        recipients: Sequence[Mailbox],
        data: bytes,
        *args: Any,
        **kwargs: Any,
    ) -> dict[str, Outcome]:
        names = [str(r) for r in recipients]
        try:
            site = await self.sites.site(destination)
        except RoutingError:
            # No site without MX records: deliver() meets the same answer
            # and classifies it (no such domain, DNS failure...).
            return await self.inner.send(destination, sender, recipients, data, *args, **kwargs)
        lease: Lease | None = None
        try:
            lease = await self.shaper.acquire(site, destination)
            await lease.message()
        except CancelledError as error:
            if lease is not None:
                lease.release()
            return {name: failed(name, error, domain=destination) for name in names}
        except Exception as error:
            if lease is not None:
                lease.release()
            log.error("traffic shaping failed for {site}: {error}", site=site, error=error)
            text = f"traffic shaping unavailable: {type(error).__name__}: {error}"
            unavailable = SMTPError(text, temporary=True)
            return {
                name: Outcome(
                    name, destination, DeliveryStatus.TEMPORARY, error=unavailable, local="software"
                )
                for name in names
            }
        try:
            outcomes = await self.inner.send(destination, sender, recipients, data, *args, **kwargs)
        finally:
            lease.release()
        undelivered = {
            o.text for o in outcomes.values() if o.status is not DeliveryStatus.DELIVERED
        }
        for text in sorted(undelivered):
            self.shaper.report(site, text).addErrback(
                lambda f: log.failure("cannot report a reply of {site}", f, site=site)
            )
        return outcomes

    def close(self) -> Deferred[None]:
        async def close() -> None:
            await self.inner.close()
            await self.shaper.close()

        return Deferred.fromCoroutine(close())


def shaping_snapshot(transport: object) -> dict[str, dict[str, Any]]:
    """The shaper's :meth:`~txcolombe.delivery.shaping.Shaper.snapshot` of a relay's
    transport; empty when it is not shaped (smarthost mode, no ``[shaping]``)."""
    if isinstance(transport, ShapedTransport):
        return transport.shaper.snapshot()
    return {}
