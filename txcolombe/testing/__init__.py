"""An in-memory SMTP server for tests: no sockets, no threads, a fake clock.

What ``treq.testing`` is to HTTP, this module is to txcolombe: point
:func:`~txcolombe.sendmail`, :func:`~txcolombe.submit` or
:func:`~txcolombe.client.connect` at a :class:`MemorySMTP` and the whole
conversation (STARTTLS with real TLS, AUTH, pipelining, the body) runs in
memory, synchronously, when the test says so::

    MESSAGE = b"Subject: hi\\r\\n\\r\\nhello\\r\\n"
    fake = MemorySMTP(MemorySMTPServer(users={"alice": "s3cret"}))
    d = txcolombe.sendmail(
        "mx.example.org", "alice@example.com", ["bob@example.org"], MESSAGE,
        domain="client.example.com", trust_root=fake.trust_root,
        reactor=fake.reactor, endpoint=fake.endpoint(),
    )
    fake.flush()                          # move bytes until both sides are quiet
    [transaction] = fake.server.transactions
    assert transaction.data == MESSAGE and transaction.tls

Nothing happens between two calls of :meth:`MemorySMTP.flush` (or
:meth:`MemorySMTP.advance`): bytes wait in the in-memory transports and timers
wait on :attr:`MemorySMTP.reactor`, a
:class:`~twisted.internet.testing.MemoryReactorClock` whose time only moves
when the test advances it. Timeouts are tested by advancing it.
:attr:`MemorySMTP.cooperator` runs on that clock too: give it to
``txcolombe.client.body.body_producer(..., cooperator=)`` for producers built by hand.

The server (:class:`MemorySMTPServer`) speaks enough SMTP for a client:
greeting, EHLO/HELO, STARTTLS (a real TLS handshake through
:mod:`twisted.protocols.tls`, with a certificate for :data:`DEFAULT_HOSTNAMES`
signed by a throw-away CA: give :attr:`MemorySMTP.trust_root` as
``trust_root=``), AUTH PLAIN and LOGIN, MAIL/RCPT/DATA with dot-unstuffing,
RSET, NOOP, QUIT. Each delivered message is recorded as a :class:`Transaction`
with the message bytes exactly as received. Any reply can be scripted
(:meth:`MemorySMTPServer.script`, :meth:`MemorySMTPServer.add_responder`):
another code, raw bytes, a reply sent only after some fake seconds, no reply at
all, a close or an abort after the reply.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from txcolombe.testing.memory import (
        DEFAULT_EXTENSIONS,
        DEFAULT_HOSTNAMES,
        END_OF_DATA,
        GREETING,
        MemoryConnection,
        MemoryResolver,
        MemorySMTP,
        MemorySMTPServer,
        MemoryTransport,
        Responder,
        Response,
        SMTPServerProtocol,
        SMTPTestMixin,
        Transaction,
    )

__all__ = [
    "DEFAULT_EXTENSIONS",
    "DEFAULT_HOSTNAMES",
    "END_OF_DATA",
    "GREETING",
    "MemoryConnection",
    "MemoryResolver",
    "MemorySMTP",
    "MemorySMTPServer",
    "MemoryTransport",
    "Responder",
    "Response",
    "SMTPServerProtocol",
    "SMTPTestMixin",
    "Transaction",
]

_HOME = {name: "txcolombe.testing.memory" for name in __all__}
"""Where each public name lives: imported on first use, so that loading the
pytest plugin (a module of this package) pulls in no fake reactor and no TLS."""


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
