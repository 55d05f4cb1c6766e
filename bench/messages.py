"""Benchmark: messages per second, 1 KiB each, into Postfix's ``smtp-sink``.

    python bench/messages.py [--scenarios reuse,new,concurrent] [--clients NAMES]
                             [--n N] [--quick] [--repeat R] [--timeout SECONDS]

Scenarios: ``reuse`` sends N messages over one connection (default 3000),
``new`` opens a new connection for each message (default 500), and
``concurrent`` spreads N messages over 8 connections that each send their
share one after another (default 8 x 1000).

Clients: txcolombe, aiosmtplib, smtplib, twisted.mail.smtp as it is
(``twisted-mail``) and with TCP_NODELAY set on its transport
(``twisted-mail-nodelay``), and Postfix's ``smtp-source`` as the C ceiling
(given the same message with ``-F``, so not ``-l``), and a plain Python
socket pipelining MAIL, RCPT and DATA (``socket``, ``reuse`` only: the floor
of a Python client). Each client runs in a
fresh process of its own against the same ``smtp-sink`` (started on a free
127.0.0.1 port, PIPELINING checked, stopped at the end), with the same
1024-octet message (headers and body), plaintext. Times include connecting,
EHLO and QUIT (twisted.mail.smtp.sendmail reports a message sent before its
QUIT, so its ``new`` times leave QUIT out). Each client runs R times (3;
``--quick``: 1), the clients taking turns so that a busy machine slows them
all alike; the table shows each one's best run and the rate of its slowest.

Every client loop is bounded in count and in time: a client stops at N
messages or at its time budget, whichever comes first, and its rate is what
it did over the time it took. twisted.mail.smtp without TCP_NODELAY loses
~44 ms per message to Nagle's algorithm and delayed ACKs, so it gets a budget
of a few seconds and runs once; the others get half of ``--timeout``, after
which the process is killed.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, cast

import tree  # bench/, this script's directory

tree.use_this_tree()

SMTP_SINK = "/usr/sbin/smtp-sink"
SMTP_SOURCE = "/usr/sbin/smtp-source"
HOST = "127.0.0.1"
DOMAIN = "bench.example.com"
SENDER = "bench@example.com"
RECIPIENT = "sink@example.org"
SIZE = 1024
CONNECTIONS = 8
SINK_BACKLOG = 1024

SCENARIOS = {
    "reuse": "messages over one reused connection",
    "new": "messages, a new connection for each",
    "concurrent": f"messages over {CONNECTIONS} concurrent connections, each reused",
}
DEFAULT_N = {"reuse": 3000, "new": 500, "concurrent": CONNECTIONS * 1000}
QUICK_N = {"reuse": 200, "new": 50, "concurrent": CONNECTIONS * 50}
CLIENTS = (
    "txcolombe",
    "txcolombe-queued",
    "txcolombe-dkim-rsa",
    "txcolombe-dkim-ed25519",
    "aiosmtplib",
    "smtplib",
    "twisted-mail",
    "twisted-mail-nodelay",
    "smtp-source",
    "socket",
    "twisted-floor",
)
#: The module each client needs, where it may be missing.
CLIENT_MODULES = {
    "txcolombe": "txcolombe",
    "txcolombe-queued": "txcolombe",
    "txcolombe-dkim-rsa": "txcolombe",
    "txcolombe-dkim-ed25519": "txcolombe",
    "aiosmtplib": "aiosmtplib",
    "twisted-mail": "twisted",
    "twisted-mail-nodelay": "twisted",
    "twisted-floor": "twisted",
}
#: The scenarios of the clients that do not run them all.
SCENARIOS_OF = {"socket": ("reuse",), "twisted-floor": ("reuse", "new")}
#: Clients too slow for the full N: they run for this many seconds instead.
SLOW_BUDGET = {"twisted-mail": 5.0}
QUICK_SLOW_BUDGET = 2.0


def make_message() -> bytes:
    """The message every client sends: exactly SIZE octets, CRLF lines."""
    head = (
        b"From: Bench Sender <bench@example.com>\r\n"
        b"To: Sink <sink@example.org>\r\n"
        b"Subject: txcolombe message-rate benchmark\r\n"
        b"Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n"
        b"Message-ID: <messages.bench@example.com>\r\n"
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=us-ascii\r\n"
        b"\r\n"
    )
    line = b"The quick brown fox jumps over the lazy dog; 0123456789 ABCDEFGHIJ\r\n"
    body = b""
    while len(head) + len(body) + len(line) + len(b"-\r\n") <= SIZE:
        body += line
    body += b"-" * (SIZE - len(head) - len(body) - 2) + b"\r\n"
    message = head + body
    assert len(message) == SIZE
    return message


MESSAGE = make_message()
#: The same message with bare LF line ends, for the APIs that want them
#: (twisted.mail.smtp turns LF into CRLF; smtp-source -F appends CRLF).
MESSAGE_LF = MESSAGE.replace(b"\r\n", b"\n")
#: What the floor clients write, as txcolombe does: EHLO; MAIL, RCPT and DATA
#: in one write; the dot-stuffed message and its dot in another.
EHLO = f"EHLO {DOMAIN}\r\n".encode()
ENVELOPE = f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{RECIPIENT}>\r\nDATA\r\n".encode()
STUFFED = MESSAGE.replace(b"\r\n.", b"\r\n..") + b".\r\n"


def final_replies(pending: bytes) -> tuple[int, bytes]:
    """How many final reply lines ``pending`` completes, and what follows
    them; RuntimeError for a refusal among them (the floors check no more)."""
    lines = pending.split(b"\r\n")
    finals = [line for line in lines[:-1] if line[3:4] != b"-"]
    for line in finals:
        if line[:1] not in (b"2", b"3"):
            raise RuntimeError(f"refused: {line!r}")
    return len(finals), lines[-1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def shares(count: int, parts: int = CONNECTIONS) -> list[int]:
    """``count`` split into ``parts`` near-equal shares."""
    return [count // parts + (1 if i < count % parts else 0) for i in range(parts)]


class Clock:
    """Times one client run and bounds its loops by a deadline."""

    def __init__(self, budget: float) -> None:
        self.start = time.perf_counter()
        self.cpu_start = time.process_time()
        self.deadline = self.start + budget

    def more(self, done: int, count: int) -> bool:
        return done < count and time.perf_counter() < self.deadline

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def outcome(self, done: int) -> Outcome:
        """``done`` messages, the seconds and the CPU seconds (this process) they took."""
        return done, self.elapsed(), time.process_time() - self.cpu_start


Outcome = tuple[int, float, float]  # messages sent, seconds taken, CPU seconds used
Runner = Callable[[str, int, int, float], Outcome]


# -- clients, each run in its own process ---------------------------------------


def react(main: Callable[[], Coroutine[Any, Any, Outcome]]) -> Outcome:
    """Run ``main`` under Twisted's reactor (task.react always exits)."""
    from twisted.internet import defer, task

    outcome: list[Outcome] = []
    errors: list[Exception] = []

    async def run(_reactor: object) -> None:
        try:
            outcome.append(await main())
        except Exception as error:
            errors.append(error)

    try:
        task.react(lambda reactor: defer.ensureDeferred(run(reactor)))
    except SystemExit as stop:
        if stop.code:
            raise
    if errors:
        raise errors[0]
    return outcome[0]


