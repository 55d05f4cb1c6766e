"""``bench/profiling.py relay`` profiles the relay process of bench/relay.py:
fed by Postfix's smtp-source, forwarding to smtp-sink, under twistd's cProfile."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.network
def test_the_relay_profile_shows_the_relays_own_functions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import relay  # bench/relay.py: the tools it runs

    missing = [tool for tool in (relay.SMTP_SOURCE, relay.SMTP_SINK) if not Path(tool).exists()]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the relay's profile, but {missing} are missing")
        pytest.skip(f"Postfix's {missing} are not installed")
    stats = tmp_path / "relay.pstats"
    profiling = ROOT / "bench" / "profiling.py"
    done = subprocess.run(
        [sys.executable, str(profiling), "relay", "--count", "40", "--top", "40"],
        capture_output=True, text=True, timeout=180, check=False,
        env={**os.environ, "PROFILE_OUT": str(stats)},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "relay (40 msg, 4 sessions) under cProfile" in done.stdout
    # Every message was delivered (bench_relay waits for the relay's count),
    # and the profile is the relay process's: its intake and its delivery.
    assert stats.stat().st_size > 0
    assert "machine.py" in done.stdout
    assert "epoll" in done.stdout
