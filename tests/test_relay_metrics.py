"""The relay's ``/metrics``: the queue's stats as Prometheus metrics, same names and values."""

from __future__ import annotations

from typing import cast

import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq

from txcolombe.relay.metrics import metrics_site, prometheus_text
from txcolombe.relay.queue import QueueManager

STATS = {
    "received": 5,
    "delivered": 3,
    "deferred": 2,
    "bounced": 1,
    "rejected": 0,
    "deferred_local": 2,
    "notices_held": 0,
    "spool_errors": 0,
    "deferred_local_auth": 2,
    "deferred_local_tls": 0,
    "queue_size": 4,
    "active": 1,
}


class StatsOnly:
    """What the metrics read of a queue: its stats, which a test may change."""

    transport = None  # not shaped: no per-site metrics

    def __init__(self) -> None:
        self.values = dict(STATS)

    def stats(self) -> dict[str, int]:
        return dict(self.values)


def queue() -> tuple[StatsOnly, QueueManager]:
    stats = StatsOnly()
    return stats, cast(QueueManager, stats)


def parsed(text: str) -> dict[str, tuple[str, dict[tuple[tuple[str, str], ...], float]]]:
    """Family name → (type, {labels: value}) of a Prometheus text page."""
    return {
        family.name: (
            family.type,
            {tuple(sorted(s.labels.items())): s.value for s in family.samples},
        )
        for family in text_string_to_metric_families(text)
    }


def test_every_stat_is_a_metric_with_its_value() -> None:
    _, q = queue()
    text = prometheus_text(q).decode()
    families = parsed(text)
    for name in ("received", "delivered", "deferred", "bounced", "rejected", "deferred_local"):
        assert families[f"smtprelay_{name}"] == ("counter", {(): float(STATS[name])})
        assert f"\nsmtprelay_{name}_total {STATS[name]}.0\n" in text
    assert families["smtprelay_queue_size"] == ("gauge", {(): 4.0})
    assert families["smtprelay_active"] == ("gauge", {(): 1.0})
    assert families["smtprelay_deferred_local_by_reason"] == (
        "counter",
        {(("reason", "auth"),): 2.0, (("reason", "tls"),): 0.0},
    )
    assert "# HELP smtprelay_received_total Messages accepted into the spool.\n" in text
    assert "# TYPE smtprelay_received_total counter\n" in text
    assert "smtprelay_deferred_local_auth" not in text  # only as a label


def test_a_stat_without_help_is_a_gauge_named_after_it() -> None:
    stats, q = queue()
    stats.values = {"new_thing": 7}
    assert parsed(prometheus_text(q).decode()) == {"smtprelay_new_thing": ("gauge", {(): 7.0})}


@pytest_twisted.ensureDeferred
async def test_the_site_serves_the_current_values() -> None:
    stats, q = queue()
    client = StubTreq(metrics_site(q).resource)
    response = await client.get("http://relay.test/metrics")
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type")[0].startswith("text/plain; version=")
    assert parsed(await response.text())["smtprelay_received"] == ("counter", {(): 5.0})
    stats.values["received"] = 6  # read at each scrape, not at start-up
    response = await client.get("http://relay.test/metrics")
    assert parsed(await response.text())["smtprelay_received"] == ("counter", {(): 6.0})


@pytest_twisted.ensureDeferred
async def test_the_site_speaks_openmetrics_when_asked() -> None:
    _, q = queue()
    client = StubTreq(metrics_site(q).resource)
    response = await client.get(
        "http://relay.test/metrics", headers={"Accept": "application/openmetrics-text"}
    )
    assert response.headers.getRawHeaders("content-type")[0].startswith(
        "application/openmetrics-text"
    )
    body = await response.text()
    assert "smtprelay_received_total 5.0" in body
    assert body.endswith("# EOF\n")
