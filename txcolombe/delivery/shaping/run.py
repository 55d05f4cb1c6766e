"""One delivery to a domain under its site's limits: the flow the Deliverer and
the relay share.

Find the domain's site, wait for a connection slot and a message token, run
the delivery, give the slot back, and report every reply that was not a
success — of each attempt, not only the last (a 421 from the first exchanger
slows the site down even when the second one took the message).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence

from twisted.internet.defer import CancelledError
from twisted.logger import Logger

from txcolombe.codec.errors import RoutingError, SMTPError
from txcolombe.delivery.outcome import DeliveryStatus, Outcome, failed
from txcolombe.delivery.shaping.shaper import Lease, Shaper
from txcolombe.delivery.shaping.sites import SiteResolver

log = Logger(namespace="txcolombe.shaping")


async def shaped(
    shaper: Shaper,
    sites: SiteResolver,
    domain: str,
    names: Sequence[str],
    send: Callable[[], Awaitable[Mapping[str, Outcome]]],
) -> dict[str, Outcome]:
    """``send()`` for ``names`` at ``domain``, within its site's limits.

    A failure of the shaping itself (a Redis that is down) defers every
    recipient as the sender's own failure (``local="software"``): it must never
    bounce a message.
    """
    try:
        site = await sites.site(domain)
    except RoutingError:
        # No site without MX records: the delivery meets the same answer and
        # classifies it (no such domain, DNS failure...).
        return dict(await send())
    lease: Lease | None = None
    try:
        lease = await shaper.acquire(site, domain)
        await lease.message()
    except CancelledError as error:
        if lease is not None:
            lease.release()
        return {name: failed(name, error, domain=domain) for name in names}
    except Exception as error:
        if lease is not None:
            lease.release()
        log.error("traffic shaping failed for {site}: {error}", site=site, error=error)
        text = f"traffic shaping unavailable: {type(error).__name__}: {error}"
        unavailable = SMTPError(text, temporary=True)
        status = DeliveryStatus.TEMPORARY
        return {
            name: Outcome(name, domain, status, error=unavailable, local="software")
            for name in names
        }
    try:
        outcomes = dict(await send())
    finally:
        lease.release()
    for text in sorted(_replies(outcomes.values())):
        shaper.report(site, text).addErrback(
            lambda f: log.failure("cannot report a reply of {site}", f, site=site)
        )
    return outcomes


def _replies(outcomes: Iterable[Outcome]) -> set[str]:
    """The text of every reply that was not a success: each failed attempt's,
    and each undelivered outcome's."""
    texts: set[str] = set()
    for outcome in outcomes:
        if outcome.status is not DeliveryStatus.DELIVERED:
            texts.add(outcome.text)
        for attempt in outcome.attempts:
            error = attempt.error
            if error is not None and error.reply is not None:
                texts.add(str(error.reply))
    return texts