#: Sends kept in flight on one session by the "txcolombe-queued" client.
WINDOW = 16


def run_txcolombe(scenario: str, port: int, count: int, budget: float) -> Outcome:
    """One message at a time, each awaited: the same shape as the peers' loops."""
    return _txcolombe(scenario, port, count, budget, window=1)


#: The DKIM keys of the signed clients (made by ``dkim_signer``, one per algorithm).
DKIM_DOMAIN, DKIM_SELECTOR = "example.com", "bench"


def dkim_signer(algorithm: str) -> Any:
    """A signer with a key made once per machine (deterministic signatures:
    no ``t=``, and RSA PKCS#1 v1.5 and Ed25519 are deterministic), so that the
    sink can check every signed message against one digest."""
    import tempfile
    from pathlib import Path

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    import txcolombe

    path = Path(tempfile.gettempdir()) / f"txcolombe-bench-dkim-{algorithm}.pem"
    if not path.exists():
        key: Any = (
            rsa.generate_private_key(public_exponent=65537, key_size=2048)
            if algorithm == "rsa"
            else ed25519.Ed25519PrivateKey.generate()
        )
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        path.write_bytes(pem)
    return txcolombe.DKIMSigner(DKIM_DOMAIN, DKIM_SELECTOR, path)


def signed_message(algorithm: str) -> bytes:
    """MESSAGE as a signed client sends it: its DKIM-Signature, then the message."""
    from txcolombe.codec.dkim import MessageSigner

    signer = MessageSigner([dkim_signer(algorithm)])
    signer.feed(MESSAGE)
    return signer.finish() + MESSAGE


