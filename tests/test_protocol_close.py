"""Who closes a plain TCP connection after QUIT: the server, as it does after
its 221 (RFC 5321 §4.1.1.10), so that the TIME_WAIT is the server's; the
client only if the server has not closed within ``CLOSE_GRACE``.

Real TCP on loopback, against a scripted server that closes after 221 or not.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

import txcolombe
from txcolombe.client import protocol as client_protocol

reactor: Any = _reactor


class Scripted(Protocol):
    """Greets, answers EHLO, and answers QUIT with 221, then closes if told to."""

    def __init__(self, close_after_quit: bool) -> None:
        self.close_after_quit = close_after_quit
        self.lost: Deferred[None] = Deferred()
        self.reason: Failure | None = None
        self.buffer = b""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(b"220 scripted ESMTP\r\n")

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.buffer += data
        while b"\r\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            if line.upper().startswith(b"EHLO"):
                self.transport.write(b"250-scripted\r\n250 PIPELINING\r\n")
            elif line.upper() == b"QUIT":
                self.transport.write(b"221 bye\r\n")
                if self.close_after_quit:
                    self.transport.loseConnection()

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        self.reason = reason
        self.lost.callback(None)


async def session_with(
    close_after_quit: bool,
) -> tuple[txcolombe.Session, Scripted, Any]:
    server = Scripted(close_after_quit)
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Factory.forProtocol(lambda: server)
    )
    session = await txcolombe.connect(
        "127.0.0.1",
        port=port.getHost().port,
        tls_mode=txcolombe.TLSMode.NONE,
        domain="client.example",
    )
    return session, server, port


@pytest.fixture
def closes(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every transport the client closes itself after QUIT."""
    closed: list[object] = []
    real = client_protocol.close_now

    def recording(transport: Any) -> bool:
        closed.append(transport)
        return real(transport)

    monkeypatch.setattr(client_protocol, "close_now", recording)
    return closed


@pytest_twisted.ensureDeferred
async def test_the_server_closes_first(closes: list[object]) -> None:
    session, server, port = await session_with(close_after_quit=True)
    started = time.monotonic()
    await session.quit()
    # Gone as soon as the server closed, well within the grace, and the
    # client never closed the connection itself.
    assert time.monotonic() - started < client_protocol.CLOSE_GRACE / 2
    assert closes == []
    await server.lost
    assert server.reason is not None and server.reason.check(ConnectionDone)
    await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_server_that_stays_is_closed_after_the_grace(
    closes: list[object], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_protocol, "CLOSE_GRACE", 0.2)
    session, server, port = await session_with(close_after_quit=False)
    started = time.monotonic()
    await session.quit()
    assert time.monotonic() - started >= 0.2
    assert len(closes) == 1  # the client closed it, cleanly
    await server.lost
    assert server.reason is not None and server.reason.check(ConnectionDone)
    await port.stopListening()
