"""Queue commands: a JSON-lines control socket in the spool, and its client.

The running relay listens on ``<spool>/control.sock`` (mode 0600). Each
request is one JSON object per line (``{"cmd": "list"}``), each answer one
JSON object (``{"ok": true, "result": ...}``). The command line::

    python -m txcolombe.relay.control -s SPOOL list|stats|flush
    python -m txcolombe.relay.control -s SPOOL show|hold|release|delete ID

``list`` prints id, age, size, sender, recipients, state and last error, like
``postqueue -p``; with ``--json`` every command prints the raw answer.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from pathlib import Path
from typing import Any

from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineOnlyReceiver

from txcolombe.relay.queue import QueueManager

SOCKET_NAME = "control.sock"


class ControlProtocol(LineOnlyReceiver):
    delimiter = b"\n"
    MAX_LENGTH = 4096

    def __init__(self, queue: QueueManager) -> None:
        self.queue = queue

    def lineReceived(self, line: bytes) -> None:
        try:
            request = json.loads(line)
            result = self.handle(str(request["cmd"]), str(request.get("id", "")))
            answer: dict[str, Any] = {"ok": True, "result": result}
        except (ValueError, KeyError, TypeError) as error:
            answer = {"ok": False, "error": str(error)}
        self.sendLine(json.dumps(answer).encode("utf-8"))  # type: ignore[no-untyped-call]

    def handle(self, cmd: str, queue_id: str) -> Any:
        queue = self.queue
        if cmd == "list":
            return queue.list()
        if cmd == "stats":
            return queue.stats()
        if cmd == "flush":
            return queue.flush()
        actions = {
            "show": queue.show,
            "hold": queue.hold,
            "release": queue.release,
            "delete": queue.delete,
        }
        if cmd not in actions:
            raise ValueError(f"unknown command {cmd!r}")
        result = actions[cmd](queue_id)
        if result is None or result is False:
            raise KeyError(f"no message {queue_id!r} in the queue")
        return result


class ControlFactory(Factory):
    noisy = False

    def __init__(self, queue: QueueManager) -> None:
        self.queue = queue

    def buildProtocol(self, addr: Any) -> ControlProtocol:
        return ControlProtocol(self.queue)


def request(spool: Path, cmd: str, queue_id: str = "", timeout: float = 30.0) -> dict[str, Any]:
    """Send one command to the relay that owns ``spool``; its answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(spool / SOCKET_NAME))
        sock.sendall(json.dumps({"cmd": cmd, "id": queue_id}).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
    answer: dict[str, Any] = json.loads(buf)
    return answer


def _print_list(items: list[dict[str, Any]]) -> None:
    if not items:
        print("Mail queue is empty")
        return
    for item in items:
        age = int(item["age"])
        print(f"{item['id']:<22} {age:>8}s {item['size']:>8} {item['state']:<9} <{item['sender']}>")
        if item["last_error"]:
            print(f"{'':22} ({item['last_error']})")
        for rcpt in item["pending"]:
            print(f"{'':22} {rcpt}")
    print(f"-- {len(items)} messages")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m txcolombe.relay.control", description="Inspect and manage the relay queue."
    )
    parser.add_argument("-s", "--spool", type=Path, default=Path("smtprelay-spool"))
    parser.add_argument("--json", action="store_true", help="print the raw JSON answer")
    parser.add_argument(
        "command", choices=["list", "stats", "flush", "show", "hold", "release", "delete"]
    )
    parser.add_argument("id", nargs="?", default="")
    args = parser.parse_args(argv)
    if args.command in ("show", "hold", "release", "delete") and not args.id:
        parser.error(f"{args.command} needs a queue id")
    try:
        answer = request(args.spool, args.command, args.id)
    except OSError as error:
        print(f"cannot reach the relay at {args.spool / SOCKET_NAME}: {error}", file=sys.stderr)
        return 2
    if not answer.get("ok"):
        print(answer.get("error", "error"), file=sys.stderr)
        return 1
    result = answer["result"]
    if args.json or args.command in ("show", "stats"):
        print(json.dumps(result, indent=2, ensure_ascii=False))
    elif args.command == "list":
        _print_list(result)
    else:
        print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