def run_txcolombe_rsa(scenario: str, port: int, count: int, budget: float) -> Outcome:
    """As ``txcolombe``, every message DKIM-signed with RSA-2048."""
    return _txcolombe(scenario, port, count, budget, window=1, dkim=dkim_signer("rsa"))


def run_txcolombe_ed25519(scenario: str, port: int, count: int, budget: float) -> Outcome:
    """As ``txcolombe``, every message DKIM-signed with Ed25519."""
    return _txcolombe(scenario, port, count, budget, window=1, dkim=dkim_signer("ed25519"))


def run_txcolombe_queued(scenario: str, port: int, count: int, budget: float) -> Outcome:
    """Up to WINDOW sends queued on each session: their commands pipeline
    with the previous message's final dot (one round trip a message)."""
    return _txcolombe(scenario, port, count, budget, window=WINDOW)


def _txcolombe(
    scenario: str, port: int, count: int, budget: float, window: int, dkim: Any = None
) -> Outcome:
    from twisted.internet.defer import Deferred, DeferredSemaphore, gatherResults

    import txcolombe

    async def one_connection(clock: Clock, count: int) -> int:
        session = await txcolombe.connect(
            HOST, port=port, tls_mode=txcolombe.TLSMode.NONE, domain=DOMAIN
        )
        done = 0
        if window == 1:
            while clock.more(done, count):
                await session.send(SENDER, [RECIPIENT], MESSAGE, dkim=dkim)
                done += 1
        else:
            slots = DeferredSemaphore(window)
            sent: list[Deferred[Any]] = []

            def release(result: object) -> object:
                slots.release()
                return result

            while clock.more(len(sent), count):
                await slots.acquire()
                d: Deferred[Any] = session.send(SENDER, [RECIPIENT], MESSAGE)
                d.addBoth(release)
                sent.append(d)
            await gatherResults(sent, consumeErrors=True)
            done = len(sent)
        await session.quit()
        return done

    async def main() -> Outcome:
        clock = Clock(budget)
        done = 0
        if scenario in ("reuse", "signed"):
            done = await one_connection(clock, count)
        elif scenario == "new":
            while clock.more(done, count):
                await txcolombe.sendmail(
                    HOST, SENDER, [RECIPIENT], MESSAGE, port=port, starttls=False, domain=DOMAIN
                )
                done += 1
        else:
            workers = [Deferred.fromCoroutine(one_connection(clock, n)) for n in shares(count)]
            done = sum(await gatherResults(workers, consumeErrors=True))
        return clock.outcome(done)

    return react(main)


def run_aiosmtplib(scenario: str, port: int, count: int, budget: float) -> Outcome:
    import asyncio

    import aiosmtplib

    async def one_connection(clock: Clock, count: int) -> int:
        client = aiosmtplib.SMTP(hostname=HOST, port=port, local_hostname=DOMAIN, start_tls=False)
        await client.connect()
        done = 0
        while clock.more(done, count):
            await client.sendmail(SENDER, [RECIPIENT], MESSAGE)
            done += 1
        await client.quit()
        return done

    async def main() -> Outcome:
        clock = Clock(budget)
        done = 0
        if scenario == "reuse":
            done = await one_connection(clock, count)
        elif scenario == "new":
            while clock.more(done, count):
                await aiosmtplib.send(
                    MESSAGE,
                    sender=SENDER,
                    recipients=[RECIPIENT],
                    hostname=HOST,
                    port=port,
                    local_hostname=DOMAIN,
                    start_tls=False,
                )
                done += 1
        else:
            counts = await asyncio.gather(*(one_connection(clock, n) for n in shares(count)))
            done = sum(counts)
        return clock.outcome(done)

    return asyncio.run(main())


