#!/usr/bin/env python3
"""txcolombe's main job on embedded defaults: real sends to a real SMTP server.

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
   checks it is what was sent, stops the servers and exits 0.

Any failure prints one clear line (``demo failed: ...``) and exits non-zero.
Everything runs on loopback with short timeouts and an overall deadline,
and the servers are stopped in a ``finally``, so the demo always ends.

TODO(lead): once the project's own relay exists, add a third leg that sends
through it, so the demo shows the whole path.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import sys
import tempfile
import traceback
from email.message import EmailMessage
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from twisted.internet._sslverify import IOpenSSLTrustRoot  # noqa: E402
from twisted.internet.ssl import Certificate  # noqa: E402
from twisted.internet.task import react  # noqa: E402

import txcolombe  # noqa: E402
from tools.peers.aiosmtpd_peer import AiosmtpdPeer, Received  # noqa: E402
from txcolombe.cli import describe_error, start_logging  # noqa: E402

USER, PASSWORD = "alice", "s3cret"
HOST = "127.0.0.1"
CLIENT_NAME = "client.example.com"
#: Short per-step timeouts: on loopback every answer is immediate.
TIMEOUTS = txcolombe.Timeouts(
    connect=5, greeting=10, command=10, mail=10, rcpt=10,
    data_start=10, data_block=10, data_end=10, quit=5,
)  # fmt: skip
#: The whole demo must be over by then.
DEADLINE = 60.0


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


class DemoFailed(Exception):
    pass


async def run(reactor: Any, peer: AiosmtpdPeer) -> None:
    watchdog = reactor.callLater(DEADLINE, _too_late)
    try:
        await _sends(reactor, peer)
    finally:
        if watchdog.active():
            watchdog.cancel()


def _too_late() -> None:
    say(f"demo failed: not done after {DEADLINE:.0f} seconds")
    from twisted.internet import reactor

    reactor.stop()


async def _sends(reactor: Any, peer: AiosmtpdPeer) -> None:
    # A Certificate is an IOpenSSLTrustRoot (Twisted's stubs do not say so).
    demo_ca: Any = Certificate.loadPEM(peer.ca_pem.read_bytes())
    trust_root = cast(IOpenSSLTrustRoot, demo_ca)
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
    sent_a = body_a.as_bytes(policy=body_a.policy.clone(linesep="\r\n"))
    expected = [
        ("alice@example.com", recipients_a[:2], sent_a, receipt_a),
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Send two messages with txcolombe to aiosmtpd on loopback "
        "and show what arrived."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show the SMTP conversation")
    args = parser.parse_args(argv)
    start_logging(args.verbose, out=sys.stdout, indent="      ")
    # aiosmtpd warns about its own use of a deprecated attribute; not ours.
    logging.getLogger("mail.log").setLevel(logging.ERROR)

    outcome: list[BaseException | None] = []
    with tempfile.TemporaryDirectory(prefix="txcolombe-demo-") as workdir:
        step(f"making a throw-away CA and certificate for localhost in {workdir}")
        peer = AiosmtpdPeer(Path(workdir), users={USER: PASSWORD})
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
                    await run(reactor, peer)
                    outcome.append(None)
                except BaseException as error:
                    outcome.append(error)

            with contextlib.suppress(SystemExit):  # react() always exits
                react(job)
        finally:
            step("stopping the servers")
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
    step("done: both messages were delivered and arrived intact")
    return 0


if __name__ == "__main__":
    sys.exit(main())
