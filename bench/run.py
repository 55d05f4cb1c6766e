"""The performance table of issue 12: every workload, its peers and its targets, in one run.

    python bench/run.py [--quick] [--rounds N] [--only WORKLOADS] [--relay] [--json PATH]

Workloads (``--only`` takes a comma-separated list of their names):

* ``reuse``: 1 KiB messages over one connection, each send awaited
  (txcolombe, aiosmtplib, smtp-source, a plain Python pipelining socket, and a bare
  Twisted protocol writing txcolombe's bytes in txcolombe's writes: Twisted's floor);
* ``concurrent``: the same over 8 connections (txcolombe, aiosmtplib, smtp-source -s 8);
* ``new``: a new connection per message (txcolombe, aiosmtplib, smtplib, the bare
  Twisted protocol);
* ``body``: a 100 MiB body from a file, plain (txcolombe; floors: ``socket.sendall``
  and a bare Twisted TCP transport writing the same pre-stuffed bytes);
* ``body-tls``: the same over STARTTLS (floors: ``ssl`` sendall and a bare Twisted
  TLS transport).

Every client runs in a fresh process of its own pinned to CPU 1, against
``bench/sink.py`` pinned to CPU 0 (``taskset``), with the same message. The
sink hashes every message and the harness checks each run's count and
digests: a client that sends wrong bytes fails the run. Each workload runs
``--rounds`` rounds (5; ``--quick``: 1, with small counts), the clients
taking turns within a round, each round beginning with the next client; a
ratio is computed per round (txcolombe's rate over the peer's, in the same
round) and the table shows medians. The
results, every round included, go to ``bench/results/latest.json``.
``--relay`` also runs ``bench/relay.py`` (the relay against Postfix, root only).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import tree  # noqa: E402  (first: the txcolombe of this tree)

tree.use_this_tree()

import large_body  # noqa: E402
import messages  # noqa: E402

__all__ = ["large_body", "messages"]

SINK_CPU, CLIENT_CPU = 0, 1
RESULTS = HERE / "results" / "latest.json"
MIB = 1 << 20


@dataclass(frozen=True)
class Target:
    """txcolombe's rate must be at least ``ratio`` times ``peer``'s (same round)."""

    peer: str
    ratio: float


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    clients: tuple[str, ...]
    targets: tuple[Target, ...]
    unit: str  # "msg" or "MiB"
    count: int  # messages, or MiB
    quick_count: int
    cpu_target: float | None = None  # client CPU seconds per unit, at most
    tls: bool = False


WORKLOADS = (
    Workload(
        "reuse",
        "1 KiB, one connection, each send awaited",
        ("txcolombe", "aiosmtplib", "smtp-source", "socket", "twisted-floor"),
        (Target("aiosmtplib", 2.0), Target("smtp-source", 1.2)),
        "msg",
        2000,
        200,
        cpu_target=140e-6,
    ),
    Workload(
        "signed",
        "1 KiB DKIM-signed (RSA-2048, Ed25519), one connection, each send awaited",
        ("txcolombe", "txcolombe-dkim-rsa", "txcolombe-dkim-ed25519"),
        (),
        "msg",
        1000,
        100,
    ),
    Workload(
        "concurrent",
        f"1 KiB over {messages.CONNECTIONS} connections",
        ("txcolombe", "aiosmtplib", "smtp-source"),
        (Target("aiosmtplib", 2.0),),
        "msg",
        2000,
        400,
    ),
    Workload(
        "new",
        "1 KiB, a new connection per message",
        ("txcolombe", "aiosmtplib", "smtplib", "twisted-floor"),
        (Target("aiosmtplib", 1.5),),
        "msg",
        500,
        50,
    ),
    Workload(
        "body",
        "body from a file, plain",
        ("txcolombe", "socket", "twisted-floor"),
        (Target("socket", 0.8),),
        "MiB",
        100,
        10,
    ),
    Workload(
        "body-tls",
        "body from a file, STARTTLS",
        ("txcolombe", "socket", "twisted-floor"),
        (Target("twisted-floor", 0.9), Target("socket", 0.5)),
        "MiB",
        100,
        10,
        tls=True,
    ),
)
#: Peak RSS above idle allowed for a body, in MiB.
RSS_TARGET = 32.0
#: What each peer is called in the table.
PEER_NAMES = {
    "body": {"socket": "socket.sendall", "twisted-floor": "Twisted TCP transport"},
    "body-tls": {"socket": "ssl sendall", "twisted-floor": "Twisted TLS transport"},
    "concurrent": {"smtp-source": f"smtp-source -s {messages.CONNECTIONS}"},
    "reuse": {"socket": "plain Python socket", "twisted-floor": "bare Twisted protocol"},
    "new": {"twisted-floor": "bare Twisted protocol"},
    "signed": {
        "txcolombe": "unsigned",
        "txcolombe-dkim-rsa": "signed RSA-2048",
        "txcolombe-dkim-ed25519": "signed Ed25519",
    },
}


@dataclass
class Run:
    """One client's run in one round."""

    units: float = 0.0
    seconds: float = 0.0
    cpu: float | None = None
    rss: float | None = None  # peak above idle, MiB
    error: str | None = None

    @property
    def rate(self) -> float:
        return self.units / self.seconds if self.seconds > 0 and self.error is None else 0.0


