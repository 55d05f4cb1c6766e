"""Benchmark: messages/s accepted by ``twistd smtprelay`` (fsync on) against
Postfix, both fed by the same ``smtp-source`` run; printed as a ratio.

    /tmp/venv/bin/python bench/relay.py [-m MESSAGES] [-s SESSIONS] [-l SIZE]

The relay forwards to ``smtp-sink`` (the time until every message is
delivered there is printed too). Postfix is the private instance of
``tools/peers/postfix_peer.py`` (needs root), delivering to its Maildir.
Everything listens on 127.0.0.1 high ports and is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

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


def bench_relay(messages: int, sessions: int, size: int) -> tuple[float, float]:
    work = Path(tempfile.mkdtemp(prefix="txc-bench-relay-"))
    sink_port = free_port()
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    sink = subprocess.Popen([SMTP_SINK, *user, f"127.0.0.1:{sink_port}", "256"])
    relay = RelayProcess(
        work, free_port(), [f"--smarthost=127.0.0.1:{sink_port}", "--smarthost-tls=none"]
    )
    try:
        wait_for(lambda: _port_open(sink_port), 10, "smtp-sink")
        relay.start()
        started = time.perf_counter()
        accept = smtp_source(relay.port, messages, sessions, size)

        def delivered() -> bool:
            out = relay.control("stats").stdout
            return bool(out) and json.loads(out)["delivered"] >= messages

        wait_for(delivered, 120, "delivery to smtp-sink", poll=0.01)
        return accept, time.perf_counter() - started
    finally:
        relay.stop()
        sink.terminate()
        sink.wait(10)
        shutil.rmtree(work, ignore_errors=True)


def _port_open(port: int) -> bool:
    from tools.peers.relay_process import port_open

    return port_open(port)


def bench_postfix(messages: int, sessions: int, size: int) -> float | None:
    from tools.peers import postfix_peer

    reason = postfix_peer.available()
    if reason is not None:
        print(f"Postfix unavailable: {reason}")
        return None
    import trustme

    work = Path(tempfile.mkdtemp(prefix="txc-bench-postfix-"))
    try:
        work.chmod(0o755)
        ca = trustme.CA()
        leaf = ca.issue_cert("localhost", "127.0.0.1")
        cert, key = work / "cert.pem", work / "key.pem"
        cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
        key.write_bytes(leaf.private_key_pem.bytes())
        with postfix_peer.PostfixPeer(work / "peer", cert, key) as peer:
            return smtp_source(peer.ports.smtp, messages, sessions, size)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--messages", type=int, default=2000)
    parser.add_argument("-s", "--sessions", type=int, default=4)
    parser.add_argument("-l", "--size", type=int, default=1024)
    args = parser.parse_args()
    accept, total = bench_relay(args.messages, args.sessions, args.size)
    relay_rate = args.messages / accept
    print(f"smtprelay: {relay_rate:8.0f} msg/s accepted (fsync on); "
          f"all delivered to smtp-sink after {total:.2f} s")  # fmt: skip
    postfix = bench_postfix(args.messages, args.sessions, args.size)
    if postfix is not None:
        postfix_rate = args.messages / postfix
        print(f"postfix:   {postfix_rate:8.0f} msg/s accepted")
        print(f"ratio smtprelay/postfix: {relay_rate / postfix_rate:.2f}x")


if __name__ == "__main__":
    main()
