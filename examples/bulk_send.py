#!/usr/bin/env python3
"""Send one message to each of many recipients over one connection, with progress.

    python examples/bulk_send.py --server smtp.example.com --port 587 \\
        --user alice --password-file ~/.smtp-password \\
        --from news@example.com --recipients list.txt --subject "News"

Connects, upgrades to TLS and authenticates once (a ``Session``), then sends
each message as its own transaction: a refused recipient does not stop the
others. Up to ``--window`` messages are queued at once; with PIPELINING,
each message's commands leave together with the end of the one before. A
progress line is drawn on stderr; the summary goes to stdout. If the
connection drops, it connects again and goes on (messages that may have been
delivered are not sent twice).
"""

from __future__ import annotations

import argparse
import sys
import time
from email.message import EmailMessage
from pathlib import Path
from typing import Any, TextIO

from twisted.internet.defer import DeferredLock, DeferredSemaphore, gatherResults
from twisted.internet.ssl import Certificate
from twisted.internet.task import react

import txcolombe
from txcolombe import Authentication, ConnectionFailed, Session, SMTPError, TLSMode


class Progress:
    """A one-line progress bar, redrawn in place on a terminal."""

    def __init__(self, total: int, stream: TextIO = sys.stderr, width: int = 30) -> None:
        self.total, self.stream, self.width = total, stream, width
        self.sent = self.refused = self.failed = 0
        self.started = time.monotonic()

    @property
    def done(self) -> int:
        return self.sent + self.refused + self.failed

    def draw(self) -> None:
        filled = self.width * self.done // max(self.total, 1)
        bar = "#" * filled + "." * (self.width - filled)
        line = (
            f"[{bar}] {self.done}/{self.total} sent {self.sent} "
            f"refused {self.refused} failed {self.failed}"
        )
        end = "\r" if self.stream.isatty() and self.done < self.total else "\n"
        self.stream.write(line + end)
        self.stream.flush()

    def summary(self) -> str:
        seconds = time.monotonic() - self.started
        return (
            f"{self.sent} sent, {self.refused} refused, {self.failed} failed, "
            f"{self.total} in all, in {seconds:.1f} s"
        )


def message_for(args: argparse.Namespace, recipient: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = args.sender
    message["To"] = recipient
    message["Subject"] = args.subject
    message.set_content(f"Hello {recipient},\n\n{args.text}\n")
    return message


class Sender:
    """One session at a time; a new one when the connection is gone."""

    def __init__(self, reactor: Any, args: argparse.Namespace) -> None:
        self.args = args
        self.options: dict[str, Any] = {
            "reactor": reactor,
            "port": args.port,
            "domain": args.ehlo,
            "tls_mode": TLSMode.IMPLICIT if args.implicit_tls else TLSMode.OPPORTUNISTIC,
        }
        if args.ca_file:
            self.options["trust_root"] = Certificate.loadPEM(args.ca_file.read_bytes())
        if args.user:
            password = args.password_file.read_text().strip()
            self.options["authentication"] = Authentication(args.user, password)
            if not args.implicit_tls:
                self.options["tls_mode"] = TLSMode.REQUIRED
        self.session: Session | None = None
        self.connections = 0
        self._lock = DeferredLock()  # one connection attempt at a time

    async def current(self) -> Session:
        await self._lock.acquire()
        try:
            if self.session is None or not self.session.usable:
                self.session = await txcolombe.connect(self.args.server, **self.options)
                self.connections += 1
            return self.session
        finally:
            self._lock.release()

    async def send(self, recipient: str, progress: Progress) -> None:
        message = message_for(self.args, recipient)
        for attempt in range(2):
            try:
                session = await self.current()
                await session.send(self.args.sender, [recipient], message)
            except txcolombe.RecipientsRefused as error:
                progress.refused += 1
                print(f"refused {recipient}: {error.refused[recipient]}", file=sys.stderr)
            except ConnectionFailed as error:
                if attempt == 0 and not error.maybe_delivered:
                    continue  # the connection went away: once more on a new one
                progress.failed += 1
                print(f"failed {recipient}: {error}", file=sys.stderr)
            except SMTPError as error:
                progress.failed += 1
                print(f"failed {recipient}: {error}", file=sys.stderr)
            else:
                progress.sent += 1
            break
        progress.draw()

    async def close(self) -> None:
        if self.session is not None and self.session.usable:
            await self.session.quit()


def recipients_of(args: argparse.Namespace) -> list[str]:
    if args.recipients:
        lines = args.recipients.read_text().splitlines()
        return [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    return [f"user{n}@{args.domain}" for n in range(1, args.count + 1)]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--server", required=True)
    parser.add_argument("--port", type=int, default=587)
    parser.add_argument("--implicit-tls", action="store_true", help="TLS from the first byte")
    parser.add_argument("--user")
    parser.add_argument("--password-file", type=Path)
    parser.add_argument("--ca-file", type=Path, help="trust this CA (PEM) for the server")
    parser.add_argument("--ehlo", help="our name in EHLO (default: this host's FQDN)")
    parser.add_argument("--from", dest="sender", required=True)
    parser.add_argument("--subject", default="News")
    parser.add_argument("--text", default="Here is what is new this month.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--recipients", type=Path, help="a file: one address a line")
    source.add_argument("--count", type=int, help="or send to user1..userN@--domain")
    parser.add_argument("--domain", default="example.org")
    parser.add_argument("--window", type=int, default=10, help="messages queued at once")
    args = parser.parse_args(argv)
    if args.user and not args.password_file:
        parser.error("--user needs --password-file")
    return args


async def main(reactor: Any, *argv: str) -> None:
    args = parse(list(argv))
    recipients = recipients_of(args)
    progress = Progress(len(recipients))
    sender = Sender(reactor, args)
    window = DeferredSemaphore(args.window)
    try:
        await gatherResults(
            [window.run(sender.send, rcpt, progress) for rcpt in recipients], consumeErrors=True
        )
    finally:
        await sender.close()
    print(f"{progress.summary()}, over {sender.connections} connection(s)")
    if progress.failed:
        raise SystemExit(1)


if __name__ == "__main__":
    react(main, sys.argv[1:])