@dataclass
class Outcome:
    workload: Workload
    count: int
    runs: dict[str, list[Run]] = field(default_factory=dict)

    def ratios(self, peer: str) -> list[float]:
        """txcolombe's rate over ``peer``'s, one per round where both ran."""
        pairs = zip(self.runs.get("txcolombe", []), self.runs.get(peer, []), strict=False)
        return [ours.rate / theirs.rate for ours, theirs in pairs if ours.rate and theirs.rate]

    def cpu_ratios(self, peer: str) -> list[float]:
        """The peer's client CPU per unit over txcolombe's, one per round: the
        same comparison as :meth:`ratios`, by CPU rather than by the clock
        (steadier on a shared machine, where another load stretches wall time)."""
        pairs = zip(self.runs.get("txcolombe", []), self.runs.get(peer, []), strict=False)
        return [
            (theirs.cpu / theirs.units) / (ours.cpu / ours.units)
            for ours, theirs in pairs
            if ours.rate and theirs.rate and ours.cpu and theirs.cpu
        ]

    def median_rate(self, client: str) -> float | None:
        rates = [run.rate for run in self.runs.get(client, []) if run.rate]
        return statistics.median(rates) if rates else None

    def median_of(self, client: str, attribute: str) -> float | None:
        values = [getattr(r, attribute) for r in self.runs.get(client, [])]
        present = [v for v in values if v is not None]
        return statistics.median(present) if present else None

    def errors(self) -> list[str]:
        return [f"{c}: {r.error}" for c, runs in self.runs.items() for r in runs if r.error]


# -- processes -----------------------------------------------------------------------