def run_smtplib(scenario: str, port: int, count: int, budget: float) -> Outcome:
    import smtplib

    def one_connection(clock: Clock, count: int) -> int:
        done = 0
        with smtplib.SMTP(HOST, port, local_hostname=DOMAIN) as client:
            while clock.more(done, count):
                client.sendmail(SENDER, [RECIPIENT], MESSAGE)
                done += 1
        return done

    clock = Clock(budget)
    done = 0
    if scenario == "reuse":
        done = one_connection(clock, count)
    elif scenario == "new":
        while clock.more(done, count):
            with smtplib.SMTP(HOST, port, local_hostname=DOMAIN) as client:
                client.sendmail(SENDER, [RECIPIENT], MESSAGE)
            done += 1
    else:
        counts: list[int] = []
        errors: list[BaseException] = []

        def worker(n: int) -> None:
            try:
                counts.append(one_connection(clock, n))
            except BaseException as error:
                errors.append(error)

        threads = [threading.Thread(target=worker, args=(n,)) for n in shares(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        done = sum(counts)
    return clock.outcome(done)


def run_twisted_mail(scenario: str, port: int, count: int, budget: float) -> Outcome:
    return _twisted_mail(scenario, port, count, budget, nodelay=False)


def run_twisted_mail_nodelay(scenario: str, port: int, count: int, budget: float) -> Outcome:
    return _twisted_mail(scenario, port, count, budget, nodelay=True)


def _twisted_mail(scenario: str, port: int, count: int, budget: float, nodelay: bool) -> Outcome:
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred, gatherResults
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
    from twisted.internet.interfaces import ITCPTransport
    from twisted.internet.protocol import connectionDone
    from twisted.mail import smtp
    from twisted.python.failure import Failure

    # twisted.mail.smtp has no annotations: its calls are untyped for mypy.
    def set_nodelay(transport: object) -> None:
        cast(ITCPTransport, transport).setTcpNoDelay(True)

    class Batch(smtp.ESMTPClient):
        """Sends messages over one connection: getMailFrom until told to stop."""

        def __init__(self, clock: Clock, count: int) -> None:
            super().__init__(None, None, DOMAIN.encode(), 10)  # type: ignore[no-untyped-call]
            self.clock = clock
            self.count = count
            self.started = 0
            self.sent = 0
            self.error: Exception | None = None
            self.finished: Deferred[int] = Deferred()

        def connectionMade(self) -> None:
            if nodelay:
                set_nodelay(self.transport)
            super().connectionMade()  # type: ignore[no-untyped-call]

        def getMailFrom(self) -> str | None:
            if not self.clock.more(self.started, self.count):
                return None
            self.started += 1
            return SENDER

        def getMailTo(self) -> list[str]:
            return [RECIPIENT]

        def getMailData(self) -> io.BytesIO:
            return io.BytesIO(MESSAGE_LF)

        def sentMail(
            self, code: int, resp: bytes, numOk: int, addresses: list[Any], log: Any
        ) -> None:
            if code in smtp.SUCCESS:
                self.sent += 1
            else:
                self.error = smtp.SMTPDeliveryError(code, resp, log.str(), addresses)

        def sendError(self, exc: Exception) -> None:
            self.error = exc
            super().sendError(exc)  # type: ignore[no-untyped-call]

        def connectionLost(self, reason: Failure = connectionDone) -> None:
            super().connectionLost(reason)  # type: ignore[no-untyped-call]
            if self.error is not None:
                self.finished.errback(self.error)
            else:
                self.finished.callback(self.sent)

    class NoDelaySender(smtp.ESMTPSender):
        def connectionMade(self) -> None:
            set_nodelay(self.transport)
            super().connectionMade()  # type: ignore[no-untyped-call]

    if nodelay:
        # twisted.mail.smtp.sendmail offers no hook on its transport: give its
        # factory a protocol that sets TCP_NODELAY (this process only).
        smtp.ESMTPSenderFactory.protocol = NoDelaySender

    async def one_connection(clock: Clock, count: int) -> int:
        batch = Batch(clock, count)
        endpoint = TCP4ClientEndpoint(reactor, HOST, port)
        await connectProtocol(endpoint, batch)  # type: ignore[no-untyped-call]
        return await batch.finished

    async def main() -> Outcome:
        clock = Clock(budget)
        done = 0
        if scenario == "reuse":
            done = await one_connection(clock, count)
        elif scenario == "new":
            while clock.more(done, count):
                await smtp.sendmail(  # type: ignore[no-untyped-call]
                    HOST, SENDER, [RECIPIENT], MESSAGE_LF, senderDomainName=DOMAIN, port=port
                )
                done += 1
        else:
            workers = [Deferred.fromCoroutine(one_connection(clock, n)) for n in shares(count)]
            done = sum(await gatherResults(workers, consumeErrors=True))
        return clock.outcome(done)

    return react(main)


def run_socket(scenario: str, port: int, count: int, budget: float) -> Outcome:
    """The floor of a Python client: one socket, MAIL, RCPT and DATA in one
    write, then the message and its dot in another (two round trips a
    message, as every PIPELINING client without queued sends); one connection only."""
    if scenario != "reuse":
        raise NotImplementedError("the plain socket client runs over one connection only")

    def replies(sock: socket.socket, wanted: int, pending: bytes) -> bytes:
        """Read until ``wanted`` final reply lines; return what follows them."""
        while True:
            finals, rest = final_replies(pending)
            if finals >= wanted:
                return rest
            pending += sock.recv(65536)

    clock = Clock(budget)
    with socket.create_connection((HOST, port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rest = replies(sock, 1, b"")
        sock.sendall(EHLO)
        rest = replies(sock, 1, rest)
        done = 0
        while clock.more(done, count):
            sock.sendall(ENVELOPE)
            rest = replies(sock, 3, rest)
            sock.sendall(STUFFED)
            rest = replies(sock, 1, rest)
            done += 1
        sock.sendall(b"QUIT\r\n")
        replies(sock, 1, rest)
    return clock.outcome(done)


def run_twisted_floor(scenario: str, port: int, count: int, budget: float) -> Outcome:
    """The floor of a Twisted client: a bare protocol writing the same bytes
    in the same writes as txcolombe (EHLO; MAIL, RCPT and DATA together; the
    message and its dot, with QUIT on a connection of its own) and counting
    final replies, with no parsing, state machine, timers or log. What it
    costs a message is the reactor's, TCP's and the kernel's; what txcolombe
    costs above it is its own."""
    if scenario not in SCENARIOS_OF["twisted-floor"]:
        raise NotImplementedError("the Twisted floor runs reuse and new only")
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred
    from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
    from twisted.python.failure import Failure

    stuffed_and_quit = STUFFED + b"QUIT\r\n"
    tcp: Any = reactor

    class Floor(Protocol):
        """Sends ``count`` messages (``new``: one, then QUIT) over one connection."""

        def __init__(self, clock: Clock, count: int, quit_with_body: bool) -> None:
            self.clock, self.count, self.quit_with_body = clock, count, quit_with_body
            self.pending = b""
            self.wanted = 1  # the greeting
            self.step = "greeting"
            self.sent = 0
            self.error: str | None = None
            self.finished: Deferred[int] = Deferred()

        def connectionMade(self) -> None:
            cast(Any, self.transport).setTcpNoDelay(True)

        def dataReceived(self, data: bytes) -> None:
            try:
                finals, self.pending = final_replies(self.pending + data)
            except RuntimeError as refused:
                self.error = str(refused)
                cast(Any, self.transport).abortConnection()
                return
            for _ in range(finals):
                self.wanted -= 1
                if not self.wanted:
                    self.next()

        def next(self) -> None:
            transport: Any = self.transport
            if self.step == "body":
                self.sent += 1
            if self.step == "envelope":
                self.step, self.wanted = "body", 1
                transport.write(stuffed_and_quit if self.quit_with_body else STUFFED)
            elif self.step == "greeting":
                self.step, self.wanted = "ehlo", 1
                transport.write(EHLO)
            elif self.step == "quit" or (self.step == "body" and self.quit_with_body):
                self.step = "closing"  # the 221: the server closes first
            elif self.clock.more(self.sent, self.count):
                self.step, self.wanted = "envelope", 3
                transport.write(ENVELOPE)
            else:
                self.step, self.wanted = "quit", 1
                transport.write(b"QUIT\r\n")

        def connectionLost(self, reason: Failure = connectionDone) -> None:
            if self.error is None and self.step != "closing":
                self.error = f"connection lost at {self.step}: {reason.value}"
            if self.error is not None:
                self.finished.errback(RuntimeError(self.error))
            else:
                self.finished.callback(self.sent)

    class Factory(ClientFactory):
        def __init__(self, protocol: Floor) -> None:
            self.floor = protocol

        def buildProtocol(self, addr: object) -> Floor:
            return self.floor

        def clientConnectionFailed(self, connector: object, reason: Failure) -> None:
            self.floor.finished.errback(reason)

    def one_connection(clock: Clock, count: int, quit_with_body: bool) -> Deferred[int]:
        floor = Floor(clock, count, quit_with_body)
        tcp.connectTCP(HOST, port, Factory(floor))
        return floor.finished

    async def main() -> Outcome:
        clock = Clock(budget)
        done = 0
        if scenario == "reuse":
            done = await one_connection(clock, count, quit_with_body=False)
        else:
            while clock.more(done, count):
                done += await one_connection(clock, 1, quit_with_body=True)
        return clock.outcome(done)

    return react(main)


RUNNERS: dict[str, Runner] = {
    "socket": run_socket,
    "twisted-floor": run_twisted_floor,
    "txcolombe": run_txcolombe,
    "txcolombe-queued": run_txcolombe_queued,
    "txcolombe-dkim-rsa": run_txcolombe_rsa,
    "txcolombe-dkim-ed25519": run_txcolombe_ed25519,
    "aiosmtplib": run_aiosmtplib,
    "smtplib": run_smtplib,
    "twisted-mail": run_twisted_mail,
    "twisted-mail-nodelay": run_twisted_mail_nodelay,
}


def client_main(argv: list[str]) -> int:
    name, scenario, port, count, budget = argv
    try:
        done, seconds, cpu = RUNNERS[name](scenario, int(port), int(count), float(budget))
    except Exception as error:
        # Twisted's gatherResults wraps the first failure in a FirstError.
        sub_failure = getattr(error, "subFailure", None)
        cause = sub_failure.value if sub_failure is not None else error
        print(json.dumps({"error": f"{type(cause).__name__}: {cause}"}), flush=True)
        return 1
    print(json.dumps({"messages": done, "seconds": seconds, "cpu": cpu}), flush=True)
    return 0


# -- the parent ---------------------------------------------------------------------


@dataclass
class Result:
    client: str
    asked: int
    messages: int = 0
    seconds: float = 0.0
    error: str | None = None

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 and not self.error else 0.0


def measure(
    name: str, scenario: str, port: int, count: int, budget: float, timeout: float
) -> Result:
    args = [sys.executable, __file__, "client", name, scenario, str(port), str(count), str(budget)]
    result = Result(name, count)
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        result.error = f"killed after {timeout:.0f} s"
        return result
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    report = json.loads(lines[-1]) if lines else {}
    if out.returncode != 0 or "messages" not in report:
        last = (out.stderr.strip().splitlines() or [f"exit status {out.returncode}"])[-1]
        result.error = f"failed: {report.get('error', last)[:300]}"
        return result
    result.messages, result.seconds = int(report["messages"]), float(report["seconds"])
    return result


def measure_smtp_source(
    scenario: str, port: int, count: int, message_file: Path, timeout: float
) -> Result:
    args = [SMTP_SOURCE, "-m", str(count), "-F", str(message_file), "-M", DOMAIN]
    args += ["-f", SENDER, "-t", RECIPIENT]
    if scenario != "new":
        args.append("-d")
    if scenario == "concurrent":
        args += ["-s", str(CONNECTIONS)]
    result = Result("smtp-source", count)
    start = time.perf_counter()
    try:
        out = subprocess.run(
            [*args, f"{HOST}:{port}"], capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        result.error = f"killed after {timeout:.0f} s"
        return result
    result.seconds = time.perf_counter() - start
    if out.returncode != 0:
        result.error = f"failed: {out.stderr.strip()[-200:]}"
    else:
        result.messages = count
    return result


class Sink:
    """Postfix's smtp-sink on a free 127.0.0.1 port, stopped on exit."""

    def __init__(self) -> None:
        self.port = free_port()
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        # PIPELINING is advertised unless -p is given.
        self.process = subprocess.Popen(
            [SMTP_SINK, *user, f"{HOST}:{self.port}", str(SINK_BACKLOG)]
        )

    def __enter__(self) -> Sink:
        try:
            deadline = time.monotonic() + 10
            while (ehlo := self._ehlo()) is None:
                if self.process.poll() is not None:
                    raise RuntimeError(f"smtp-sink exited with status {self.process.returncode}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"smtp-sink does not answer on {HOST}:{self.port}")
                time.sleep(0.05)
            if b"PIPELINING" not in ehlo.upper():
                raise RuntimeError(f"smtp-sink does not advertise PIPELINING: {ehlo!r}")
            return self
        except BaseException:
            self.stop()
            raise

    def _ehlo(self) -> bytes | None:
        """smtp-sink's EHLO reply, or None while it is not listening yet."""
        try:
            with socket.create_connection((HOST, self.port), timeout=2) as probe:
                stream = probe.makefile("rb")
                if not stream.readline().startswith(b"220"):
                    return None
                probe.sendall(b"EHLO probe.example.com\r\n")
                lines = [stream.readline()]
                while lines[-1][3:4] == b"-":
                    lines.append(stream.readline())
                probe.sendall(b"QUIT\r\n")
                stream.readline()
                return b"".join(lines)
        except OSError:
            return None

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def version_of(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def postfix_version() -> str:
    for command in (
        ["postconf", "-h", "mail_version"],
        ["dpkg-query", "-W", "-f=${Version}", "postfix"],
    ):
        try:
            out = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
        except OSError:
            continue
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    return "unknown"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def print_header(port: int) -> None:
    nproc = len(os.sched_getaffinity(0))
    python = platform.python_version()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"machine: nproc={nproc}, {cpu_model()}, {platform.system()} {platform.release()}; "
        f"load average at start {load}"
    )
    print(
        f"versions: txcolombe {version_of('txcolombe')}, aiosmtplib {version_of('aiosmtplib')}, "
        f"smtplib (Python {python}), twisted.mail.smtp (Twisted {version_of('twisted')}), "
        f"smtp-source (Postfix {postfix_version()})"
    )
    print(
        f"server: smtp-sink on {HOST}:{port} (PIPELINING, backlog {SINK_BACKLOG}); "
        f"message: {len(MESSAGE)} octets, headers and body; plaintext"
    )


def print_table(scenario: str, count: int, repeat: int, runs: dict[str, list[Result]]) -> None:
    """The best run of each client, its slowest run, and txcolombe's ratios."""
    best = {client: pick_best(results) for client, results in runs.items()}
    of = f", best of {repeat} runs" if repeat > 1 else ""
    print(f"\n{scenario}: {count} {SCENARIOS[scenario]}{of}")
    print(f"{'client':<22}{'messages':>10}{'seconds':>10}{'msg/s':>10}{'slowest':>10}")
    for client, r in best.items():
        if r.error:
            print(f"{client:<22}  {r.error}")
            continue
        slowest = min(run.rate for run in runs[client])
        note = "  (time budget reached)" if r.messages < r.asked else ""
        note += "  (1 run)" if len(runs[client]) < repeat else ""
        print(
            f"{client:<22}{r.messages:>10}{r.seconds:>10.3f}{r.rate:>10.1f}{slowest:>10.1f}{note}"
        )
    for name in ("txcolombe", "txcolombe-queued"):
        ours = best.get(name)
        if ours is None or not ours.rate:
            continue
        for client, r in best.items():
            if not client.startswith("txcolombe") and r.rate:
                print(f"{name} / {client}: {ours.rate / r.rate:.2f}x")


def pick_best(results: list[Result]) -> Result:
    """A failed run if any (failures are not hidden), else the fastest one."""
    failed = [r for r in results if r.error]
    return failed[0] if failed else max(results, key=lambda r: r.rate)


def available(client: str) -> bool:
    """Whether ``client`` can run here; says why not."""
    module = CLIENT_MODULES.get(client)
    if module is not None and importlib.util.find_spec(module) is None:
        print(f"skipping {client}: {module} is not installed in {sys.executable}")
        return False
    if client == "smtp-source" and not os.access(SMTP_SOURCE, os.X_OK):
        print(f"skipping smtp-source: no {SMTP_SOURCE} (Debian package postfix)")
        return False
    return True


def names(value: str, known: tuple[str, ...] | dict[str, Any]) -> list[str]:
    chosen = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in known]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown: {', '.join(unknown)}; known: {', '.join(known)}"
        )
    return chosen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", type=lambda v: names(v, SCENARIOS), default=list(SCENARIOS))
    parser.add_argument("--clients", type=lambda v: names(v, CLIENTS), default=list(CLIENTS))
    parser.add_argument("--n", type=int, help="messages per scenario (concurrent: in all)")
    parser.add_argument("--quick", action="store_true", help="small counts, one run: a smoke run")
    parser.add_argument(
        "--repeat", type=int, help="runs per client, interleaved; the best counts (default 3)"
    )
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="kill a client after this many seconds"
    )
    options = parser.parse_args()
    if not os.access(SMTP_SINK, os.X_OK):
        print(f"no {SMTP_SINK}: install Debian's postfix package", file=sys.stderr)
        return 2
    clients = [client for client in options.clients if available(client)]
    repeat = options.repeat or (1 if options.quick else 3)
    budget = options.timeout / 2
    slow_budget = dict.fromkeys(SLOW_BUDGET, QUICK_SLOW_BUDGET) if options.quick else SLOW_BUDGET
    failed = False
    with tempfile.TemporaryDirectory(prefix="txc-bench-") as tmp, Sink() as sink:
        message_file = Path(tmp) / "message.txt"
        message_file.write_bytes(MESSAGE_LF)
        print_header(sink.port)
        for scenario in options.scenarios:
            count = options.n or (QUICK_N if options.quick else DEFAULT_N)[scenario]
            runs: dict[str, list[Result]] = {
                client: [] for client in clients if scenario in SCENARIOS_OF.get(client, SCENARIOS)
            }
            for round_ in range(repeat):
                print(f"  {scenario}: round {round_ + 1} of {repeat}", file=sys.stderr, flush=True)
                for client in runs:
                    if round_ and client in SLOW_BUDGET:
                        continue  # its rate is set by a 40 ms timer: once is enough
                    if client == "smtp-source":
                        result = measure_smtp_source(
                            scenario, sink.port, count, message_file, options.timeout
                        )
                    else:
                        client_budget = min(slow_budget.get(client, budget), budget)
                        result = measure(
                            client, scenario, sink.port, count, client_budget, options.timeout
                        )
                    failed |= result.error is not None
                    runs[client].append(result)
            print_table(scenario, count, repeat, runs)
            sys.stdout.flush()
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "client":
        sys.exit(client_main(sys.argv[2:]))
    else:
        sys.exit(main())
