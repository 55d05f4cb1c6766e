"""Benchmark: one large body, streamed, plain and over STARTTLS.

    python bench/large_body.py [--mib 1024] [--tls] [--clients txcolombe,socket,smtplib]

Starts ``bench/sink.py`` in its own process, then runs each client in a
fresh process of its own and prints MiB/s and the sender's peak RSS above
its idle RSS (after imports, before the body), with txcolombe's ratios to
the others measured in the same run. The body is generated in 1 MiB chunks
of 78-octet lines (some starting with a dot), so no client reads a disk.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import socket
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
LINE = b"The quick brown fox jumps over the lazy dog; 0123456789 ABCDEFGHIJKLMNOPQRS\r\n"
DOT_LINE = b".leading dot on this line, which DATA must stuff -------------------------\r\n"
MIB = 1 << 20


def chunk_of_lines() -> bytes:
    lines = (LINE * 12 + DOT_LINE) * (MIB // (len(LINE) * 13) + 1)
    cut = lines.rfind(b"\r\n", 0, MIB) + 2
    return lines[:cut]


def body_chunks(mib: int) -> Iterator[bytes]:
    chunk = chunk_of_lines()
    for _ in range(mib):
        yield chunk


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- clients, each run in its own process -------------------------------------


class Window:
    """The span a client is timed over: wall-clock and CPU seconds both, from
    :meth:`start` to :meth:`stop`, so that a client's CPU per MiB counts what
    its MiB/s counts (not its imports or its set-up before the clock)."""

    def __init__(self) -> None:
        self.elapsed = 0.0
        self.cpu = 0.0
        self._wall = 0.0
        self._cpu = 0.0

    def start(self) -> None:
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def stop(self) -> None:
        self.elapsed = time.perf_counter() - self._wall
        self.cpu = time.process_time() - self._cpu


def _smtp_dialogue(sock: socket.socket, commands: list[bytes]) -> None:
    for command in commands:
        sock.sendall(command)
        data = b""
        while not data.endswith(b"\r\n") or data.split(b"\r\n")[-2][3:4] == b"-":
            data += sock.recv(65536)


def run_socket(port: int, mib: int, ca: str | None) -> Window:
    import ssl

    window = Window()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.recv(1024)
    window.start()
    _smtp_dialogue(sock, [b"EHLO bench\r\n"])
    if ca:
        _smtp_dialogue(sock, [b"STARTTLS\r\n"])
        context = ssl.create_default_context(cafile=ca)
        sock = context.wrap_socket(sock, server_hostname="localhost")
        _smtp_dialogue(sock, [b"EHLO bench\r\n"])
    _smtp_dialogue(
        sock, [b"MAIL FROM:<b@example.com>\r\n", b"RCPT TO:<s@example.org>\r\n", b"DATA\r\n"]
    )
    stuffed = chunk_of_lines().replace(b"\r\n.", b"\r\n..")
    for _ in range(mib):
        sock.sendall(stuffed)
    _smtp_dialogue(sock, [b".\r\n"])
    window.stop()
    sock.close()
    return window


def run_smtplib(port: int, mib: int, ca: str | None) -> Window:
    import smtplib
    import ssl

    window = Window()
    message = b"".join(body_chunks(mib))  # smtplib takes the whole message
    window.start()
    with smtplib.SMTP("127.0.0.1", port) as client:
        if ca:
            client.starttls(context=ssl.create_default_context(cafile=ca))
        client.sendmail("b@example.com", ["s@example.org"], message)
    window.stop()
    return window


def run_aiosmtplib(port: int, mib: int, ca: str | None) -> Window:
    import asyncio
    import ssl

    import aiosmtplib

    message = b"".join(body_chunks(mib))  # aiosmtplib takes the whole message

    async def send() -> None:
        context = ssl.create_default_context(cafile=ca) if ca else None
        await aiosmtplib.send(
            message,
            sender="b@example.com",
            recipients=["s@example.org"],
            hostname="localhost" if ca else "127.0.0.1",
            port=port,
            start_tls=bool(ca),
            tls_context=context,
            timeout=600,
        )

    window = Window()
    window.start()
    asyncio.run(send())
    window.stop()
    return window


def run_twisted_mail(port: int, mib: int, ca: str | None) -> Window:
    """twisted.mail.smtp.sendmail streaming from a file of the body (plaintext:
    its sendmail() has no way to trust the benchmark's private CA)."""
    from twisted.internet import defer, task
    from twisted.mail import smtp

    if ca:
        raise NotImplementedError("twisted.mail.smtp.sendmail cannot take a trust root")
    with tempfile.TemporaryFile() as body:
        for chunk in body_chunks(mib):
            body.write(chunk)
        body.seek(0)
        window = Window()

        async def send(reactor: object) -> None:
            window.start()
            await smtp.sendmail(  # type: ignore[no-untyped-call]
                "127.0.0.1",
                "b@example.com",
                ["s@example.org"],
                body,
                port=port,
                senderDomainName="bench.example.com",
            )
            window.stop()

        with contextlib.suppress(SystemExit):
            task.react(lambda reactor: defer.ensureDeferred(send(reactor)))
        return window


def run_twisted_floor(port: int, mib: int, ca: str | None) -> Window:
    """The floor of a Twisted client: a bare protocol writes the same
    pre-stuffed bytes as ``run_socket`` to its transport (TCP, or TLS after
    STARTTLS with ``optionsForClientTLS``), in txcolombe's chunk size, paced
    by the transport as a push producer's consumer. What it costs is
    Twisted's (and pyOpenSSL's), not ours."""
    from twisted.internet import defer, task
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
    from twisted.internet.interfaces import IPushProducer
    from twisted.internet.protocol import Protocol
    from twisted.internet.ssl import Certificate, optionsForClientTLS
    from zope.interface import implementer

    from txcolombe.client.body import CHUNK

    stuffed = chunk_of_lines().replace(b"\r\n.", b"\r\n..")
    # Written as txcolombe writes a body, CHUNK octets at a time (cut once,
    # here), so that the two differ only in what txcolombe does to the bytes:
    # over TLS, whole-MiB writes cost the transport about a tenth more.
    pieces = [stuffed[at : at + CHUNK] for at in range(0, len(stuffed), CHUNK)]

    @implementer(IPushProducer)
    class Floor(Protocol):
        def __init__(self) -> None:
            self.pending = b""
            self.waiting: tuple[int, defer.Deferred[None]] | None = None
            self.left = mib * len(pieces)  # writes to make
            self.paused = False

        def replies(self, count: int) -> defer.Deferred[None]:
            d: defer.Deferred[None] = defer.Deferred()
            self.waiting = (count, d)
            self.dataReceived(b"")
            return d

        def dataReceived(self, data: bytes) -> None:
            self.pending += data
            if self.waiting is None:
                return
            count, d = self.waiting
            lines = self.pending.split(b"\r\n")
            finals = [line for line in lines[:-1] if line[3:4] != b"-"]
            if len(finals) >= count:
                self.pending, self.waiting = lines[-1], None
                d.callback(None)

        def pauseProducing(self) -> None:
            self.paused = True

        def resumeProducing(self) -> None:
            self.paused = False
            while not self.paused and self.left:
                # One piece per write, the next in order, while not paused.
                self.transport.write(pieces[-self.left % len(pieces)])  # type: ignore[union-attr]
                self.left -= 1
            if not self.left and self.transport is not None and not self.paused:
                self.transport.unregisterProducer()  # type: ignore[attr-defined]
                self.left = -1
                self.transport.write(b".\r\n")

        def stopProducing(self) -> None:
            self.left = 0

    async def send(reactor: object) -> None:
        from twisted.internet import reactor as the_reactor

        floor = Floor()
        endpoint = TCP4ClientEndpoint(the_reactor, "127.0.0.1", port)
        await connectProtocol(endpoint, floor)  # type: ignore[no-untyped-call]
        transport: Any = floor.transport
        transport.setTcpNoDelay(True)
        await floor.replies(1)
        window.start()
        transport.write(b"EHLO bench\r\n")
        await floor.replies(1)
        if ca:
            transport.write(b"STARTTLS\r\n")
            await floor.replies(1)
            trust = Certificate.loadPEM(Path(ca).read_bytes())
            transport.startTLS(optionsForClientTLS("localhost", trustRoot=trust))
            transport.write(b"EHLO bench\r\n")
            await floor.replies(1)
        transport.write(b"MAIL FROM:<b@example.com>\r\nRCPT TO:<s@example.org>\r\nDATA\r\n")
        await floor.replies(3)
        done = floor.replies(1)
        transport.registerProducer(floor, True)
        floor.resumeProducing()
        await done
        window.stop()
        transport.write(b"QUIT\r\n")
        await floor.replies(1)
        transport.loseConnection()

    window = Window()
    with contextlib.suppress(SystemExit):
        task.react(lambda reactor: defer.ensureDeferred(send(reactor)))
    return window


CLIENTS = {
    "socket": run_socket,
    "twisted-floor": run_twisted_floor,
    "smtplib": run_smtplib,
    "aiosmtplib": run_aiosmtplib,
    "twisted-mail": run_twisted_mail,
}


def client_main(name: str, port: int, mib: int, ca: str | None) -> None:
    import smtplib  # noqa: F401 - count the client's own imports as idle
    import ssl  # noqa: F401

    if name == "twisted-floor":
        import twisted.internet.reactor
        import twisted.internet.ssl  # noqa: F401

    idle = rss_mib()
    window = CLIENTS[name](port, mib, ca)
    report = {"elapsed": window.elapsed, "cpu": window.cpu, "idle": idle, "peak": rss_mib()}
    print(json.dumps(report), flush=True)


def txcolombe_wrapper(port: int, mib: int, ca: str | None, path: str | None = None) -> None:
    """react() exits the process; report from an atexit hook instead. With
    ``path`` the body is that file (of ``mib`` MiB), else generated chunks."""
    import atexit

    from twisted.internet import defer, task
    from twisted.internet.ssl import Certificate

    import txcolombe

    idle = rss_mib()  # an idle client: everything imported, nothing sent
    window = Window()

    def report() -> None:
        report = {"elapsed": window.elapsed, "cpu": window.cpu, "idle": idle, "peak": rss_mib()}
        print(json.dumps(report), flush=True)

    atexit.register(report)

    async def send(reactor: object) -> None:
        trust: Any = Certificate.loadPEM(Path(ca).read_bytes()) if ca else None
        with contextlib.ExitStack() as stack:
            body: Any = stack.enter_context(open(path, "rb")) if path else body_chunks(mib)
            window.start()
            await txcolombe.sendmail(
                "localhost" if ca else "127.0.0.1",
                "bench@example.com",
                ["sink@example.org"],
                body,
                port=port,
                trust_root=trust,
                starttls=ca is not None,
                domain="bench.example.com",
            )
            window.stop()

    task.react(lambda reactor: defer.ensureDeferred(send(reactor)))


# -- the parent -----------------------------------------------------------------


def measure(name: str, port: int, mib: int, ca: str | None) -> dict[str, float]:
    mode = "txclient" if name == "txcolombe" else "client"
    args = [sys.executable, __file__, mode, name, str(port), str(mib), ca or ""]
    out = subprocess.run(args, capture_output=True, text=True, timeout=1800, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{name} failed: {out.stderr[-2000:]}")
    result: dict[str, float] = json.loads(lines[-1])
    return result


def make_cert(workdir: Path) -> tuple[str, str, str]:
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    ca_path, cert_path, key_path = (workdir / n for n in ("ca.pem", "cert.pem", "key.pem"))
    ca.cert_pem.write_to_path(str(ca_path))
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    return str(ca_path), str(cert_path), str(key_path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=100)
    parser.add_argument("--tls", action="store_true")
    parser.add_argument(
        "--clients", default="txcolombe,socket,twisted-floor,smtplib,aiosmtplib,twisted-mail"
    )
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ca = cert = key = None
        if options.tls:
            ca, cert, key = make_cert(Path(tmp))
        port = free_port()
        sink_args = [sys.executable, str(HERE / "sink.py"), str(port)]
        if cert and key:
            sink_args += [cert, key]
        sink = subprocess.Popen(sink_args, stdout=subprocess.PIPE, text=True)
        try:
            assert sink.stdout is not None
            sink.stdout.readline()
            kind = "STARTTLS" if options.tls else "plain"
            print(f"{options.mib} MiB body, {kind}, to bench/sink.py on 127.0.0.1:{port}")
            results: dict[str, dict[str, float]] = {}
            for name in options.clients.split(","):
                if name == "twisted-mail" and ca:
                    print("  skipping twisted-mail: its sendmail() cannot trust a private CA")
                    continue
                print(f"  running {name} ...", flush=True)
                try:
                    results[name] = measure(name, port, options.mib, ca)
                except (RuntimeError, subprocess.TimeoutExpired) as error:
                    print(f"  {name} failed: {str(error)[-300:]}")
        finally:
            sink.terminate()
            sink.wait(timeout=10)
    print(f"{'client':<12}{'seconds':>10}{'MiB/s':>10}{'idle RSS':>11}{'peak RSS':>11}{'+RSS':>8}")
    for name, r in results.items():
        rate = options.mib / r["elapsed"] if r["elapsed"] else 0.0
        print(
            f"{name:<12}{r['elapsed']:>10.2f}{rate:>10.1f}{r['idle']:>10.1f}M"
            f"{r['peak']:>10.1f}M{r['peak'] - r['idle']:>7.1f}M"
        )
    ours = results.get("txcolombe")
    if ours and ours["elapsed"]:
        for name, r in results.items():
            if name != "txcolombe" and r["elapsed"]:
                print(f"txcolombe speed / {name}: {r['elapsed'] / ours['elapsed']:.2f}x")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("client", "txclient"):
        _, mode, name, port_s, mib_s, ca_s, *file_arg = sys.argv
        if mode == "txclient":
            txcolombe_wrapper(int(port_s), int(mib_s), ca_s or None, *file_arg)
        else:
            client_main(name, int(port_s), int(mib_s), ca_s or None)
    else:
        main()