def pinned(cpu: int, args: list[str]) -> list[str]:
    """``args`` run on CPU ``cpu`` only (when the machine has it)."""
    if len(os.sched_getaffinity(0)) <= cpu or shutil.which("taskset") is None:
        return args
    return ["taskset", "-c", str(cpu), *args]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Sink:
    """``bench/sink.py`` on a free port, pinned to SINK_CPU, stopped on exit."""

    def __init__(self, cert: tuple[str, str] | None = None) -> None:
        self.port = free_port()
        args = [sys.executable, str(HERE / "sink.py"), str(self.port), *(cert or ())]
        self.process = subprocess.Popen(pinned(SINK_CPU, args), stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        if self.process.stdout.readline().strip() != "ready":
            self.process.kill()
            raise RuntimeError("bench/sink.py did not start")

    def stats(self) -> dict[str, Any]:
        """The messages received since the last call: count and digests."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as sock:
            stream = sock.makefile("rb")
            stream.readline()
            sock.sendall(b"XSTATS\r\nQUIT\r\n")
            line = stream.readline()
        result: dict[str, Any] = json.loads(line[4:])
        return result

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@contextmanager
def sink(cert: tuple[str, str] | None = None) -> Iterator[Sink]:
    running = Sink(cert)
    try:
        yield running
    finally:
        running.stop()


def digest(data_chunks: Iterator[bytes]) -> str:
    """The sink's name for a message: its DATA size and CRC-32."""
    size, crc = 0, 0
    for chunk in data_chunks:
        size += len(chunk)
        crc = zlib.crc32(chunk, crc)
    return f"{size}:{crc:08x}"


def check(sink: Sink, expected: str, count: int) -> str | None:
    """Why the sink's messages are not ``count`` copies of ``expected``, or None."""
    stats = sink.stats()
    digests: dict[str, int] = stats["digests"]
    if stats["messages"] != count or set(digests) - {expected}:
        return f"sink check failed: expected {count} x {expected}, got {digests}"
    return None


def last_json(text: str) -> dict[str, Any]:
    lines = [line for line in text.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def run_process(args: list[str], timeout: float) -> tuple[dict[str, Any], str | None]:
    """A client's JSON report, or the reason it has none."""
    try:
        out = subprocess.run(
            pinned(CLIENT_CPU, args), capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return {}, f"killed after {timeout:.0f} s"
    report = last_json(out.stdout)
    if out.returncode != 0 or not report or "error" in report:
        last = (out.stderr.strip().splitlines() or [f"exit status {out.returncode}"])[-1]
        return report, f"failed: {str(report.get('error', last))[:300]}"
    return report, None


# -- the workloads -------------------------------------------------------------------


def message_command(
    workload: Workload, client: str, port: int, count: int, budget: float
) -> list[str]:
    """The command line of one message-workload client (bench/messages.py)."""
    script = str(HERE / "messages.py")
    args = ["client", client, workload.name, str(port), str(count), str(budget)]
    return [sys.executable, script, *args]


def body_command(
    workload: Workload, client: str, port: int, mib: int, ca: str, path: Path
) -> list[str]:
    """The command line of one body-workload client (bench/large_body.py)."""
    mode = "txclient" if client == "txcolombe" else "client"
    ca_arg = ca if workload.tls else ""
    args = [mode, client, str(port), str(mib), ca_arg, str(path)]
    return [sys.executable, str(HERE / "large_body.py"), *args]


def run_message_client(
    workload: Workload, client: str, sink_: Sink, count: int, timeout: float
) -> Run:
    if client == "smtp-source":
        return run_smtp_source(workload, sink_, count, timeout)
    budget = timeout / 2
    report, error = run_process(
        message_command(workload, client, sink_.port, count, budget), timeout
    )
    run = Run(error=error)
    if error is None:
        run.units, run.seconds, run.cpu = report["messages"], report["seconds"], report["cpu"]
    sent = int(run.units) if error is None else -1
    if error is None:
        run.error = check(sink_, message_digest(client), sent)
    else:
        sink_.stats()  # forget what a failed run left
    return run


def run_smtp_source(workload: Workload, sink_: Sink, count: int, timeout: float) -> Run:
    with tempfile.NamedTemporaryFile(suffix=".txt") as message_file:
        message_file.write(messages.MESSAGE_LF)
        message_file.flush()
        args = [messages.SMTP_SOURCE, "-m", str(count), "-F", message_file.name]
        args += ["-M", messages.DOMAIN, "-f", messages.SENDER, "-t", messages.RECIPIENT]
        if workload.name != "new":
            args.append("-d")
        if workload.name == "concurrent":
            args += ["-s", str(messages.CONNECTIONS)]
        args.append(f"127.0.0.1:{sink_.port}")
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        try:
            out = subprocess.run(
                pinned(CLIENT_CPU, args), capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            return Run(error=f"killed after {timeout:.0f} s")
        seconds = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        return Run(error=f"failed: {out.stderr.strip()[-200:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Run(count, seconds, cpu, error=check(sink_, SMTP_SOURCE_DIGEST, count))


def run_body_client(
    workload: Workload, client: str, sink_: Sink, mib: int, ca: str, path: Path, timeout: float
) -> Run:
    report, error = run_process(body_command(workload, client, sink_.port, mib, ca, path), timeout)
    run = Run(error=error)
    if error is None:
        run.units, run.seconds = mib, report["elapsed"]
        run.cpu = report.get("cpu")
        run.rss = report["peak"] - report["idle"]
        run.error = check(sink_, body_digest(mib), 1)
    else:
        sink_.stats()
    return run


MESSAGE_DIGEST = digest(iter([messages.MESSAGE]))


def message_digest(client: str) -> str:
    """What the sink must receive from ``client``: the message, signed first by
    the signed clients (their signatures are the same for every message)."""
    for algorithm in ("rsa", "ed25519"):
        if client == f"txcolombe-dkim-{algorithm}":
            return digest(iter([messages.signed_message(algorithm)]))
    return MESSAGE_DIGEST


#: smtp-source -F ends every message with an empty line of its own.
SMTP_SOURCE_DIGEST = digest(iter([messages.MESSAGE, b"\r\n"]))
_BODY_DIGESTS: dict[int, str] = {}


def body_digest(mib: int) -> str:
    """What the sink must see for the benchmark body of ``mib`` chunks: the
    dot-stuffed chunks (each ends with CRLF, so each is stuffed alone)."""
    if mib not in _BODY_DIGESTS:
        stuffed = large_body.chunk_of_lines().replace(b"\r\n.", b"\r\n..")
        _BODY_DIGESTS[mib] = digest(stuffed for _ in range(mib))
    return _BODY_DIGESTS[mib]


def available(client: str) -> bool:
    if client == "smtp-source" and not os.access(messages.SMTP_SOURCE, os.X_OK):
        print(f"  skipping smtp-source: no {messages.SMTP_SOURCE} (Debian package postfix)")
        return False
    if client == "aiosmtplib":
        try:
            import aiosmtplib  # noqa: F401
        except ImportError:
            print(f"  skipping aiosmtplib: not installed in {sys.executable}")
            return False
    return True


def run_workload(
    workload: Workload, rounds: int, count: int, timeout: float, tmp: Path, ca_files: Any
) -> Outcome:
    outcome = Outcome(workload, count)
    clients = [c for c in workload.clients if available(c)]
    outcome.runs = {client: [] for client in clients}
    cert = (ca_files[1], ca_files[2]) if workload.tls else None
    body_file = tmp / "body.eml"
    if workload.unit == "MiB" and (not body_file.exists() or body_file.stat().st_size == 0):
        with body_file.open("wb") as out:
            for chunk in large_body.body_chunks(count):
                out.write(chunk)
    runner: Callable[[str, Sink], Run]
    if workload.unit == "MiB":

        def runner(client: str, s: Sink) -> Run:
            return run_body_client(workload, client, s, count, ca_files[0], body_file, timeout)
    else:

        def runner(client: str, s: Sink) -> Run:
            return run_message_client(workload, client, s, count, timeout)

    with sink(cert) as running:
        for round_ in range(rounds):
            print(f"  {workload.name}: round {round_ + 1} of {rounds}", file=sys.stderr, flush=True)
            # Each round starts with the next client: none always runs first
            # (on a machine the runs before have left warmer, or fuller: a
            # new connection per message leaves thousands of TIME_WAIT sockets).
            turn = round_ % len(clients)
            for client in clients[turn:] + clients[:turn]:
                outcome.runs[client].append(runner(client, running))
    return outcome


# -- the report ------------------------------------------------------------------------


def peer_name(workload: Workload, client: str) -> str:
    return PEER_NAMES.get(workload.name, {}).get(client, client)


def fmt_rate(rate: float | None, unit: str) -> str:
    if rate is None:
        return "failed"
    return f"{rate:,.0f} {unit}/s"


def verdicts(outcome: Outcome) -> list[dict[str, Any]]:
    """Each target of the workload with its per-round ratios, median and verdict."""
    result: list[dict[str, Any]] = []
    w = outcome.workload
    for target in w.targets:
        ratios = outcome.ratios(target.peer)
        median = statistics.median(ratios) if ratios else None
        by_cpu = outcome.cpu_ratios(target.peer)
        result.append(
            {
                "target": f">= {target.ratio:g}x {peer_name(w, target.peer)}",
                "ratios": ratios,
                "median": median,
                "met": median is not None and median >= target.ratio,
                "cpu_ratios": by_cpu,
                "cpu_median": statistics.median(by_cpu) if by_cpu else None,
            }
        )
    cpu = outcome.median_of("txcolombe", "cpu")
    rate_units = outcome.median_of("txcolombe", "units")
    if w.cpu_target is not None and cpu is not None and rate_units:
        per_unit = cpu / rate_units
        result.append(
            {
                "target": f"<= {w.cpu_target * 1e6:.0f} us client CPU per {w.unit}",
                "median": per_unit * 1e6,
                "met": per_unit <= w.cpu_target,
            }
        )
    if w.unit == "MiB":
        rss = outcome.median_of("txcolombe", "rss")
        result.append(
            {
                "target": f"peak RSS <= idle + {RSS_TARGET:g} MiB",
                "median": rss,
                "met": rss is not None and rss <= RSS_TARGET,
            }
        )
    return result


def cpu_per_unit(outcome: Outcome, client: str) -> str:
    runs = [
        r for r in outcome.runs.get(client, []) if r.cpu is not None and r.units and not r.error
    ]
    if not runs:
        return ""
    per = statistics.median(r.cpu / r.units for r in runs if r.cpu is not None)
    return (
        f"{per * 1e6:.0f} us/msg" if outcome.workload.unit == "msg" else f"{per * 1e3:.2f} ms/MiB"
    )


def print_table(outcomes: list[Outcome], rounds: int) -> None:
    print(f"\n{tree.headline()}")
    print(f"medians of {rounds} round(s); ratios: txcolombe / peer, per round, then their median")
    print("(by CPU: the peer's client CPU per unit over txcolombe's, the same way)")
    head = ("workload", "txcolombe", "peers in the same run", "client CPU per unit", "target")
    print("| " + " | ".join(head) + " | measured | |")
    print("|---|---|---|---|---|---|---|")
    for outcome in outcomes:
        w = outcome.workload
        size = f"{outcome.count:,} x " if w.unit == "msg" else f"{outcome.count} MiB "
        ours = fmt_rate(outcome.median_rate("txcolombe"), w.unit)
        peers = "; ".join(
            f"{peer_name(w, c)} {fmt_rate(outcome.median_rate(c), w.unit)}"
            for c in outcome.runs
            if c != "txcolombe"
        )
        cpus = "; ".join(
            f"{'txcolombe' if c == 'txcolombe' else peer_name(w, c)} {cpu}"
            for c in outcome.runs
            if (cpu := cpu_per_unit(outcome, c))
        )
        if not verdicts(outcome):  # a row of figures only (the signed one)
            print(f"| {size}{w.title} | {ours} | {peers} | {cpus} | (no target) | | |")
        for i, v in enumerate(verdicts(outcome)):
            median = v["median"]
            if median is None:
                measured = "n/a"
            elif "ratios" in v:
                measured = f"{median:.2f}x"
                if v["cpu_median"] is not None:
                    measured += f" (by CPU {v['cpu_median']:.2f}x)"
            elif "RSS" in v["target"]:
                measured = f"+{median:.1f} MiB"
            else:
                measured = f"{median:.0f} us"
            first = i == 0
            cells = [
                f"{size}{w.title}" if first else "",
                ours if first else "",
                peers if first else "",
                cpus if first else "",
                v["target"],
                measured,
                "met" if v["met"] else "MISSED",
            ]
            print("| " + " | ".join(cells) + " |")
    for outcome in outcomes:
        for error in outcome.errors():
            print(f"{outcome.workload.name}: {error}")


def machine() -> dict[str, Any]:
    return {
        "cpus": len(os.sched_getaffinity(0)),
        "cpu": messages.cpu_model(),
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "load_at_start": os.getloadavg(),
        "versions": {
            p: messages.version_of(p) for p in ("txcolombe", "aiosmtplib", "twisted", "pyopenssl")
        },
        "postfix": messages.postfix_version(),
        "txcolombe": tree.describe(),
    }


def write_json(path: Path, outcomes: list[Outcome], rounds: int) -> None:
    data = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rounds": rounds,
        "machine": machine(),
        "pinning": {"sink_cpu": SINK_CPU, "client_cpu": CLIENT_CPU},
        "workloads": {
            o.workload.name: {
                "title": o.workload.title,
                "count": o.count,
                "unit": o.workload.unit,
                "runs": {c: [run.__dict__ for run in runs] for c, runs in o.runs.items()},
                "median_rates": {c: o.median_rate(c) for c in o.runs},
                "targets": verdicts(o),
            }
            for o in outcomes
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"\nresults: {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one round, small counts")
    parser.add_argument("--rounds", type=int, help="rounds per workload (5; --quick: 1)")
    names = [w.name for w in WORKLOADS]
    parser.add_argument("--only", help=f"comma-separated workloads of: {', '.join(names)}")
    parser.add_argument("--timeout", type=float, default=300.0, help="kill a client after this")
    parser.add_argument("--json", type=Path, default=RESULTS, help="where the results go")
    parser.add_argument("--relay", action="store_true", help="also run bench/relay.py")
    options = parser.parse_args()
    chosen = options.only.split(",") if options.only else names
    unknown = set(chosen) - set(names)
    if unknown:
        parser.error(f"unknown workloads: {', '.join(sorted(unknown))}")
    rounds = options.rounds or (1 if options.quick else 5)
    outcomes: list[Outcome] = []
    print(f"machine: {machine()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="txc-bench-") as tmp:
        ca_files = large_body.make_cert(Path(tmp))
        for w in WORKLOADS:
            if w.name not in chosen:
                continue
            count = w.quick_count if options.quick else w.count
            print(f"==> {w.name}: {w.title}", flush=True)
            outcomes.append(run_workload(w, rounds, count, options.timeout, Path(tmp), ca_files))
    print_table(outcomes, rounds)
    write_json(options.json, outcomes, rounds)
    failed = any(o.errors() for o in outcomes)
    if options.relay:
        print("\n==> bench/relay.py", flush=True)
        failed |= (
            subprocess.run([sys.executable, str(HERE / "relay.py")], check=False).returncode != 0
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
