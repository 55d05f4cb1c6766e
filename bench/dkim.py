"""Benchmark: the memory and time that DKIM signing of one large body costs.

    python bench/dkim.py [--mib 1024] [--cases hash,file,iterator]

Each case runs in a fresh process and prints its time and the peak RSS
above its idle RSS (after imports and key loading, before the body):

- ``hash``: :class:`txcolombe.codec.dkim.MessageSigner` (RSA-2048 and Ed25519,
  relaxed and simple bodies) fed the generated message in 1 MiB chunks;
- ``file``: :func:`txcolombe.client.signing.signed_body` on a file on disk (read
  twice: the hash pass, then the send pass into a consumer that drops it);
- ``iterator``: the same on a one-shot iterator, spooled to a temporary
  file first.

The target is a peak of at most 32 MiB above idle, whatever the size.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import tree  # bench/, this script's directory

tree.use_this_tree()

HERE = Path(__file__).resolve().parent
HEADERS = (
    b"From: Alice <alice@example.test>\r\nTo: bob@example.org\r\nSubject: a large body\r\n"
    b"Date: Tue, 1 Dec 2026 10:00:00 +0000\r\nMessage-ID: <big@example.test>\r\n\r\n"
)
LINE = b"The quick brown fox jumps over the lazy dog;  0123456789\t ABCDEFGHIJKLMNOPQR \r\n"
MIB = 1 << 20
CASES = ("hash", "file", "iterator")


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def message_chunks(mib: int) -> Iterator[bytes]:
    yield HEADERS
    chunk = LINE * (MIB // len(LINE))
    for _ in range(mib):
        yield chunk
    yield b"\r\n\r\n"  # trailing empty lines, which the body hash ignores


def _signers() -> list[Any]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    from txcolombe.codec.dkim import DKIMSigner

    def pem(key: Any) -> bytes:
        return key.private_bytes(  # type: ignore[no-any-return]
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    return [
        DKIMSigner("example.test", "rsa", pem(rsa.generate_private_key(65537, 2048))),
        DKIMSigner(
            "example.test",
            "ed",
            pem(ed25519.Ed25519PrivateKey.generate()),
            canonicalization="relaxed/simple",
        ),
    ]


def child(case: str, mib: int) -> None:
    """One case, in this process; prints a JSON line."""
    from twisted.internet import task
    from twisted.internet.defer import Deferred
    from twisted.internet.interfaces import IConsumer
    from zope.interface import implementer

    from txcolombe.client.signing import signed_body
    from txcolombe.codec.dkim import MessageSigner

    signers = _signers()
    path = None
    if case == "file":
        with tempfile.NamedTemporaryFile(prefix="txcolombe-bench-", delete=False) as out:
            for chunk in message_chunks(mib):
                out.write(chunk)
            path = Path(out.name)
    idle = rss_mib()
    sent = 0

    @implementer(IConsumer)
    class Drop:
        def write(self, data: bytes) -> None:
            nonlocal sent
            sent += len(data)

        def registerProducer(self, producer: object, streaming: bool) -> None:
            pass

        def unregisterProducer(self) -> None:
            pass

    async def signed(body: Any) -> None:
        async with signed_body(body, signers) as producer:
            await producer.startProducing(Drop())

    start = time.perf_counter()
    try:
        if case == "hash":
            message = MessageSigner(signers)
            for chunk in message_chunks(mib):
                message.feed(chunk)
            sent = len(message.finish())
        elif case == "file":
            assert path is not None
            with path.open("rb") as file:
                task.react(lambda _reactor: Deferred.fromCoroutine(signed(file)))
        else:
            task.react(lambda _reactor: Deferred.fromCoroutine(signed(message_chunks(mib))))
    except SystemExit as done:  # task.react ends with sys.exit
        if done.code:
            raise
    finally:
        if path is not None:
            path.unlink()
    elapsed = time.perf_counter() - start
    result = {"case": case, "elapsed": elapsed, "idle": idle, "peak": rss_mib(), "octets": sent}
    print(json.dumps(result), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=1024, help="body size in MiB (default 1024)")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated cases")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        child(options.child, options.mib)
        return 0
    print(f"DKIM signing of a {options.mib} MiB body (RSA-2048 + Ed25519), one process per case")
    worst = 0.0
    for case in options.cases.split(","):
        run = subprocess.run(
            [sys.executable, __file__, "--child", case, "--mib", str(options.mib)],
            capture_output=True,
            text=True,
            check=False,
        )
        if run.returncode != 0:
            print(f"{case}: failed\n{run.stderr}", file=sys.stderr)
            return 1
        result = json.loads(run.stdout.strip().splitlines()[-1])
        above = result["peak"] - result["idle"]
        worst = max(worst, above)
        rate = options.mib / result["elapsed"]
        print(
            f"{case:>9}: {result['elapsed']:7.2f} s  {rate:7.1f} MiB/s  "
            f"peak RSS {result['peak']:6.1f} MiB, {above:5.1f} MiB above idle"
        )
    verdict = "within" if worst <= 32 else "OVER"
    print(f"worst: {worst:.1f} MiB above idle ({verdict} the 32 MiB target)")
    return 0 if worst <= 32 else 1


if __name__ == "__main__":
    sys.exit(main())
