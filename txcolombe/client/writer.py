"""Writes, and a clean close, that reach the socket in the same reactor turn.

Twisted's TCP transport buffers every ``write`` and sends it on the next
turn of the reactor, when the socket polls writable: one more poll, and one
more join of the buffer, for each command and each body chunk. When nothing
is buffered already, sending at once is the same bytes in the same order, a
turn sooner; what the kernel does not take goes to the transport's buffer,
which then sends it and applies its backpressure as usual. Likewise
``loseConnection`` waits a turn for the socket to poll writable, then sends
nothing and closes: with nothing buffered, :func:`close_now` closes at once.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet import tcp
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import ITransport
from twisted.python.failure import Failure


def _idle(connection: tcp.Connection) -> bool:
    """A plain TCP connection, open, with nothing buffered to send."""
    return not (
        connection.TLS
        or not connection.connected
        or connection.disconnecting
        or connection._writeDisconnected
        or connection._tempDataLen
        or connection.offset != len(connection.dataBuffer)
    )


def plain_tcp(transport: object) -> bool:
    """A TCP connection of Twisted's own without TLS (``close_now`` and the
    immediate writes apply to it)."""
    return isinstance(transport, tcp.Connection) and not transport.TLS


def close_now(transport: ITransport) -> bool:
    """Close ``transport`` cleanly at once, as ``loseConnection`` would on the
    reactor's next turn: True if it did.

    Only a plain TCP connection of Twisted's own with nothing left to send
    is closed so (its protocol's ``connectionLost`` is called before this
    returns); for any other, False, and the caller uses ``loseConnection``.
    """
    if not isinstance(transport, tcp.Connection) or not _idle(transport):
        return False
    transport.disconnecting = True
    transport.reactor.removeReader(transport)
    transport.reactor.removeWriter(transport)
    transport.connectionLost(Failure(ConnectionDone()))  # type: ignore[no-untyped-call]
    return True


def immediate_writer(transport: ITransport) -> Callable[[bytes], None]:
    """A ``write`` for ``transport`` that sends at once when it can.

    Only a plain TCP connection of Twisted's own is written to directly;
    any other transport (TLS, ``iosim``, ``StringTransport``) gets its own
    ``write``. Once TLS starts on the connection, writes go through TLS.
    """
    buffered: Callable[[bytes], None] = transport.write
    if not isinstance(transport, tcp.Connection):
        return buffered
    connection = transport

    def write(data: bytes) -> None:
        if not _idle(connection):
            buffered(data)
            return
        sent = connection.writeSomeData(data)
        if isinstance(sent, int):
            if sent < len(data):
                buffered(data[sent:] if sent else data)
        else:  # the connection is lost: the transport finds out and reports it
            buffered(data)

    return write
