"""A fast SMTP sink for the benchmarks: accepts everything, stores nothing.

Run as a separate process (``python bench/sink.py PORT [CERT KEY]``) so that
the sender's memory and CPU are measured alone. One thread per connection,
big reads, and a scan for the end-of-data marker over whole buffers: the
sink must not be the bottleneck. With a certificate it offers STARTTLS.
"""

from __future__ import annotations

import socket
import ssl
import sys
import threading

END = b"\r\n.\r\n"


def serve(conn: socket.socket, context: ssl.SSLContext | None) -> None:
    sock: socket.socket = conn
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(b"220 sink ESMTP\r\n")
    buffer = b""
    in_data = False
    tail = b""
    queued = 0
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except (ConnectionError, ssl.SSLError):
            return
        if not chunk:
            return
        if in_data:
            scan = tail + chunk
            at = scan.find(END)
            if at < 0:
                tail = scan[-4:]
                continue
            in_data = False
            queued += 1
            sock.sendall(b"250 2.0.0 Ok: queued as SINK%d\r\n" % queued)
            buffer = scan[at + len(END) :]
            tail = b""
        else:
            buffer += chunk
        replies = []
        while not in_data and b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            verb = line.strip()[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                tls = b"250-STARTTLS\r\n" if context is not None and sock is conn else b""
                replies.append(
                    b"250-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n" + tls + b"250 SIZE\r\n"
                )
            elif verb == b"STAR" and context is not None:
                sock.sendall(b"".join(replies) + b"220 2.0.0 Ready to start TLS\r\n")
                replies = []
                sock = context.wrap_socket(conn, server_side=True)
                buffer = b""
            elif verb == b"DATA":
                replies.append(b"354 go ahead\r\n")
                in_data = True
                scan = b"\r\n" + buffer
                at = scan.find(END)
                if at >= 0:
                    in_data = False
                    queued += 1
                    replies.append(b"250 2.0.0 Ok: queued as SINK%d\r\n" % queued)
                    buffer = scan[at + len(END) :]
                else:
                    tail = scan[-4:]
                    buffer = b""
            elif verb == b"QUIT":
                sock.sendall(b"".join(replies) + b"221 2.0.0 Bye\r\n")
                sock.close()
                return
            else:
                replies.append(b"250 2.0.0 Ok\r\n")
        if replies:
            sock.sendall(b"".join(replies))


def main() -> None:
    port = int(sys.argv[1])
    context = None
    if len(sys.argv) > 3:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(sys.argv[2], sys.argv[3])
    listener = socket.create_server(("127.0.0.1", port), backlog=64)
    print("ready", flush=True)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve, args=(conn, context), daemon=True).start()


if __name__ == "__main__":
    main()
