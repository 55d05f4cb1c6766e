"""The message benchmarks' Twisted floor (bench/messages.py ``twisted-floor``)
sends what txcolombe sends, checked by the benchmark sink, so that its rate is
a fair floor: a bare protocol on the same reactor doing the same SMTP."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import run

    return run


@pytest.mark.network
@pytest.mark.parametrize("scenario", ["reuse", "new"])
def test_the_floor_sends_txcolombes_messages(bench: Any, scenario: str) -> None:
    workload = next(w for w in bench.WORKLOADS if w.name == scenario)
    assert "twisted-floor" in workload.clients
    with bench.sink() as sink:
        for client in ("twisted-floor", "txcolombe"):
            run = bench.run_message_client(workload, client, sink, 5, 60.0)
            # The sink counted 5 messages, each with the digest of the bytes
            # a correct client sends (bench/run.py's check): else an error.
            assert run.error is None, f"{client}: {run.error}"
            assert run.units == 5


def test_the_floor_runs_only_the_scenarios_it_has(bench: Any) -> None:
    messages = bench.messages
    assert set(messages.SCENARIOS_OF["twisted-floor"]) == {"reuse", "new"}
    with pytest.raises(NotImplementedError):
        messages.run_twisted_floor("concurrent", 1, 1, 1.0)


@pytest.mark.network
@pytest.mark.parametrize("scenario", ["body", "body-tls"])
def test_the_body_floor_sends_the_body_txcolombe_sends(
    bench: Any, scenario: str, tmp_path: Path
) -> None:
    """The bare transport's pre-stuffed bytes, written in txcolombe's chunk
    size, are the DATA txcolombe sends for the same body: the sink's digest."""
    workload = next(w for w in bench.WORKLOADS if w.name == scenario)
    ca, cert, key = bench.large_body.make_cert(tmp_path)
    body = tmp_path / "body.eml"
    with body.open("wb") as out:
        for chunk in bench.large_body.body_chunks(3):
            out.write(chunk)
    with bench.sink((cert, key) if workload.tls else None) as sink:
        for client in ("twisted-floor", "txcolombe"):
            run = bench.run_body_client(workload, client, sink, 3, ca, body, 60.0)
            assert run.error is None, f"{client}: {run.error}"
            assert run.units == 3
