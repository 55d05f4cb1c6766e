"""Profile txcolombe's client in one of bench/run.py's workloads, or the relay.

    python bench/profiling.py WORKLOAD [--count N] [--top 25] [--py-spy]

Runs the same client process as ``bench/run.py`` (pinned, against
``bench/sink.py``, the sink checking every message) under ``cProfile`` and
prints the functions with the most time of their own, then those with the
most cumulative time. With ``--py-spy`` (if ``py-spy`` is installed:
``pip install py-spy``) it also records a flame graph of a second run to
``bench/results/WORKLOAD.folded`` (collapsed stacks) and prints its summary.

``relay`` profiles the relay process of ``bench/relay.py`` instead (its
unsigned run: ``smtp-source`` feeding ``twistd smtprelay``, which forwards to
``smtp-sink``): under twistd's own ``--profiler=cprofile``, then, with
``--py-spy``, sampled by a py-spy attached to it (root, or ptrace allowed).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import os
import pstats
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import relay as relay_bench  # bench/relay.py, beside this script
import run as bench  # bench/run.py, on sys.path as this script's directory


def command(
    workload: bench.Workload, sink: bench.Sink, count: int, tmp: Path, ca: str
) -> list[str]:
    if workload.unit == "msg":
        return bench.message_command(workload, "txcolombe", sink.port, count, 120.0)
    body = tmp / "body.eml"
    with body.open("wb") as out:
        for chunk in bench.large_body.body_chunks(count):
            out.write(chunk)
    return bench.body_command(workload, "txcolombe", sink.port, count, ca, body)


def summary(stats_file: Path, top: int) -> str:
    out = io.StringIO()
    stats = pstats.Stats(str(stats_file), stream=out)
    stats.strip_dirs()
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return out.getvalue()


def py_spy_binary() -> str | None:
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        print("no py-spy: pip install py-spy")
        return None
    return spy


def py_spy(name: str, args: list[str], top: int) -> None:
    """Sample the client (pinned; py-spy itself is not) into collapsed stacks,
    ``bench/results/NAME.folded`` (``flamegraph.pl`` or speedscope draw them),
    and print their summary."""
    spy = py_spy_binary()
    if spy is None:
        return
    folded = bench.RESULTS.parent / f"{name}.folded"
    folded.parent.mkdir(parents=True, exist_ok=True)
    record = [spy, "record", "--format", "raw", "--rate", "500", "--output", str(folded)]
    done = subprocess.run([*record, "--", *bench.pinned(bench.CLIENT_CPU, args)], check=False)
    if done.returncode != 0 or not folded.exists():
        print("py-spy failed")
        return
    print_folded(folded, top)


def print_folded(folded: Path, top: int) -> None:
    """The functions seen most on top of the stack and anywhere in it (in the
    reactor's loop: imports and set-up left out)."""
    own: dict[str, int] = {}
    anywhere: dict[str, int] = {}
    total = 0
    for line in folded.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        count = int(count_text)
        frames = [frame.split(" (")[0] for frame in stack.split(";")]
        if "ReactorBase.mainLoop" not in frames:
            continue  # imports and set-up: not the workload
        total += count
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            anywhere[frame] = anywhere.get(frame, 0) + count
    print(f"py-spy: {total} samples in the reactor's loop, in {folded}")
    for title, table in (("on top of the stack", own), ("anywhere in the stack", anywhere)):
        print(f"  {title}:")
        for frame, count in sorted(table.items(), key=lambda kv: -kv[1])[:top]:
            print(f"    {100 * count / max(total, 1):5.1f}%  {frame}")


@contextlib.contextmanager
def attached(spy: str, folded: Path, pid: int) -> Iterator[None]:
    """py-spy sampling process ``pid`` while the block runs."""
    record = [spy, "record", "--format", "raw", "--rate", "250", "--output", str(folded)]
    sampler = subprocess.Popen([*record, "--pid", str(pid)])
    time.sleep(1.0)  # attached before the first message
    try:
        yield
    finally:
        sampler.send_signal(signal.SIGINT)  # py-spy writes its file and exits
        sampler.wait(60)


def profile_relay(count: int, top: int, spy: bool) -> int:
    """The relay process of bench/relay.py's unsigned run, under cProfile,
    then (``spy``) sampled by py-spy."""
    missing = [tool for tool in (relay_bench.SMTP_SOURCE, relay_bench.SMTP_SINK)
               if not Path(tool).exists()]  # fmt: skip
    if missing:
        print(f"the relay's profile needs {' and '.join(missing)} (Postfix's tools)")
        return 1
    sessions, size = 4, 1024
    with tempfile.TemporaryDirectory(prefix="txc-profile-") as tmp_name:
        stats_file = Path(os.environ.get("PROFILE_OUT", Path(tmp_name) / "relay.out"))
        profiler = [f"--profile={stats_file}", "--profiler=cprofile", "--savestats"]
        accept, total, cpu = relay_bench.bench_relay(count, sessions, size, twistd=profiler)
        print(
            f"relay ({count} msg, {sessions} sessions) under cProfile: "
            f"{count / accept:.0f} msg/s accepted, all delivered after {total:.2f} s, "
            f"{cpu * 1000:.2f} ms CPU/msg"
        )
        print(summary(stats_file, top))
    if spy:
        binary = py_spy_binary()
        if binary is None:
            return 0
        folded = bench.RESULTS.parent / "relay.folded"
        folded.parent.mkdir(parents=True, exist_ok=True)
        accept, total, cpu = relay_bench.bench_relay(
            count, sessions, size, watch=functools.partial(attached, binary, folded)
        )
        rate = count / accept
        print(f"relay under py-spy: {rate:.0f} msg/s accepted, {cpu * 1000:.2f} ms CPU/msg")
        if folded.exists():
            print_folded(folded, top)
        else:
            print("py-spy failed (attaching needs root or ptrace permission)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workload", choices=[*(w.name for w in bench.WORKLOADS), "relay"])
    parser.add_argument(
        "--count", type=int, help="messages, or MiB (default: run.py's; the relay: 2000)"
    )
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--py-spy", action="store_true", help="also record a flame graph")
    options = parser.parse_args()
    if options.workload == "relay":
        return profile_relay(options.count or 2000, options.top, options.py_spy)
    workload = next(w for w in bench.WORKLOADS if w.name == options.workload)
    count = options.count or workload.count
    with tempfile.TemporaryDirectory(prefix="txc-profile-") as tmp_name:
        tmp = Path(tmp_name)
        ca, cert, key = bench.large_body.make_cert(tmp)
        with bench.sink((cert, key) if workload.tls else None) as sink:
            args = command(workload, sink, count, tmp, ca)
            stats_file = Path(os.environ.get("PROFILE_OUT", tmp / "profile.out"))
            profiled = [sys.executable, "-m", "cProfile", "-o", str(stats_file), *args[1:]]
            report, error = bench.run_process(profiled, 600)
            sink.stats()
            if error is not None:
                print(f"the profiled run failed: {error}", file=sys.stderr)
                return 1
            print(f"{workload.name} ({count} {workload.unit}) under cProfile: {report}")
            print(summary(stats_file, options.top))
            if options.py_spy:
                py_spy(workload.name, args, options.top)
                sink.stats()
    return 0


if __name__ == "__main__":
    sys.exit(main())
