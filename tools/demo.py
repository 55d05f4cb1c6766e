#!/usr/bin/env python3
"""txcolombe's main job on embedded defaults: real sends to real SMTP servers.

Run it with no arguments (``python3 dev.py demo`` does, after setting up
``.venv``)::

    python tools/demo.py            # add --verbose to see the SMTP conversation

It needs nothing from the outside world. It

1. makes a throw-away CA with trustme in a temporary directory and starts
   :class:`~tools.peers.aiosmtpd_peer.AiosmtpdPeer` on 127.0.0.1, on two free
   ports: one offering STARTTLS (and AUTH only under TLS), one speaking
   implicit TLS; the only user is ``alice`` with password ``s3cret``;
2. (a) sends a message with :func:`txcolombe.sendmail` to the STARTTLS port:
   STARTTLS, the certificate verified against the demo CA, AUTH PLAIN; one
   of the three recipients is refused by the server, the two others get
   the message;
3. (b) sends a message with :func:`txcolombe.submit` to the implicit-TLS
   port with AUTH LOGIN, the body streamed from a binary file object;
4. prints each :class:`~txcolombe.Receipt` (per-recipient replies, the
   final reply, queue id, TLS version and cipher), then exactly what the
   server received (envelope, TLS, authenticated user, the message bytes),
   and checks it is what was sent;
5. starts our own relay, ``twistd -n smtprelay``, as a child process on two
   more free loopback ports (``tcp:``, plain with STARTTLS, and ``ssl:``,
   implicit TLS) with a certificate from the demo CA, one AUTH user made with
   ``python -m txcolombe.relay.passwords --stdin``, loopback *not* trusted to
   relay without AUTH, and aiosmtpd as its smarthost (STARTTLS, the demo CA,
   AUTH as ``alice``);
6. (c) sends with :func:`txcolombe.sendmail` to the relay's STARTTLS port and
   (d) with :func:`txcolombe.submit` to its implicit-TLS port (AUTH LOGIN),
   prints the relay's receipts (its queue ids), waits (bounded) until aiosmtpd
   has received both relayed messages and the relay has logged them
   delivered, prints what arrived and the relay's log lines for them, and
   checks that each arrived byte for byte as sent, with only the relay's
   ``Received:`` header (naming the queue id) added on top;
7. stops the relay (SIGTERM, SIGKILL after a timeout) and aiosmtpd, removes
   the temporary directory and exits 0.

Any failure prints one clear line (``demo failed: ...``) and exits non-zero.
Everything runs on loopback with short timeouts and an overall deadline,
and the servers are stopped in a ``finally``, so the demo always ends.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from email.message import EmailMessage
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from twisted.internet.ssl import Certificate  # noqa: E402
from twisted.internet.task import deferLater, react  # noqa: E402
from twisted.internet.threads import deferToThread  # noqa: E402

import txcolombe  # noqa: E402
from tools.peers.aiosmtpd_peer import AiosmtpdPeer, Received, free_port  # noqa: E402
from tools.peers.relay_process import RelayProcess, port_open, wait_for  # noqa: E402
from txcolombe.cli import describe_error, start_logging  # noqa: E402
from txcolombe.client.connect import IOpenSSLTrustRoot  # noqa: E402

USER, PASSWORD = "alice", "s3cret"
#: The relay's own AUTH user, hashed into its users file by the password tool.
RELAY_USER, RELAY_PASSWORD = "app", "relay-pw-42"
#: ``tools.peers.relay_process.RelayProcess`` starts the relay with this name.
RELAY_HOSTNAME = "relay.test"
HOST = "127.0.0.1"
CLIENT_NAME = "client.example.com"
#: Short per-step timeouts: on loopback every answer is immediate.
TIMEOUTS = txcolombe.Timeouts(
    connect=5, greeting=10, command=10, mail=10, rcpt=10,
    data_start=10, data_block=10, data_end=10, quit=5,
)  # fmt: skip
#: The whole demo (before stopping the servers) must be over by then.
DEADLINE = 45.0
#: Bounds on the relay: listening, forwarding both messages, stopping.
RELAY_START_TIMEOUT = 15.0
RELAY_DELIVERY_TIMEOUT = 30.0
RELAY_STOP_TIMEOUT = 12.0  # it waits up to 10 s for deliveries in flight


def say(text: str = "") -> None:
    print(text, flush=True)


def step(text: str) -> None:
    say(f"==> {text}")


def show_receipt(receipt: txcolombe.Receipt) -> None:
    for recipient, reply in receipt.accepted.items():
        say(f"    accepted  <{recipient}>: {reply}")
    for recipient, reply in receipt.refused.items():
        say(f"    refused   <{recipient}>: {reply}")
    say(f"    final reply: {receipt.reply}")
    say(f"    queue id:    {receipt.queue_id}")
    if receipt.tls is None:
        say("    TLS:         none")
    else:
        how = "implicit TLS" if receipt.tls.implicit else "STARTTLS"
        say(f"    TLS:         {receipt.tls.version}, {receipt.tls.cipher} ({how})")


def show_received(number: int, message: Received) -> None:
    say(f"    message {number}:")
    say(f"      MAIL FROM: <{message.sender}>")
    for recipient in message.recipients:
        say(f"      RCPT TO:   <{recipient}>")
    say(f"      TLS: {'yes' if message.tls else 'no'}, authenticated as: {message.login or '-'}")
    if message.mail_options:
        say(f"      MAIL parameters: {' '.join(message.mail_options)}")
    say(f"      {len(message.data)} octets, exactly:")
    lines = message.data.split(b"\r\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the data ends with CRLF
    for line in lines:
        say(f"      | {line.decode('utf-8', 'backslashreplace')}")


def crlf_bytes(message: EmailMessage) -> bytes:
    return message.as_bytes(policy=message.policy.clone(linesep="\r\n"))


def message_a() -> EmailMessage:
    message = EmailMessage()
    message["From"] = "Alice <alice@example.com>"
    message["To"] = "Bob <bob@example.org>, Carol <carol@example.org>"
    message["Subject"] = "txcolombe demo (a): sendmail over STARTTLS"
    message["Message-ID"] = "<demo-a@client.example.com>"
    message.set_content(
        "Hello Bob and Carol,\n\n"
        "this went through STARTTLS and AUTH PLAIN.\n"
        ".A line starting with a dot survives dot-stuffing.\n"
    )
    return message


MESSAGE_B = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: Dave <dave@example.net>\r\n"
    b"Subject: txcolombe demo (b): submit over implicit TLS\r\n"
    b"Message-ID: <demo-b@client.example.com>\r\n"
    b"\r\n"
    b"Hello Dave,\r\n"
    b"\r\n"
    b"this went through implicit TLS and AUTH LOGIN, streamed from a file.\r\n"
    b".\r\n"
    b"(The line above is a lone dot.)\r\n"
)


def message_c() -> EmailMessage:
    message = EmailMessage()
    message["From"] = "Alice <alice@example.com>"
    message["To"] = "Bob <bob@example.org>, Carol <carol@example.org>"
    message["Subject"] = "txcolombe demo (c): sendmail through our relay"
    message["Message-ID"] = "<demo-c@client.example.com>"
    message.set_content(
        "Hello Bob and Carol,\n\n"
        "this went to twistd smtprelay over STARTTLS with AUTH, was spooled,\n"
        "and was forwarded to the smarthost over STARTTLS with AUTH.\n"
        ".A line starting with a dot survives dot-stuffing twice.\n"
    )
    return message


MESSAGE_D = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: Dave <dave@example.net>\r\n"
    b"Subject: txcolombe demo (d): submit through our relay over implicit TLS\r\n"
    b"Message-ID: <demo-d@client.example.com>\r\n"
    b"\r\n"
    b"Hello Dave,\r\n"
    b"\r\n"
    b"this went to twistd smtprelay over implicit TLS with AUTH LOGIN.\r\n"
    b".\r\n"
    b"(The line above is a lone dot, here too.)\r\n"
)


class DemoFailed(Exception):
    pass


class DemoRelay:
    """Our relay, ``twistd -n smtprelay``, as a child process on loopback.

    Everything it needs and writes (certificate, key, users file, smarthost
    credentials, spool, log) lives in ``workdir/relay``.
    """

    def __init__(self, workdir: Path, peer: AiosmtpdPeer) -> None:
        self.workdir = workdir
        self.dir = workdir / "relay"
        self.peer = peer
        self.port = free_port()
        self.tls_port = free_port()
        while self.tls_port == self.port:
            self.tls_port = free_port()
        self.cert = self.dir / "cert.pem"
        self.key = self.dir / "key.pem"
        self.users = self.dir / "users"
        self.credentials = self.dir / "smarthost.cred"
        self.process: RelayProcess | None = None

    def options(self) -> list[str]:
        return [
            f"--listen=ssl:port={self.tls_port}:interface={HOST}",
            f"--tls-cert={self.cert}",
            f"--tls-key={self.key}",
            f"--users={self.users}",
            # Loopback is trusted by default; here relaying needs AUTH too.
            "--relay-network=192.0.2.0/24",
            f"--smarthost={HOST}:{self.peer.starttls_port}",
            "--smarthost-tls=starttls",
            f"--smarthost-ca={self.peer.ca_pem}",
            f"--smarthost-auth={self.credentials}",
            "--min-backoff=1",  # should a first try fail, retry soon
        ]

    def command(self) -> list[str]:
        return RelayProcess(self.dir, self.port, self.options()).command()

    def prepare(self) -> None:
        """The certificate, the users file and the smarthost credentials."""
        self.dir.mkdir(mode=0o700)
        cert = self.peer.ca.issue_cert("localhost", HOST)
        self.cert.write_bytes(b"".join(pem.bytes() for pem in cert.cert_chain_pems))
        fd = os.open(self.key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as key:
            key.write(cert.private_key_pem.bytes())
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        made = subprocess.run(
            [sys.executable, "-m", "txcolombe.relay.passwords", "--stdin",
             str(self.users), RELAY_USER],
            input=f"{RELAY_PASSWORD}\n", capture_output=True, text=True,
            timeout=30, cwd=ROOT, env=env, check=False,
        )  # fmt: skip
        if made.returncode != 0 or not self.users.exists():
            raise DemoFailed(
                f"the password tool exited with {made.returncode}: "
                f"{(made.stderr or made.stdout).strip()}"
            )
        fd = os.open(self.credentials, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as credentials:
            credentials.write(f"{USER}:{PASSWORD}\n")

    def start(self) -> None:
        """Start the relay and wait until both ports accept connections."""
        self.process = RelayProcess(self.dir, self.port, self.options())
        try:
            self.process.start(timeout=RELAY_START_TIMEOUT)
            wait_for(lambda: port_open(self.tls_port), RELAY_START_TIMEOUT, "the TLS port")
        except (RuntimeError, TimeoutError) as error:
            raise DemoFailed(f"cannot start the relay: {error}{self.log_tail()}") from error

    def stop(self) -> str:
        """SIGTERM, then SIGKILL if it is not gone in time; how it ended."""
        process = self.process.proc if self.process is not None else None
        if process is None:
            return "never started"
        if process.poll() is not None:
            return f"had already exited with status {process.returncode}"
        process.terminate()
        try:
            process.wait(RELAY_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
            return f"did not stop within {RELAY_STOP_TIMEOUT:.0f} s of SIGTERM; killed"
        clean = "Server Shut Down." in self.log_lines()
        if process.returncode in (0, -signal.SIGTERM) and clean:
            # twistd re-raises the signal that stopped it: -15 is a clean end.
            return f"shut down cleanly on SIGTERM (exit status {process.returncode})"
        return f"exited with status {process.returncode} on SIGTERM, not logging a clean shutdown"

    def log_lines(self) -> list[str]:
        """The relay's log, each line without twistd's timestamp."""
        text = self.process.log_text() if self.process is not None else ""
        return [line.split("] ", 1)[-1] for line in text.splitlines()]

    def log_troubles(self) -> list[str]:
        """Log lines at error level or above, and tracebacks."""
        text = self.process.log_text() if self.process is not None else ""
        marks = ("#error]", "#critical]", "#failure]", "Traceback", "Unhandled")
        return [line for line in text.splitlines() if any(mark in line for mark in marks)]

    def log_tail(self, count: int = 15) -> str:
        lines = self.log_lines()[-count:]
        if not lines:
            return " (its log is empty; twistd reports startup errors on standard error)"
        return "".join(f"\n    relay log| {line}" for line in lines)


async def run(reactor: Any, peer: AiosmtpdPeer, relay: DemoRelay) -> None:
    watchdog = reactor.callLater(DEADLINE, _too_late)
    try:
        await _direct_sends(reactor, peer)
        await _relayed_sends(reactor, peer, relay)
    finally:
        if watchdog.active():
            watchdog.cancel()


def _too_late() -> None:
    say(f"demo failed: not done after {DEADLINE:.0f} seconds")
    from twisted.internet import reactor

    reactor.stop()


def _trust_root(peer: AiosmtpdPeer) -> IOpenSSLTrustRoot:
    # A Certificate is an IOpenSSLTrustRoot (Twisted's stubs do not say so).
    demo_ca: Any = Certificate.loadPEM(peer.ca_pem.read_bytes())
    return cast(IOpenSSLTrustRoot, demo_ca)


async def _direct_sends(reactor: Any, peer: AiosmtpdPeer) -> None:
    trust_root = _trust_root(peer)
    alice = txcolombe.Authentication(USER, PASSWORD)  # PLAIN is the default

    body_a = message_a()
    recipients_a = ["bob@example.org", "carol@example.org", "refuse-me@example.org"]
    step(
        f"(a) txcolombe.sendmail() to {HOST} port {peer.starttls_port}: "
        f"STARTTLS, certificate checked against the demo CA, AUTH PLAIN as {USER}"
    )
    say(f"    MAIL FROM <alice@example.com>, RCPT TO {', '.join(recipients_a)}")
    say("    (the server refuses any recipient whose name starts with 'refuse')")
    try:
        receipt_a = await txcolombe.sendmail(
            HOST, "alice@example.com", recipients_a, body_a,
            port=peer.starttls_port, domain=CLIENT_NAME, trust_root=trust_root,
            authentication=alice, timeouts=TIMEOUTS, reactor=reactor,
        )  # fmt: skip
    except txcolombe.SMTPError as error:
        raise DemoFailed(f"(a) sendmail: {describe_error(error)}") from error
    say("    delivered; the receipt:")
    show_receipt(receipt_a)

    step(
        f"(b) txcolombe.submit() to {HOST} port {peer.tls_port}: "
        f"implicit TLS, AUTH LOGIN as {USER}, body streamed from a binary file"
    )
    say("    MAIL FROM <alice@example.com>, RCPT TO dave@example.net")
    try:
        receipt_b = await txcolombe.submit(
            HOST, "alice@example.com", ["dave@example.net"], io.BytesIO(MESSAGE_B),
            port=peer.tls_port, domain=CLIENT_NAME, trust_root=trust_root,
            authentication=txcolombe.Authentication(USER, PASSWORD, txcolombe.Mechanism.LOGIN),
            timeouts=TIMEOUTS, reactor=reactor,
        )  # fmt: skip
    except txcolombe.SMTPError as error:
        raise DemoFailed(f"(b) submit: {describe_error(error)}") from error
    say("    delivered; the receipt:")
    show_receipt(receipt_b)

    step("what the server received")
    with peer.lock:
        received = list(peer.received)
    for number, message in enumerate(received, 1):
        show_received(number, message)

    step("checking that the server got exactly what was sent")
    expected = [
        ("alice@example.com", recipients_a[:2], crlf_bytes(body_a), receipt_a),
        ("alice@example.com", ["dave@example.net"], MESSAGE_B, receipt_b),
    ]
    if len(received) != len(expected):
        raise DemoFailed(f"the server received {len(received)} messages, not {len(expected)}")
    for number, (message, (sender, rcpts, data, receipt)) in enumerate(
        zip(received, expected, strict=True), 1
    ):
        problems = []
        if message.sender != sender or message.recipients != rcpts:
            problems.append(f"envelope {message.sender} -> {message.recipients}")
        if message.data != data:
            problems.append("the message bytes differ from those sent")
        if not message.tls or message.login != USER:
            problems.append(f"TLS {message.tls}, login {message.login}")
        if receipt.queue_id != f"AIO{number:05d}":
            problems.append(f"queue id {receipt.queue_id}")
        if problems:
            raise DemoFailed(f"message {number}: " + "; ".join(problems))
        say(f"    message {number}: envelope, TLS, login and all {len(data)} octets match")


def _show_command(command: Sequence[str], workdir: Path) -> None:
    say(f"    ($WORK is {workdir})")
    shown = [arg.replace(str(workdir), "$WORK") for arg in command]
    program = Path(shown[0]).name
    start = shown.index("smtprelay")
    say(f"    {' '.join([program, *shown[1 : start + 1]])} \\")
    options = shown[start + 1 :]
    for number, option in enumerate(options):
        more = " \\" if number < len(options) - 1 else ""
        say(f"        {option}{more}")


def _start_relay(relay: DemoRelay) -> None:
    """Blocking: runs in a thread."""
    relay.prepare()
    say(
        f"    certificate for localhost/{HOST} from the demo CA; AUTH user "
        f"{RELAY_USER}/{RELAY_PASSWORD} hashed into $WORK/relay/users by"
    )
    say(f"    `python -m txcolombe.relay.passwords --stdin $WORK/relay/users {RELAY_USER}`")
    _show_command(relay.command(), relay.workdir)
    started = time.monotonic()
    relay.start()
    say(f"    listening after {time.monotonic() - started:.2f} s")


def split_received(data: bytes) -> tuple[bytes, bytes]:
    """The first (folded) header field, and the rest."""
    end = data.find(b"\r\n")
    while end >= 0 and data[end + 2 : end + 3] in (b"\t", b" "):
        end = data.find(b"\r\n", end + 2)
    if end < 0:
        return b"", data
    return data[: end + 2], data[end + 2 :]


def _arrivals(peer: AiosmtpdPeer, message_id: bytes) -> list[tuple[int, Received]]:
    with peer.lock:
        received = list(peer.received)
    return [
        (number, message)
        for number, message in enumerate(received, 1)
        if b"\r\nMessage-ID: " + message_id + b"\r\n" in message.data
    ]


def _delivered_lines(relay: DemoRelay, queue_ids: Sequence[str]) -> list[str]:
    return [
        line
        for line in relay.log_lines()
        if any(line.startswith(f"{queue_id}: ") for queue_id in queue_ids)
    ]


async def _relayed_sends(reactor: Any, peer: AiosmtpdPeer, relay: DemoRelay) -> None:
    trust_root = _trust_root(peer)
    step(
        f"starting our relay: twistd -n smtprelay on {HOST} port {relay.port} "
        f"(plain + STARTTLS) and port {relay.tls_port} (implicit TLS), "
        f"smarthost aiosmtpd port {peer.starttls_port} (STARTTLS, AUTH as {USER})"
    )
    await deferToThread(_start_relay, relay)

    body_c = message_c()
    recipients_c = ["bob@example.org", "carol@example.org"]
    step(
        f"(c) txcolombe.sendmail() to our relay, {HOST} port {relay.port}: "
        f"STARTTLS, certificate checked against the demo CA, AUTH as {RELAY_USER}"
    )
    say(f"    MAIL FROM <alice@example.com>, RCPT TO {', '.join(recipients_c)}")
    try:
        receipt_c = await txcolombe.sendmail(
            HOST, "alice@example.com", recipients_c, body_c,
            port=relay.port, domain=CLIENT_NAME, trust_root=trust_root,
            authentication=txcolombe.Authentication(RELAY_USER, RELAY_PASSWORD),
            timeouts=TIMEOUTS, reactor=reactor,
        )  # fmt: skip
    except txcolombe.SMTPError as error:
        raise DemoFailed(f"(c) sendmail to the relay: {describe_error(error)}") from error
    say("    spooled by the relay; the receipt:")
    show_receipt(receipt_c)

    recipients_d = ["dave@example.net"]
    step(
        f"(d) txcolombe.submit() to our relay, {HOST} port {relay.tls_port}: "
        f"implicit TLS, AUTH LOGIN as {RELAY_USER}, body streamed from a binary file"
    )
    say("    MAIL FROM <alice@example.com>, RCPT TO dave@example.net")
    try:
        receipt_d = await txcolombe.submit(
            HOST, "alice@example.com", recipients_d, io.BytesIO(MESSAGE_D),
            port=relay.tls_port, domain=CLIENT_NAME, trust_root=trust_root,
            authentication=txcolombe.Authentication(
                RELAY_USER, RELAY_PASSWORD, txcolombe.Mechanism.LOGIN
            ),
            timeouts=TIMEOUTS, reactor=reactor,
        )  # fmt: skip
    except txcolombe.SMTPError as error:
        raise DemoFailed(f"(d) submit to the relay: {describe_error(error)}") from error
    say("    spooled by the relay; the receipt:")
    show_receipt(receipt_d)

    expected = [
        ("(c)", b"<demo-c@client.example.com>", recipients_c, crlf_bytes(body_c), receipt_c),
        ("(d)", b"<demo-d@client.example.com>", recipients_d, MESSAGE_D, receipt_d),
    ]
    queue_ids: list[str] = []
    for label, _, _, _, receipt in expected:
        if receipt.reply.code != 250 or not receipt.queue_id:
            raise DemoFailed(f"{label}: the relay's reply names no queue id: {receipt.reply}")
        queue_ids.append(receipt.queue_id)
    deliveries = len(recipients_c) + len(recipients_d)

    step(
        f"waiting (at most {RELAY_DELIVERY_TIMEOUT:.0f} s) for the relay to forward both "
        "messages to aiosmtpd"
    )
    started = time.monotonic()

    def done() -> bool:
        arrived = all(_arrivals(peer, message_id) for _, message_id, _, _, _ in expected)
        logged = [line for line in _delivered_lines(relay, queue_ids) if "status=" in line]
        return arrived and sum("status=delivered" in line for line in logged) >= deliveries

    while not done():
        if relay.process is not None and relay.process.proc is not None:
            status = relay.process.proc.poll()
            if status is not None:
                raise DemoFailed(f"the relay exited with status {status}{relay.log_tail()}")
        if time.monotonic() - started > RELAY_DELIVERY_TIMEOUT:
            with peer.lock:
                count = len(peer.received)
            raise DemoFailed(
                f"after {RELAY_DELIVERY_TIMEOUT:.0f} s aiosmtpd holds {count} messages, "
                f"not the 4 expected, or the relay has not logged them delivered"
                f"{relay.log_tail()}"
            )
        await deferLater(reactor, 0.05, lambda: None)
    say(f"    both arrived, and the relay logged them delivered, after "
        f"{time.monotonic() - started:.2f} s")  # fmt: skip

    step("the relay's log lines for its two queue ids")
    for line in _delivered_lines(relay, queue_ids):
        say(f"    {line}")

    step("what aiosmtpd received from the relay")
    arrivals: list[tuple[int, Received]] = []
    for label, message_id, _, _, _ in expected:
        found = _arrivals(peer, message_id)
        if len(found) != 1:
            raise DemoFailed(f"{label}: aiosmtpd received it {len(found)} times, not once")
        arrivals.append(found[0])
    for number, message in arrivals:
        show_received(number, message)

    step("checking that each arrived exactly as sent, plus the relay's Received: header")
    for (number, message), (label, _, rcpts, data, receipt) in zip(arrivals, expected, strict=True):
        problems = []
        if message.sender != "alice@example.com" or message.recipients != rcpts:
            problems.append(f"envelope {message.sender} -> {message.recipients}")
        if not message.tls or message.login != USER:
            problems.append(f"relay to smarthost: TLS {message.tls}, login {message.login}")
        header, rest = split_received(message.data)
        if rest != data:
            problems.append("the message bytes below the first header differ from those sent")
        expected_start = f"Received: from {CLIENT_NAME} ([{HOST}])\r\n"
        by = f"\tby {RELAY_HOSTNAME} ".encode()  # after the TLS line, when TLS was used
        if not header.startswith(expected_start.encode()) or by not in header:
            problems.append(f"the first header is not the relay's Received: {header[:80]!r}")
        elif f" id {receipt.queue_id}".encode() not in header:
            problems.append(f"the Received: header does not name queue id {receipt.queue_id}")
        if message.data.count(b"Received:") != 1:
            problems.append(f"{message.data.count(b'Received:')} Received: headers, not 1")
        if problems:
            raise DemoFailed(f"message {number} {label}: " + "; ".join(problems))
        say(
            f"    message {number} {label}: envelope, TLS, login, the relay's Received: "
            f"header (id {receipt.queue_id}) and all {len(data)} octets sent match"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Send messages with txcolombe to aiosmtpd on loopback, directly and "
        "through our relay (twistd smtprelay), and show what arrived."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show the SMTP conversation")
    args = parser.parse_args(argv)
    start_logging(args.verbose, out=sys.stdout, indent="      ")
    # aiosmtpd warns about its own use of a deprecated attribute; not ours.
    logging.getLogger("mail.log").setLevel(logging.ERROR)

    outcome: list[BaseException | None] = []
    with tempfile.TemporaryDirectory(prefix="txcolombe-demo-") as tmp:
        workdir = Path(tmp)
        step(f"making a throw-away CA and certificate for localhost in {workdir}")
        peer = AiosmtpdPeer(workdir, users={USER: PASSWORD})
        relay = DemoRelay(workdir, peer)
        try:
            step(
                f"starting aiosmtpd on {HOST}: port {peer.starttls_port} (STARTTLS, AUTH "
                f"under TLS), port {peer.tls_port} (implicit TLS); user {USER}/{PASSWORD}"
            )
            try:
                peer.start()
            except Exception as error:
                say(f"demo failed: cannot start aiosmtpd: {type(error).__name__}: {error}")
                return 1

            async def job(reactor: Any) -> None:
                try:
                    await run(reactor, peer, relay)
                    outcome.append(None)
                except BaseException as error:
                    outcome.append(error)

            with contextlib.suppress(SystemExit):  # react() always exits
                react(job)
        finally:
            if relay.process is not None:
                step("stopping our relay (SIGTERM)")
                say(f"    the relay {relay.stop()}")
                troubles = relay.log_troubles()
                if troubles:
                    say(f"    the relay logged {len(troubles)} error lines (odd):")
                    for line in troubles[:20]:
                        say(f"    relay log| {line}")
            step("stopping aiosmtpd")
            peer.stop()

    if not outcome:
        return 1  # the watchdog fired and said why
    failure = outcome[0]
    if isinstance(failure, DemoFailed):
        say(f"demo failed: {failure}")
        return 1
    if failure is not None:
        if args.verbose:
            traceback.print_exception(failure, file=sys.stdout)
        say(f"demo failed: {type(failure).__name__}: {failure}")
        return 1
    step("done: all four messages, two of them through our relay, arrived intact")
    return 0


if __name__ == "__main__":
    sys.exit(main())
