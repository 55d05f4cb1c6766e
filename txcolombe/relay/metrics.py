"""Counters as Prometheus text (``GET /metrics``) over twisted.web."""

from __future__ import annotations

from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from txcolombe.relay.queue import QueueManager

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
    return ("\n".join(lines) + "\n").encode("ascii")


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
