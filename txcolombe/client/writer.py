"""Writes that reach the socket in the same reactor turn.

Twisted's TCP transport buffers every ``write`` and sends it on the next
turn of the reactor, when the socket polls writable: one more poll, and one
more join of the buffer, for each command and each body chunk. When nothing
is buffered already, sending at once is the same bytes in the same order, a
turn sooner; what the kernel does not take goes to the transport's buffer,
which then sends it and applies its backpressure as usual.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet import tcp
from twisted.internet.interfaces import ITransport


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
        if (
            connection.TLS
            or not connection.connected
            or connection.disconnecting
            or connection._writeDisconnected
            or connection._tempDataLen
            or connection.offset != len(connection.dataBuffer)
        ):
            buffered(data)
            return
        sent = connection.writeSomeData(data)
        if isinstance(sent, int):
            if sent < len(data):
                buffered(data[sent:] if sent else data)
        else:  # the connection is lost: the transport finds out and reports it
            buffered(data)

    return write
