"""Queue commands: a JSON-lines control socket in the spool, and its client.

The running relay listens on ``<spool>/control.sock`` (mode 0600). Each
request is one JSON object per line (``{"cmd": "list"}``), each answer one
JSON object (``{"ok": true, "result": ...}``). The command line,
``smtprelay-queue``, is documented in docs/relay.md ("Inspect the queue"):
bulk selections, flush/requeue, ``show --body``, human output or ``--json``,
and ``list``/``show`` from the spool files while the relay is stopped.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineOnlyReceiver

from txcolombe.relay.queue import QueueManager
from txcolombe.relay.spool import Spool
from txcolombe.relay.transport import shaping_snapshot

SOCKET_NAME = "control.sock"
LOCK_NAME = "lock"


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
        if cmd == "shaping":
            return shaping_snapshot(queue.transport)
        if cmd == "flush" and not queue_id:
            return queue.flush()
        actions: dict[str, Callable[[str], Any]] = {
            "show": queue.show,
            "hold": queue.hold,
            "release": queue.release,
            "delete": queue.delete,
            "flush": queue.retry,
            "requeue": partial(queue.retry, reset=True),
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


def offline_list(spool: Path) -> list[dict[str, Any]]:
    """The queue as stored in ``spool``, read from its files (relay stopped)."""
    store = Spool(spool)
    return [_offline_summary(store, qid, time.time()) for qid in store.queue_ids()]


def _offline_summary(store: Spool, queue_id: str, now: float) -> dict[str, Any]:
    """A message's summary from its spool files, shaped like the relay's."""
    envelope = store.read_envelope(queue_id)
    state = store.read_state(queue_id) or {}
    recipients = [str(r) for r in envelope.get("recipients", [])]
    rstates = state.get("recipients") or [{"address": r, "status": "pending"} for r in recipients]
    pending = [r for r in rstates if r.get("status", "pending") == "pending"]
    errors = [str(r["last_error"]) for r in pending if r.get("last_error")]
    attempts = int(state.get("attempts", 0))
    arrival = float(envelope.get("arrival", state.get("arrival", 0.0)) or 0.0)
    held = bool(state.get("held", False))
    return {
        "id": queue_id,
        "age": round(now - arrival, 3) if arrival else 0.0,
        "arrival": arrival,
        "size": int(envelope.get("size", 0)),
        "sender": envelope.get("sender") or "",
        "recipients": recipients,
        "pending": [str(r.get("address", "")) for r in pending],
        "state": "held" if held else ("deferred" if attempts else "incoming"),
        "attempts": attempts,
        "next_attempt": state.get("next_attempt"),
        "last_error": errors[-1] if errors else "",
        "recipient_state": rstates,
    }


def offline_show(spool: Path, queue_id: str) -> dict[str, Any] | None:
    """One message read from the spool files, or None when it is not there."""
    store = Spool(spool)
    if not (store.queue_dir / f"{queue_id}.msg").exists():
        return None
    info = _offline_summary(store, queue_id, time.time())
    info["envelope"] = store.read_envelope(queue_id)
    return info


def relay_running(spool: Path) -> bool:
    """True unless ``<spool>/lock`` can be flocked (the relay holds it while up)."""
    try:
        fd = os.open(spool / LOCK_NAME, os.O_RDONLY)
    except FileNotFoundError:
        return _socket_answers(spool)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _socket_answers(spool: Path) -> bool:
    """Whether something accepts connections on the control socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(spool / SOCKET_NAME))
        except OSError:
            return False
    return True


def select(items: list[dict[str, Any]], ids: list[str], args: argparse.Namespace) -> list[str]:
    """The ids a bulk command acts on: explicit ids, or the queue filtered."""
    if ids:
        return ids
    chosen: list[str] = []
    for item in items:
        rcpts = [r.lower() for r in item["recipients"]]
        if args.sender is not None and item["sender"].lower() != args.sender.lower():
            continue
        if args.recipient is not None and args.recipient.lower() not in rcpts:
            continue
        domain = (args.domain or "").lower().lstrip("@")
        if args.domain is not None and not any(r.rpartition("@")[2] == domain for r in rcpts):
            continue
        chosen.append(str(item["id"]))
    return chosen


