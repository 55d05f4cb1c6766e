"""A fast SMTP sink for the benchmarks: accepts everything, stores nothing, checks every message.

Run as a separate process (``python bench/sink.py PORT [CERT KEY]``) so that
the sender's memory and CPU are measured alone. One thread per connection,
``recv_into`` one reused 1 MiB buffer, and C-level work per read only (a
CRC-32 of the DATA bytes, a search for the end-of-data marker in the last
64 KiB): the sink must not be the bottleneck. With a certificate it offers
STARTTLS.

Integrity: each message's DATA bytes (as on the wire, dot-stuffed, up to and
including the CRLF before the final dot) are counted and hashed with CRC-32.
``XSTATS`` (a command of this sink only) answers ``250`` and a JSON object
``{"messages": N, "digests": {"SIZE:CRC": COUNT, ...}}`` for the messages
since the last ``XSTATS``, then starts counting afresh. The caller compares
that with the size and CRC of the bytes a correct client must send.

The end of DATA is looked for in the last 64 KiB of each read: RFC 5321
clients (and every client here) send no more than a few commands after the
final dot before the sink answers it, and a CRLF.CRLF inside the message is
impossible once it is dot-stuffed.
"""

from __future__ import annotations

import json
import socket
import ssl
import sys
import threading
import zlib
from collections import Counter

END = b"\r\n.\r\n"
READ = 1 << 20
TAIL = 1 << 16

_lock = threading.Lock()
_messages: Counter[str] = Counter()


def record(size: int, crc: int) -> None:
    with _lock:
        _messages[f"{size}:{crc:08x}"] += 1


def take_stats() -> bytes:
    with _lock:
        stats = {"messages": sum(_messages.values()), "digests": dict(_messages)}
        _messages.clear()
    return b"250 " + json.dumps(stats, separators=(",", ":")).encode() + b"\r\n"


class Connection:
    """One client: commands line by line, DATA hashed as it streams."""

    def __init__(self, conn: socket.socket, context: ssl.SSLContext | None) -> None:
        self.conn = conn
        self.sock: socket.socket = conn
        self.context = context
        self.buffer = bytearray(READ)
        self.view = memoryview(self.buffer)
        self.pending = b""  # command bytes not yet a whole line
        self.in_data = False
        self.size = 0
        self.crc = 0
        self.held = b""  # the last bytes of DATA read, not hashed yet: may start the end marker

    def serve(self) -> None:
        self.conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(b"220 sink ESMTP\r\n")
        while True:
            try:
                count = self.sock.recv_into(self.buffer)
            except (ConnectionError, ssl.SSLError, OSError):
                return
            if not count:
                return
            if self.in_data:
                rest = self.data(count)
                if rest is None:
                    continue
                self.pending = rest
            else:
                self.pending += self.view[:count]
            if not self.commands():
                return

    def data(self, count: int) -> bytes | None:
        """Hash DATA bytes; the bytes after the end marker, or None if not there yet."""
        view = self.view
        edge = self.held + bytes(view[: min(count, len(END) - 1)])
        at = edge.find(END)
        if at >= 0:  # the marker spans the previous read and this one
            self.hash(edge[: at + 2])
            return self.end(bytes(view[at + len(END) - len(self.held) : count]))
        at = self.buffer.find(END, max(0, count - TAIL), count)
        if at >= 0:
            self.hash(self.held)
            self.hash(view[: at + 2])
            return self.end(bytes(view[at + len(END) : count]))
        if count >= len(END) - 1:
            self.hash(self.held)
            self.hash(view[: count - len(END) + 1])
            self.held = bytes(view[count - len(END) + 1 : count])
        else:  # a tiny read: keep the last bytes of both
            joined = self.held + bytes(view[:count])
            self.hash(joined[: -len(END) + 1])
            self.held = joined[-len(END) + 1 :]
        return None

    def hash(self, data: bytes | memoryview) -> None:
        self.size += len(data)
        self.crc = zlib.crc32(data, self.crc)

    def end(self, rest: bytes) -> bytes:
        record(self.size, self.crc)
        self.in_data, self.size, self.crc, self.held = False, 0, 0, b""
        self.sock.sendall(b"250 2.0.0 Ok: queued\r\n")
        return rest

    def commands(self) -> bool:
        """Answer every whole command line; False once the connection is closed."""
        replies: list[bytes] = []
        while not self.in_data:
            eol = self.pending.find(b"\n")
            if eol < 0:
                break
            line, self.pending = self.pending[:eol], self.pending[eol + 1 :]
            verb = line.strip()[:6].upper()
            if verb[:4] in (b"EHLO", b"HELO"):
                tls = b"250-STARTTLS\r\n" if self.context and self.sock is self.conn else b""
                replies.append(b"250-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n" + tls)
                replies.append(b"250 SIZE\r\n")
            elif verb == b"XSTATS":
                replies.append(take_stats())
            elif verb[:4] == b"STAR" and self.context is not None:
                self.sock.sendall(b"".join(replies) + b"220 2.0.0 Ready to start TLS\r\n")
                replies = []
                self.sock = self.context.wrap_socket(self.conn, server_side=True)
                self.pending = b""
            elif verb[:4] == b"DATA":
                replies.append(b"354 go ahead\r\n")
                self.sock.sendall(b"".join(replies))
                replies = []
                self.in_data = True
                rest = self.pending
                self.pending = b""
                if rest:
                    # Pipelined body bytes (not from RFC 2920 clients): treat as a read.
                    self.buffer[: len(rest)] = rest
                    after = self.data(len(rest))
                    if after is not None:
                        self.pending = after
            elif verb[:4] == b"QUIT":
                self.sock.sendall(b"".join(replies) + b"221 2.0.0 Bye\r\n")
                self.sock.close()
                return False
            else:
                replies.append(b"250 2.0.0 Ok\r\n")
        if replies:
            self.sock.sendall(b"".join(replies))
        return True


def serve(conn: socket.socket, context: ssl.SSLContext | None) -> None:
    try:
        Connection(conn, context).serve()
    finally:
        conn.close()


def main() -> None:
    port = int(sys.argv[1])
    context = None
    if len(sys.argv) > 3:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(sys.argv[2], sys.argv[3])
    listener = socket.create_server(("127.0.0.1", port), backlog=1024)
    print("ready", flush=True)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve, args=(conn, context), daemon=True).start()


if __name__ == "__main__":
    main()
