"""The queue's counters for Prometheus (``GET /metrics``), written by ``prometheus-client``.

A collector reads :meth:`QueueManager.stats` at each scrape, so the numbers are
never copied into a second set of counters. The page is rendered on the
reactor's thread by a small :class:`~twisted.web.resource.Resource`:
prometheus-client's own ``MetricsResource`` serves through a WSGI thread pool
and the global reactor, and the queue's state must be read on the reactor's
thread only.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from txcolombe.relay.queue import QueueManager
from txcolombe.relay.transport import shaping_snapshot

_COUNTERS = {
    "received": "Messages accepted into the spool.",
    "delivered": "Recipients delivered.",
    "deferred": "Recipient delivery attempts deferred.",
    "bounced": "Recipients that failed permanently.",
    "rejected": "Messages rejected at intake.",
    "deferred_local": "Recipient attempts deferred for a failure of the relay's own.",
    "notices_held": "Undeliverable bounces kept on hold at the end of their lifetime.",
    "spool_errors": "Bounces, warnings or states the spool could not write.",
}
_GAUGES = {
    "queue_size": "Messages in the queue.",
    "active": "Messages being delivered.",
}

#: Per-site traffic-shaping values (docs/shaping.md), labelled by site.
_SHAPING = {
    "connections_open": ("gauge", "Connections open to the site."),
    "waiting": ("gauge", "Deliveries waiting for the site's limits."),
    "connections_total": ("counter", "Connections granted to the site."),
    "messages_total": ("counter", "Messages granted to the site."),
    "slow_downs": ("counter", "Slow-down replies from the site."),
    "suspended": ("gauge", "1 while the site is suspended after a slow-down reply."),
    "rate_factor": ("gauge", "The factor the site's rates are lowered by (1: not lowered)."),
}

#: Stats named ``deferred_local_<reason>`` become one counter, labelled by reason.
_BY_REASON = "deferred_local_"


class QueueCollector(Collector):
    """``smtprelay_*`` metrics from a queue's stats: counters get ``_total``."""

    def __init__(self, queue: QueueManager) -> None:
        self.queue = queue

    def collect(self) -> Iterator[Metric]:
        reasons = CounterMetricFamily(
            "smtprelay_deferred_local_by_reason",
            "Recipient attempts deferred for a failure of the relay's own.",
            labels=["reason"],
        )
        for name, value in self.queue.stats().items():
            if name.startswith(_BY_REASON):
                reasons.add_metric([name[len(_BY_REASON) :]], value)
            elif name in _COUNTERS:
                yield CounterMetricFamily(f"smtprelay_{name}", _COUNTERS[name], value=value)
            else:
                yield GaugeMetricFamily(f"smtprelay_{name}", _GAUGES.get(name, name), value=value)
        if reasons.samples:
            yield reasons
        yield from _shaping_metrics(shaping_snapshot(self.queue.transport))


def _shaping_metrics(sites: dict[str, dict[str, Any]]) -> Iterator[Metric]:
    """One family per traffic-shaping value, a sample per site."""
    if not sites:
        return
    for name, (kind, text) in _SHAPING.items():
        metric = f"smtprelay_shaping_{name.removesuffix('_total')}"
        family: CounterMetricFamily | GaugeMetricFamily
        if kind == "counter":
            family = CounterMetricFamily(metric, text, labels=["site"])
        else:
            family = GaugeMetricFamily(metric, text, labels=["site"])
        for site, info in sites.items():
            family.add_metric([site], float(info[name]))
        yield family


def registry_for(queue: QueueManager) -> CollectorRegistry:
    """A registry of the queue's metrics alone (no process or platform collectors)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(QueueCollector(queue))
    return registry


def prometheus_text(queue: QueueManager) -> bytes:
    """The queue's metrics in the Prometheus text format."""
    encoder, _ = choose_encoder("")
    return encoder(registry_for(queue))


class _Metrics(Resource):
    isLeaf = True

    def __init__(self, queue: QueueManager) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # twisted.web is untyped here
        self.registry = registry_for(queue)

    def render_GET(self, request: Request) -> bytes:
        # The text format, or OpenMetrics when the scraper's Accept asks for it.
        accept = request.getHeader(b"accept")
        encoder, content_type = choose_encoder(accept.decode("latin-1") if accept else "")
        request.setHeader(b"content-type", content_type.encode("ascii"))  # type: ignore[no-untyped-call]  # twisted.web is untyped here
        return encoder(self.registry)


def metrics_site(queue: QueueManager) -> Site:
    """A site with the queue's metrics at ``/metrics``."""
    root = Resource()  # type: ignore[no-untyped-call]  # twisted.web is untyped here
    root.putChild(b"metrics", _Metrics(queue))
    return Site(root)  # type: ignore[no-untyped-call]  # twisted.web is untyped here
