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

The server (:class:`MemorySMTPServer`) is the server machine of
:mod:`txcolombe.server.machine` (the relay's intake runs it too), driven in
memory: greeting, EHLO/HELO, STARTTLS (a real TLS handshake through
:mod:`twisted.protocols.tls`, with a certificate for :data:`DEFAULT_HOSTNAMES`
signed by a throw-away CA: give :attr:`MemorySMTP.trust_root` as
``trust_root=``), AUTH PLAIN and LOGIN, MAIL/RCPT/DATA with dot-unstuffing,
BDAT when CHUNKING is among its extensions, RSET, NOOP, QUIT. Each
delivered message is recorded as a :class:`Transaction` with the message
bytes exactly as received. Any reply can be scripted
(:meth:`MemorySMTPServer.script`, :meth:`MemorySMTPServer.add_responder`):
another code, raw bytes, a reply sent only after some fake seconds, no reply at
all, a close or an abort after the reply.

The modules: :mod:`~txcolombe.testing.server` (the server and its
scripting), :mod:`~txcolombe.testing.transport` (in-memory transports),
:mod:`~txcolombe.testing.network` (:class:`MemorySMTP`, its reactor and
DNS), :mod:`~txcolombe.testing.ca` (the throw-away CA, by ``trustme``),
:mod:`~txcolombe.testing.trial` (:class:`SMTPTestMixin`) and
:mod:`~txcolombe.testing.pytest_plugin` (the ``smtp`` fixtures).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from txcolombe.testing.network import MemoryResolver, MemorySMTP
    from txcolombe.testing.server import (
        DEFAULT_EXTENSIONS,
        DEFAULT_HOSTNAMES,
        END_OF_DATA,
        GREETING,
        MemoryServerProtocol,
        MemorySMTPServer,
        Responder,
        Response,
        Transaction,
    )
    from txcolombe.testing.transport import MemoryConnection, MemoryTransport
    from txcolombe.testing.trial import SMTPTestMixin

    SMTPServerProtocol = MemoryServerProtocol

__all__ = [
    "DEFAULT_EXTENSIONS",
    "DEFAULT_HOSTNAMES",
    "END_OF_DATA",
    "GREETING",
    "MemoryConnection",
    "MemoryResolver",
    "MemorySMTP",
    "MemorySMTPServer",
    "MemoryServerProtocol",
    "MemoryTransport",
    "Responder",
    "Response",
    "SMTPServerProtocol",
    "SMTPTestMixin",
    "Transaction",
]

_HOME = {
    "DEFAULT_EXTENSIONS": "server",
    "DEFAULT_HOSTNAMES": "server",
    "END_OF_DATA": "server",
    "GREETING": "server",
    "MemoryServerProtocol": "server",
    "MemorySMTPServer": "server",
    "Responder": "server",
    "Response": "server",
    "Transaction": "server",
    "MemoryConnection": "transport",
    "MemoryTransport": "transport",
    "MemoryResolver": "network",
    "MemorySMTP": "network",
    "SMTPTestMixin": "trial",
}
"""Where each public name lives (a module of this package): imported on
first use, so that loading the pytest plugin (a module of this package too)
pulls in no fake reactor and no TLS."""

_RENAMED = {"SMTPServerProtocol": "MemoryServerProtocol"}
"""Names of 0.1, kept: the server's protocol was renamed so that the package
has one ``SMTPServerProtocol`` (:mod:`txcolombe.server.protocol`'s)."""


def __getattr__(name: str) -> Any:
    home = _HOME.get(_RENAMED.get(name, name))
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{home}")
    value = getattr(module, _RENAMED.get(name, name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