def _date(value: Any) -> str:
    if not value:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(value)))


def _print_list(items: list[dict[str, Any]]) -> None:
    if not items:
        print("Mail queue is empty")
        return
    print(f"{'ID':<22} {'ARRIVAL':<19} {'SIZE':>8} {'RCPTS':>5} {'STATE':<9} SENDER")
    for item in items:
        arrival = _date(item.get("arrival"))
        count = len(item["recipients"])
        print(
            f"{item['id']:<22} {arrival:<19} {item['size']:>8} {count:>5} "
            f"{item['state']:<9} <{item['sender']}>"
        )
        if item["last_error"]:
            print(f"{'':22} ({item['last_error']})")
        for rcpt in item["pending"]:
            print(f"{'':22} {rcpt}")
    print(f"-- {len(items)} messages")


def _print_show(info: dict[str, Any], body: bytes | None) -> None:
    print(f"id:       {info['id']}")
    print(f"arrival:  {_date(info.get('arrival'))}")
    print(f"size:     {info['size']}")
    print(f"state:    {info['state']}")
    print(f"attempts: {info['attempts']}")
    print(f"next:     {_date(info.get('next_attempt'))}")
    print(f"sender:   <{info['sender']}>")
    for r in info.get("recipient_state", []):
        error = f" ({r['last_error']})" if r.get("last_error") else ""
        print(
            f"rcpt:     <{r['address']}> {r.get('status', 'pending')}"
            f" attempts={r.get('attempts', 0)}{error}"
        )
    if body is not None:
        print(flush=True)
        sys.stdout.buffer.write(body)  # byte-exact, as spooled


PAST = {
    "hold": "held",
    "release": "released",
    "delete": "deleted",
    "flush": "flushed",
    "requeue": "requeued",
}


COMMANDS = ["list", "stats", "shaping", "flush", "show", "hold", "release", "delete", "requeue"]


