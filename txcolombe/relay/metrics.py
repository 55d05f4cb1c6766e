"""Counters as Prometheus text (``GET /metrics``) over twisted.web."""

from __future__ import annotations

from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from txcolombe.relay.queue import QueueManager
from txcolombe.relay.shaped import shaping_snapshot

_HELP = {
    "received": ("counter", "Messages accepted into the spool."),
    "delivered": ("counter", "Recipients delivered."),
    "deferred": ("counter", "Recipient delivery attempts deferred."),
    "bounced": ("counter", "Recipients that failed permanently."),
    "rejected": ("counter", "Messages rejected at intake."),
    "deferred_local": ("counter", "Recipient attempts deferred for a failure of the relay's own."),
    "notices_held": ("counter", "Undeliverable bounces kept on hold at the end of their lifetime."),
    "spool_errors": ("counter", "Bounces, warnings or states the spool could not write."),
    "queue_size": ("gauge", "Messages in the queue."),
    "active": ("gauge", "Messages being delivered."),
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

#: Stats named ``deferred_local_<reason>`` become this counter, labelled by reason.
_BY_REASON = "deferred_local_"


def prometheus_text(queue: QueueManager) -> bytes:
    lines = []
    reasons = []
    for name, value in queue.stats().items():
        if name.startswith(_BY_REASON):
            reasons.append((name[len(_BY_REASON) :], value))
            continue
        kind, text = _HELP.get(name, ("gauge", name))
        metric = f"smtprelay_{name}" + ("_total" if kind == "counter" else "")
        lines += [f"# HELP {metric} {text}", f"# TYPE {metric} {kind}", f"{metric} {value}"]
    if reasons:
        metric = "smtprelay_deferred_local_by_reason_total"
        lines += [
            f"# HELP {metric} Recipient attempts deferred for a failure of the relay's own.",
            f"# TYPE {metric} counter",
        ]
        lines += [f'{metric}{{reason="{reason}"}} {value}' for reason, value in reasons]
    lines += _shaping_lines(shaping_snapshot(queue.transport))
    return ("\n".join(lines) + "\n").encode("utf-8")


def _shaping_lines(sites: dict[str, dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    if not sites:
        return lines
    for name, (kind, text) in _SHAPING.items():
        metric = f"smtprelay_shaping_{name.removesuffix('_total')}"
        metric += "_total" if kind == "counter" else ""
        lines += [f"# HELP {metric} {text}", f"# TYPE {metric} {kind}"]
        for site, info in sites.items():
            label = site.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
            lines.append(f'{metric}{{site="{label}"}} {float(info[name]):g}')
    return lines


class _Metrics(Resource):
    isLeaf = True

    def __init__(self, queue: QueueManager) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.queue = queue

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; version=0.0.4")  # type: ignore[no-untyped-call]
        return prometheus_text(self.queue)


def metrics_site(queue: QueueManager) -> Site:
    root = Resource()  # type: ignore[no-untyped-call]
    root.putChild(b"metrics", _Metrics(queue))
    return Site(root)  # type: ignore[no-untyped-call]
