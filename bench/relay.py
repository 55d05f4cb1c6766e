"""Benchmark: messages/s accepted by ``twistd smtprelay`` (fsync on) against
Postfix, both fed by the same ``smtp-source`` run; printed as a ratio.

The relay forwards to ``smtp-sink`` (the time until every message is
delivered there is printed too). Postfix is the private instance of
``tools/peers/postfix_peer.py`` (needs root), delivering to its Maildir.
The two take turns for ``--rounds`` rounds (a fresh relay and spool each
round) and the medians are compared: on a shared machine one round can be
off by a third. Everything listens on 127.0.0.1 high ports and is stopped
at the end.

Each round also runs the relay with DKIM signing on (``--dkim`` for the
``From:`` domain smtp-source writes, client.test), once with an RSA-2048 key
and once with an Ed25519 key, unless ``--no-signed``: the signed rates are
compared with the unsigned one and with Postfix's.

    /tmp/venv/bin/python bench/relay.py [-m MESSAGES] [-s SESSIONS] [-l SIZE] [-r ROUNDS]
                                        [--no-signed]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import tree  # bench/, this script's directory

tree.use_this_tree()

from tools.peers.aiosmtpd_peer import free_port  # noqa: E402
from tools.peers.relay_process import RelayProcess, wait_for  # noqa: E402

SMTP_SOURCE = "/usr/sbin/smtp-source"
SMTP_SINK = "/usr/sbin/smtp-sink"


def smtp_source(port: int, messages: int, sessions: int, size: int) -> float:
    """Seconds for smtp-source to hand ``messages`` over ``sessions`` connections."""
    started = time.perf_counter()
    subprocess.run(
        [SMTP_SOURCE, "-s", str(sessions), "-m", str(messages), "-l", str(size),
         "-f", "bench@client.test", "-t", "sink@example.org", f"127.0.0.1:{port}"],
        check=True, timeout=600,
    )  # fmt: skip
    return time.perf_counter() - started


#: The ``From:`` domain of smtp-source's messages (from its ``-f``).
SIGNED_DOMAIN = "client.test"


def dkim_keys(directory: Path) -> dict[str, list[str]]:
    """The relay arguments of each signed run, keys written to ``directory``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    keys = {
        "rsa-2048": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ed25519": ed25519.Ed25519PrivateKey.generate(),
    }
    runs: dict[str, list[str]] = {}
    for name, key in keys.items():
        path = directory / f"{name}.pem"
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        runs[name] = [f"--dkim={SIGNED_DOMAIN}:{name}:{path}"]
    return runs


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_relay(
    messages: int,
    sessions: int,
    size: int,
    extra: Sequence[str] = (),
    *,
    twistd: Sequence[str] = (),
    watch: Callable[[int], AbstractContextManager[object]] | None = None,
) -> tuple[float, float, float]:
    """Seconds to accept, and until all are at smtp-sink, and the relay
    process's CPU seconds per message (its committer child not counted);
    ``extra``: more relay arguments, ``twistd``: twistd's own (a profiler);
    ``watch(pid)``: a context the relay process runs the messages in (a
    sampling profiler attached to it)."""
    work = Path(tempfile.mkdtemp(prefix="txc-bench-relay-"))
    sink_port = free_port()
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    sink = subprocess.Popen([SMTP_SINK, *user, f"127.0.0.1:{sink_port}", "256"])
    relay = RelayProcess(
        work,
        free_port(),
        [f"--smarthost=127.0.0.1:{sink_port}", "--smarthost-tls=none", *extra],
        twistd,
    )
    try:
        wait_for(lambda: _port_open(sink_port), 10, "smtp-sink")
        relay.start()
        assert relay.proc is not None
        pid = relay.proc.pid

        def delivered() -> bool:
            out = relay.control("--json", "stats").stdout
            return bool(out) and json.loads(out)["delivered"] >= messages

        with watch(pid) if watch is not None else contextlib.nullcontext():
            cpu = cpu_seconds(pid)
            started = time.perf_counter()
            accept = smtp_source(relay.port, messages, sessions, size)
            wait_for(delivered, 120, "delivery to smtp-sink", poll=0.01)
            total = time.perf_counter() - started
            per_message = (cpu_seconds(pid) - cpu) / messages
        return accept, total, per_message
    finally:
        relay.stop()
        sink.terminate()
        sink.wait(10)
        shutil.rmtree(work, ignore_errors=True)


def _port_open(port: int) -> bool:
    from tools.peers.relay_process import port_open

    return port_open(port)