def main(argv: list[str] | None = None) -> int:
    """``smtprelay-queue``: exit 0 done, 1 failed (no such message, relay down), 2 usage."""
    parser = argparse.ArgumentParser(
        prog="smtprelay-queue", description="Inspect and manage the relay queue."
    )
    parser.add_argument("-s", "--spool", type=Path, default=Path("smtprelay-spool"))
    parser.add_argument("--json", action="store_true", help="machine-readable JSON output")
    parser.add_argument("command", choices=COMMANDS)
    parser.add_argument("ids", nargs="*", help="queue ids; - reads them from stdin")
    parser.add_argument("--all", action="store_true", help="every queued message")
    parser.add_argument("--sender", help="messages from this sender")
    parser.add_argument("--recipient", help="messages to this recipient")
    parser.add_argument("--domain", help="messages with a recipient in this domain")
    parser.add_argument("--body", action="store_true", help="show: print the message too")
    args = parser.parse_args(argv)
    ids = [i for i in args.ids if i != "-"]
    if "-" in args.ids:
        ids += [line.strip() for line in sys.stdin if line.strip()]
    filtered = args.all or any(v is not None for v in (args.sender, args.recipient, args.domain))
    if args.command == "show" and len(ids) != 1:
        parser.error("show needs exactly one queue id")
    if args.command in PAST and args.command != "flush" and not ids and not filtered:
        parser.error(f"{args.command} needs queue ids, -, --all, --sender, --recipient or --domain")
    if args.command in PAST and ids and filtered:
        parser.error("give either queue ids or a selection, not both")
    args.selected = bool(ids) or filtered or "-" in args.ids
    try:
        return _run(args, ids)
    except OSError as error:
        print(f"cannot reach the relay at {args.spool / SOCKET_NAME}: {error}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace, ids: list[str]) -> int:
    """Carry out a parsed command, against the relay or, if it is stopped, the files."""
    up = relay_running(args.spool)
    cmd = args.command
    if not up and cmd in ("list", "show", "stats"):
        return _run_offline(args, ids)
    if not up:
        print(f"the relay for {args.spool} is not running; {cmd} needs it", file=sys.stderr)
        return 1
    if cmd in ("list", "stats", "shaping") or (cmd == "flush" and not args.selected):
        answer = request(args.spool, cmd)
        result = answer["result"]
        if args.json:
            print(json.dumps(result, indent=2, ensure_ascii=False))
        elif cmd == "list":
            _print_list(result)
        elif cmd == "stats":
            for key, value in result.items():
                print(f"{key}: {value}")
        elif cmd == "shaping":
            _print_shaping(result)
        else:
            print(f"flushed {result} messages")
        return 0
    if cmd == "show":
        answer = request(args.spool, "show", ids[0])
        if not answer.get("ok"):
            print(answer.get("error", "error"), file=sys.stderr)
            return 1
        return _emit_show(args, answer["result"])
    if not ids and "-" not in args.ids:
        ids = select(request(args.spool, "list")["result"], [], args)
    done: list[str] = []
    missing: list[str] = []
    for queue_id in ids:
        (done if request(args.spool, cmd, queue_id).get("ok") else missing).append(queue_id)
    if args.json:
        print(json.dumps({PAST[cmd]: done, "missing": missing}))
    else:
        for queue_id in done:
            print(f"{queue_id}: {PAST[cmd]}")
        for queue_id in missing:
            print(f"{queue_id}: no such message", file=sys.stderr)
        print(f"{PAST[cmd]} {len(done)} messages")
    return 1 if missing else 0


def _print_shaping(sites: dict[str, dict[str, Any]]) -> None:
    if not sites:
        print("no shaped sites (MX mode with a [shaping] section shapes each site)")
    for site, info in sites.items():
        line = (
            f"{site}: {info['connections_open']} open, {info['waiting']} waiting, "
            f"{info['messages_total']} messages, {info['slow_downs']} slow-downs"
        )
        if info["suspended"]:
            line += f"; suspended {info['suspended_for']:.0f}s more ({info['reason']})"
        if info["rate_factor"] != 1.0:
            line += f"; rate x{info['rate_factor']:g} for {info['lowered_for']:.0f}s"
        print(line)


def _emit_show(args: argparse.Namespace, info: dict[str, Any]) -> int:
    body = Spool(args.spool).read_data(info["id"]) if args.body else None
    if args.json:
        if body is not None:
            info["body"] = body.decode("utf-8", "replace")
        print(json.dumps(info, indent=2, ensure_ascii=False))
    else:
        _print_show(info, body)
    return 0


def _run_offline(args: argparse.Namespace, ids: list[str]) -> int:
    """list, show and stats (queue counts only) while the relay is stopped, from the files."""
    if args.command == "stats":
        states = [str(i["state"]) for i in offline_list(args.spool)]
        counts = {"queue_size": len(states)}
        counts.update({s: states.count(s) for s in ("incoming", "deferred", "held")})
        if args.json:
            print(json.dumps(counts))
        else:
            for key, value in counts.items():
                print(f"{key}: {value}")
        return 0
    if args.command == "list":
        items = offline_list(args.spool)
        if args.json:
            print(json.dumps(items, indent=2, ensure_ascii=False))
        else:
            _print_list(items)
        return 0
    info = offline_show(args.spool, ids[0])
    if info is None:
        print(f"no message {ids[0]!r} in the queue", file=sys.stderr)
        return 1
    return _emit_show(args, info)


if __name__ == "__main__":
    sys.exit(main())
