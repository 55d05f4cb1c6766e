#!/usr/bin/env python3
"""Send a message with a file attached, built with the standard library's email package.

    python examples/send_attachment.py --server smtp.example.com --mode submit \\
        --from alice@example.com --to bob@example.org --subject "The report" \\
        --attach report.pdf --user alice --password-file ~/.smtp-password

``--mode submit`` (the default) hands the message to a submission server:
port 465 with TLS from the first byte, or ``--port 587`` with STARTTLS, with
``--user`` and a password (read from ``--password-file``, never from the
command line). ``--mode sendmail`` talks to a server on port 25, with
STARTTLS when it offers it. ``--ca-file`` trusts a private CA. Prints the
receipt, or the error and exits with status 1.
"""

from __future__ import annotations

import argparse
import mimetypes
import sys
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from twisted.internet.ssl import Certificate
from twisted.internet.task import react

import txcolombe
from txcolombe import Authentication, SMTPError


def build_message(args: argparse.Namespace) -> EmailMessage:
    message = EmailMessage()
    message["From"] = args.sender
    message["To"] = ", ".join(args.to)
    message["Subject"] = args.subject
    message.set_content(args.text)
    for path in map(Path, args.attach):
        kind, _ = mimetypes.guess_type(path.name)
        maintype, _, subtype = (kind or "application/octet-stream").partition("/")
        message.add_attachment(
            path.read_bytes(), maintype=maintype, subtype=subtype, filename=path.name
        )
    return message


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--server", required=True, help="the SMTP server's name or address")
    parser.add_argument("--port", type=int, help="default: 465 (submit) or 25 (sendmail)")
    parser.add_argument("--mode", choices=["submit", "sendmail"], default="submit")
    parser.add_argument("--starttls", action="store_true", help="submit: STARTTLS on any port")
    parser.add_argument("--from", dest="sender", required=True)
    parser.add_argument("--to", action="append", required=True, help="repeat for more")
    parser.add_argument("--subject", default="A file for you")
    parser.add_argument("--text", default="Please find the file attached.\n")
    parser.add_argument("--attach", action="append", default=[], help="a file; repeatable")
    parser.add_argument("--user")
    parser.add_argument("--password-file", type=Path)
    parser.add_argument("--ca-file", type=Path, help="trust this CA (PEM) for the server")
    parser.add_argument("--ehlo", help="our name in EHLO (default: this host's FQDN)")
    args = parser.parse_args(argv)
    if args.user and not args.password_file:
        parser.error("--user needs --password-file")
    return args


async def main(reactor: Any, *argv: str) -> None:
    args = parse(list(argv))
    options: dict[str, Any] = {"reactor": reactor, "domain": args.ehlo}
    if args.port:
        options["port"] = args.port
    if args.ca_file:
        options["trust_root"] = Certificate.loadPEM(args.ca_file.read_bytes())
    if args.user:
        password = args.password_file.read_text().strip()
        options["authentication"] = Authentication(args.user, password)
    message = build_message(args)
    try:
        if args.mode == "submit":
            send = txcolombe.submit(
                args.server, args.sender, args.to, message,
                starttls=True if args.starttls else None, **options,
            )  # fmt: skip
        else:
            send = txcolombe.sendmail(args.server, args.sender, args.to, message, **options)
        receipt = await send
    except SMTPError as error:
        print(f"not sent: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    for recipient, reply in receipt.accepted.items():
        print(f"accepted {recipient}: {reply.code}")
    for recipient, reply in receipt.refused.items():
        print(f"refused {recipient}: {reply.code} {reply.text}")
    tls = f"{receipt.tls.version}" if receipt.tls else "no TLS"
    print(f"queued as {receipt.queue_id} ({tls})")


if __name__ == "__main__":
    react(main, sys.argv[1:])
