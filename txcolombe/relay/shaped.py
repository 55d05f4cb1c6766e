"""MX delivery through a :class:`~txcolombe.delivery.shaping.Shaper`.

:class:`ShapedTransport` wraps the relay's MX transport in the shaping flow
that the :class:`~txcolombe.delivery.deliverer.Deliverer` uses too
(:func:`~txcolombe.delivery.shaping.run.shaped`): the recipient domain's site
(from its MX records), a lease of that site (a connection slot, a
connection-rate token, no suspension) and a message-rate token, the delivery,
the lease given back, and every reply that was not a success reported, of
each attempt, so that a "slow down" reply suspends the site.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred

from txcolombe.codec.address import Mailbox
from txcolombe.delivery.outcome import Outcome
from txcolombe.delivery.shaping import Shaper, SiteResolver
from txcolombe.delivery.shaping.run import shaped
from txcolombe.relay.transport import Transport


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

        def send() -> Deferred[dict[str, Outcome]]:
            return self.inner.send(destination, sender, recipients, data, *args, **kwargs)

        return await shaped(self.shaper, self.sites, destination, names, send)

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
