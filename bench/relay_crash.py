"""Measure duplicates per SIGKILL of ``twistd smtprelay``: the scenario of
``tests/test_relay_crash.py`` (4 clients through the relay to an aiosmtpd
smarthost, the relay SIGKILLed and restarted every ``--per-round`` accepted
messages), repeated ``--runs`` times with ``--kills`` kills each.

    python bench/relay_crash.py [-k KILLS] [-r RUNS] [-n PER_ROUND]

Prints each run's duplicates and the total per kill. Loopback only.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import tree  # bench/, this script's directory

tree.use_this_tree()

from tests.test_relay_crash import Load, arrived, relay_args  # noqa: E402
from tools.peers.aiosmtpd_peer import AiosmtpdPeer, free_port  # noqa: E402
from tools.peers.relay_process import RelayProcess, wait_for  # noqa: E402


def one_run(kills: int, per_round: int) -> tuple[int, int, int]:
    """(accepted, deliveries, duplicates) of one run."""
    with tempfile.TemporaryDirectory() as tmp, AiosmtpdPeer(Path(tmp)) as peer:
        relay = RelayProcess(Path(tmp), free_port(), relay_args(peer))
        load = Load(relay.port)
        try:
            relay.start()
            load.start()
            for round_number in range(1, kills + 1):
                wait_for(
                    lambda n=round_number: len(load.accepted) >= n * per_round, 60, "accepted mail"
                )
                relay.kill()
                relay.start()
            wanted = load.finish()
            wait_for(lambda: wanted <= set(arrived(peer)), 60, "every accepted message")
            deliveries = arrived(peer)
            return len(wanted), len(deliveries), len(deliveries) - len(set(deliveries))
        finally:
            load.stop.set()
            relay.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", "--kills", type=int, default=3)
    parser.add_argument("-r", "--runs", type=int, default=5)
    parser.add_argument("-n", "--per-round", type=int, default=60)
    args = parser.parse_args()
    counts = []
    for run in range(1, args.runs + 1):
        accepted, deliveries, duplicates = one_run(args.kills, args.per_round)
        counts.append(duplicates)
        print(f"run {run}: accepted {accepted}, deliveries {deliveries}, duplicates {duplicates}")
    kills = args.kills * args.runs
    print(
        f"duplicates: {sum(counts)} in {kills} kills = {sum(counts) / kills:.2f} per kill"
        f" (per run: median {statistics.median(counts)}, max {max(counts)})"
    )


if __name__ == "__main__":
    main()