class PostfixBench:
    """The private Postfix of ``tools/peers/postfix_peer.py``, started once for
    every round (or None when it is unavailable)."""

    def __init__(self) -> None:
        self.peer: object | None = None
        self.work: Path | None = None

    def __enter__(self) -> PostfixBench:
        from tools.peers import postfix_peer

        reason = postfix_peer.available()
        if reason is not None:
            print(f"Postfix unavailable: {reason}")
            return self
        import trustme

        # Postfix's own users must reach the work directory: not 0700.
        self.work = Path(tempfile.mkdtemp(prefix="txc-bench-postfix-"))
        self.work.chmod(0o755)
        ca = trustme.CA()
        leaf = ca.issue_cert("localhost", "127.0.0.1")
        cert, key = self.work / "cert.pem", self.work / "key.pem"
        cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
        key.write_bytes(leaf.private_key_pem.bytes())
        peer = postfix_peer.PostfixPeer(self.work / "peer", cert, key)
        self.peer = peer.__enter__()
        return self

    def run(self, messages: int, sessions: int, size: int) -> tuple[float, float] | None:
        """Seconds to accept, and until all are in the Maildir (then emptied, so
        that no delivery of this round runs into the next)."""
        peer: Any = self.peer
        if peer is None:
            return None
        started = time.perf_counter()
        accept = smtp_source(peer.ports.smtp, messages, sessions, size)
        wait_for(lambda: len(peer.message_paths()) >= messages, 120, "Postfix's deliveries")
        total = time.perf_counter() - started
        peer.clear_messages()
        return accept, total

    def __exit__(self, *exc: object) -> None:
        try:
            if self.peer is not None:
                peer: Any = self.peer
                peer.__exit__(None, None, None)
        finally:
            if self.work is not None:
                shutil.rmtree(self.work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--messages", type=int, default=2000)
    parser.add_argument("-s", "--sessions", type=int, default=4)
    parser.add_argument("-l", "--size", type=int, default=1024)
    parser.add_argument(
        "-r",
        "--rounds",
        type=int,
        default=3,
        help="rounds, relay and Postfix taking turns; medians are compared",
    )
    parser.add_argument(
        "--no-signed", action="store_true", help="skip the DKIM-signed runs (RSA-2048, Ed25519)"
    )
    args = parser.parse_args()
    print(tree.headline(), flush=True)
    relay_rates: list[float] = []
    postfix_rates: list[float] = []
    signed_rates: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    keys_dir = Path(tempfile.mkdtemp(prefix="txc-bench-dkim-"))
    signed_runs = {} if args.no_signed else dkim_keys(keys_dir)
    with PostfixBench() as postfix:
        for number in range(1, args.rounds + 1):
            accept, total, per_message = bench_relay(args.messages, args.sessions, args.size)
            relay_rates.append(args.messages / accept)
            cpu.setdefault("unsigned", []).append(per_message)
            line = (
                f"round {number}: smtprelay {relay_rates[-1]:6.0f} msg/s accepted (fsync on), "
                f"all delivered to smtp-sink after {total:.2f} s, "
                f"{per_message * 1000:.2f} ms CPU/msg"
            )
            for name, extra in signed_runs.items():
                accept, total, per_message = bench_relay(
                    args.messages, args.sessions, args.size, extra
                )
                signed_rates.setdefault(name, []).append(args.messages / accept)
                cpu.setdefault(name, []).append(per_message)
                line += (
                    f"; signed {name} {signed_rates[name][-1]:6.0f} msg/s "
                    f"(delivered after {total:.2f} s, {per_message * 1000:.2f} ms CPU/msg)"
                )
            timing = postfix.run(args.messages, args.sessions, args.size)
            if timing is not None:
                postfix_rates.append(args.messages / timing[0])
                line += (
                    f"; postfix {postfix_rates[-1]:6.0f} msg/s accepted, "
                    f"all in its Maildir after {timing[1]:.2f} s"
                )
            print(line, flush=True)
    shutil.rmtree(keys_dir, ignore_errors=True)
    relay_rate = statistics.median(relay_rates)
    print(f"smtprelay: {relay_rate:8.0f} msg/s accepted (fsync on), median of {args.rounds}")
    postfix_rate = statistics.median(postfix_rates) if postfix_rates else None
    for name, rates in signed_rates.items():
        rate = statistics.median(rates)
        line = (
            f"smtprelay DKIM {name}: {rate:8.0f} msg/s accepted, {rate / relay_rate:.2f}x unsigned"
        )
        if postfix_rate:
            line += f", {rate / postfix_rate:.2f}x postfix"
        print(line)
    for name, times in cpu.items():
        print(f"relay process CPU, {name}: {statistics.median(times) * 1000:.2f} ms/msg (median)")
    if postfix_rate:
        print(f"postfix:   {postfix_rate:8.0f} msg/s accepted, median of {args.rounds}")
        print(f"ratio smtprelay/postfix: {relay_rate / postfix_rate:.2f}x")


if __name__ == "__main__":
    main()
