"""The bytes the client writes, write by write, pinned for a set of conversations.

A refactoring of the client (its machine, protocol, session or pool) must not
change what goes on the wire. Each scenario runs the public API over
``twisted.test.iosim`` against a canned server (one reply per command line,
from the scenario's table) and compares every ``write`` the client made with
``tests/wire/<scenario>.json``. The write boundaries are part of it: a
pipelined MAIL/RCPT/DATA must leave in one write.

To record the files again after an intended change of the bytes:
``WIRE_RECORD=1 pytest tests/test_wire_bytes.py``, and review the diff.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.test import iosim
from zope.interface import implementer

import txcolombe
from txcolombe import DSN, Notify, Recipient, Return, Session, TLSMode

WIRE = Path(__file__).parent / "wire"
RECORD = os.environ.get("WIRE_RECORD") == "1"

EHLO = [
    "250-mx.example.org",
    "250-PIPELINING",
    "250-8BITMIME",
    "250-SIZE 10485760",
    "250-ENHANCEDSTATUSCODES",
    "250-SMTPUTF8",
    "250-DSN",
    "250 HELP",
]


class CannedServer(Protocol):
    """Answers each command line by its verb, from ``replies``; takes a body whole."""

    def __init__(self, replies: dict[str, list[str]]) -> None:
        self.replies = {verb: list(lines) for verb, lines in replies.items()}
        self.buffer = b""
        self.in_data = False
        self.bdat_left = 0

    def connectionMade(self) -> None:
        self._say(self._next("GREETING", ["220 mx.example.org ESMTP"]))

    def _next(self, verb: str, default: list[str]) -> list[str]:
        queue = self.replies.get(verb)
        if not queue:
            return [line for item in default for line in item.split("|")]
        item = queue.pop(0) if len(queue) > 1 else queue[0]
        return item.split("|")

    def _say(self, lines: list[str]) -> None:
        assert self.transport is not None
        self.transport.write(b"".join(line.encode() + b"\r\n" for line in lines))

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while True:
            if self.bdat_left:
                taken = self.buffer[: self.bdat_left]
                self.buffer = self.buffer[len(taken) :]
                self.bdat_left -= len(taken)
                if self.bdat_left:
                    return
                self._say(self._next("BDAT", ["250 2.0.0 chunk"]))
                continue
            if self.in_data:
                if self.buffer.startswith(b".\r\n"):
                    end, self.buffer = 0, self.buffer[3:]
                else:
                    end = self.buffer.find(b"\r\n.\r\n")
                    if end < 0:
                        return
                    self.buffer = self.buffer[end + 5 :]
                self.in_data = False
                self._say(self._next("END", ["250 2.0.0 queued as ABC"]))
                continue
            line, found, rest = self.buffer.partition(b"\r\n")
            if not found:
                return
            self.buffer = rest
            verb = line.split(b" ", 1)[0].decode().upper()
            if verb == "EHLO":
                self._say(self._next("EHLO", ["|".join(EHLO)]))
            elif verb == "DATA":
                lines = self._next("DATA", ["354 go ahead"])
                self._say(lines)
                self.in_data = lines[0].startswith("354")
            elif verb == "BDAT":
                self.bdat_left = int(line.split()[1])
                if self.bdat_left == 0:
                    self._say(self._next("BDAT", ["250 2.0.0 chunk"]))
            elif verb == "QUIT":
                self._say(["221 bye"])
                assert self.transport is not None
                self.transport.loseConnection()
            else:
                self._say(self._next(verb, ["250 2.0.0 ok"]))


class RecordingTransport(iosim.FakeTransport):
    """Notes each write the client makes, as one entry."""

    def __init__(self, protocol: IProtocol, writes: list[str]) -> None:
        super().__init__(protocol, isServer=False)
        self.writes = writes

    def write(self, data: bytes) -> None:
        self.writes.append(data.decode("utf-8", "backslashreplace"))
        super().write(data)

    def writeSequence(self, data: Any) -> None:
        self.write(b"".join(data))


@implementer(IStreamClientEndpoint)
class CannedEndpoint:
    def __init__(self, replies: dict[str, list[str]], writes: list[str]) -> None:
        self.replies = replies
        self.writes = writes
        self.pump: iosim.IOPump | None = None

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        client = factory.buildProtocol(None)  # type: ignore[arg-type]
        server = CannedServer(self.replies)
        client_transport = RecordingTransport(client, self.writes)
        server_transport = iosim.FakeTransport(server, isServer=True)
        self.pump = iosim.connect(server, server_transport, client, client_transport, greet=False)
        return Deferred.fromCoroutine(_connected(client))


async def _connected(client: IProtocol) -> IProtocol:
    return client


Scenario = Callable[[Session], Coroutine[Any, Any, Any]]

MESSAGE = b"From: a@example.com\r\nSubject: pinned\r\n\r\nHello.\r\n.dot first\r\n"


async def one_message(session: Session) -> None:
    await session.send("alice@example.com", ["bob@example.org"], MESSAGE)


async def two_recipients_one_refused(session: Session) -> None:
    receipt = await session.send(
        "alice@example.com", ["bob@example.org", "nobody@example.org"], MESSAGE
    )
    assert list(receipt.refused) == ["nobody@example.org"]


async def dsn_everywhere(session: Session) -> None:
    await session.send(
        "alice@example.com",
        [Recipient("bob@example.org", notify={Notify.FAILURE, Notify.DELAY}), "carol@example.org"],
        MESSAGE,
        dsn=DSN(ret=Return.HDRS, envid="QQ314159", notify={Notify.SUCCESS}),
    )


async def utf8_and_8bit(session: Session) -> None:
    await session.send(
        "jös@example.com", ["björn@example.org"], "Subject: é\r\n\r\nçà\r\n".encode()
    )


async def two_messages_then_one_failed_mail(session: Session) -> None:
    await session.send("alice@example.com", ["bob@example.org"], MESSAGE)
    await session.send("alice@example.com", ["carol@example.org"], MESSAGE + b"second\r\n")
    with pytest.raises(txcolombe.SMTPError):
        await session.send("mallory@example.com", ["bob@example.org"], MESSAGE)


async def chunking(session: Session) -> None:
    body = MESSAGE + (b"x" * 998 + b"\r\n") * 300  # over BDAT's 256 KiB gathering
    await session.send("alice@example.com", ["bob@example.org"], body)


SCENARIOS: dict[str, tuple[Scenario, dict[str, list[str]]]] = {
    "one_message": (one_message, {}),
    "two_recipients_one_refused": (
        two_recipients_one_refused,
        {"RCPT": ["250 2.1.5 ok", "550 5.1.1 no such user"]},
    ),
    "dsn_everywhere": (dsn_everywhere, {}),
    "utf8_and_8bit": (utf8_and_8bit, {}),
    "no_pipelining": (
        one_message,
        {"EHLO": ["|".join(line for line in EHLO if "PIPELINING" not in line)]},
    ),
    "two_messages_then_one_failed_mail": (
        two_messages_then_one_failed_mail,
        {
            "MAIL": ["250 ok", "250 ok", "550 5.7.1 not you"],
            "DATA": ["354 go ahead", "354 go ahead", "503 5.5.1 no valid recipients"],
        },
    ),
    "chunking": (
        chunking,
        {"EHLO": ["|".join([*EHLO[:-1], "250-CHUNKING", "250 HELP"])]},
    ),
}


def _short(write: str) -> str:
    """A long write (a body chunk) as its first line, length and digest."""
    if len(write) <= 400:
        return write
    digest = hashlib.sha256(write.encode("utf-8", "surrogateescape")).hexdigest()
    return f"{write[:60]!r}... {len(write)} chars, sha256 {digest}"


def run(scenario: Scenario, replies: dict[str, list[str]]) -> list[str]:
    writes: list[str] = []
    reactor = MemoryReactorClock()
    endpoint = CannedEndpoint(replies, writes)

    async def conversation() -> None:
        session = await txcolombe.connect(
            "mx.example.org",
            domain="client.example.com",
            tls_mode=TLSMode.NONE,
            reactor=reactor,
            endpoint=endpoint,
        )
        try:
            await scenario(session)
        finally:
            await session.quit()

    done = Deferred.fromCoroutine(conversation())
    for _ in range(200):
        if endpoint.pump is not None:
            endpoint.pump.flush()
        reactor.advance(0.01)
        if done.called:
            break
    failures: list[Any] = []
    done.addErrback(failures.append)
    assert not failures, failures[0].getTraceback()
    assert done.called, f"the conversation did not end: {writes}"
    return writes


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_the_client_writes_the_same_bytes(name: str) -> None:
    scenario, replies = SCENARIOS[name]
    writes = [_short(write) for write in run(scenario, replies)]
    path = WIRE / f"{name}.json"
    if RECORD:
        WIRE.mkdir(exist_ok=True)
        path.write_text(json.dumps(writes, indent=1, ensure_ascii=False) + "\n")
    assert path.exists(), f"no recording for {name}: run with WIRE_RECORD=1"
    assert writes == json.loads(path.read_text())


def test_a_pipelined_transaction_leaves_in_one_write() -> None:
    writes = run(one_message, {})
    [envelope] = [w for w in writes if w.startswith("MAIL FROM:")]
    assert envelope == (
        "MAIL FROM:<alice@example.com> BODY=8BITMIME SIZE=60\r\n"
        "RCPT TO:<bob@example.org>\r\nDATA\r\n"
    )
