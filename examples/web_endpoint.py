#!/usr/bin/env python3
"""A twisted.web resource that sends mail: ``POST /send`` with a JSON body.

    python examples/web_endpoint.py --listen tcp:8080:interface=127.0.0.1 \\
        --server smtp.example.com --port 587 --user app --password-file secret.txt \\
        --from app@example.com

    curl -d '{"to": "bob@example.org", "subject": "Hi", "text": "Hello."}' \\
        http://127.0.0.1:8080/send

Answers ``202`` with ``{"queued_as": ..., "accepted": [...], "refused": {...}}``
once the server has the message, ``400`` for a request it cannot use, ``502``
with the server's answer when the mail server refuses (or cannot be reached).
Sessions are kept in a ``Pool`` between requests, so a busy endpoint does not
connect, upgrade to TLS and authenticate for every message. A request whose
client goes away cancels its send. Prints ``listening on PORT`` when ready.
"""

from __future__ import annotations

import argparse
import json
import sys
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.ssl import Certificate
from twisted.internet.task import react
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from txcolombe import Authentication, Pool, SMTPError, TLSMode, UsageError

log = Logger()


class SendMail(Resource):
    """``POST`` a JSON object ``{"to", "subject", "text"}`` to send it."""

    isLeaf = True

    def __init__(self, pool: Pool, sender: str, server: str, options: dict[str, Any]) -> None:
        super().__init__()
        self.pool, self.sender, self.smtp_server, self.options = pool, sender, server, options

    def render_POST(self, request: Request) -> object:
        try:
            fields = json.loads(request.content.read() if request.content else b"")
            message = EmailMessage()
            message["From"] = self.sender
            message["To"] = str(fields["to"])
            message["Subject"] = str(fields.get("subject", ""))
            message.set_content(str(fields.get("text", "")))
        except (ValueError, KeyError, TypeError) as error:
            return self.reply(request, 400, {"error": f"bad request: {error!r}"})
        sending = self.pool.send(
            self.smtp_server, self.sender, [str(fields["to"])], message, **self.options
        )
        # The client went away: stop sending (unless the send is done already).
        request.notifyFinish().addErrback(lambda _: sending.cancel())
        sending.addCallbacks(
            lambda receipt: self.finish(
                request,
                202,
                {
                    "queued_as": receipt.queue_id,
                    "accepted": sorted(receipt.accepted),
                    "refused": {r: str(reply) for r, reply in receipt.refused.items()},
                },
            ),
            lambda failure: self.failed(request, failure),
        )
        return NOT_DONE_YET

    def failed(self, request: Request, failure: Failure) -> None:
        error = failure.value
        if isinstance(error, UsageError):
            self.finish(request, 400, {"error": str(error)})
        elif isinstance(error, SMTPError):
            self.finish(request, 502, {"error": str(error), "temporary": error.temporary})
        elif not failure.check(Exception) or request.finished:
            return  # cancelled because the client left
        else:
            log.failure("sending failed", failure)
            self.finish(request, 500, {"error": "internal error"})

    @staticmethod
    def reply(request: Request, code: int, body: dict[str, Any]) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(body).encode() + b"\n"

    def finish(self, request: Request, code: int, body: dict[str, Any]) -> None:
        if request.finished or request.channel is None:
            return
        request.write(self.reply(request, code, body))
        request.finish()


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--listen", default="tcp:8080:interface=127.0.0.1")
    parser.add_argument("--server", required=True)
    parser.add_argument("--port", type=int, default=587)
    parser.add_argument("--implicit-tls", action="store_true", help="TLS from the first byte")
    parser.add_argument("--user")
    parser.add_argument("--password-file", type=Path)
    parser.add_argument("--ca-file", type=Path, help="trust this CA (PEM) for the server")
    parser.add_argument("--ehlo", help="our name in EHLO (default: this host's FQDN)")
    parser.add_argument("--from", dest="sender", required=True)
    args = parser.parse_args(argv)
    if args.user and not args.password_file:
        parser.error("--user needs --password-file")
    return args


async def main(reactor: Any, *argv: str) -> None:
    args = parse(list(argv))
    options: dict[str, Any] = {
        "port": args.port,
        "domain": args.ehlo,
        "tls_mode": TLSMode.IMPLICIT if args.implicit_tls else TLSMode.REQUIRED,
    }
    if args.ca_file:
        options["trust_root"] = Certificate.loadPEM(args.ca_file.read_bytes())
    if args.user:
        options["authentication"] = Authentication(
            args.user, args.password_file.read_text().strip()
        )
    pool = Pool(max_per_destination=4, idle_timeout=30, reactor=reactor)
    root = Resource()
    root.putChild(b"send", SendMail(pool, args.sender, args.server, options))
    port = await serverFromString(reactor, args.listen).listen(Site(root))
    print(f"listening on {port.getHost().port}", flush=True)
    reactor.addSystemEventTrigger("before", "shutdown", lambda: ensureDeferred(pool.close()))
    await Deferred()  # serve until the process is stopped


if __name__ == "__main__":
    react(main, sys.argv[1:])
