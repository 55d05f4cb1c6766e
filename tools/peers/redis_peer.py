"""A private ``redis-server`` on loopback for the shaping tests.

:class:`RedisPeer` starts Debian's ``redis-server`` on a free port of
127.0.0.1 with no persistence (``--save '' --appendonly no``) in a
directory of its own, waits until it answers ``PING`` and stops it
afterwards. It never touches a system Redis.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType


def available() -> str | None:
    """None if ``redis-server`` can be run here, else why not."""
    if shutil.which("redis-server") is None:
        return "redis-server is not installed (run tools/install_peers.sh)"
    return None


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (best effort: free when asked)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisPeer:
    """One ``redis-server`` process, listening on ``127.0.0.1:port``."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.host = "127.0.0.1"
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> RedisPeer:
        server = shutil.which("redis-server")
        if server is None:
            raise RuntimeError("redis-server is not installed")
        self.port = free_port()
        log = (self.workdir / "redis.log").open("wb")
        self._process = subprocess.Popen(
            [server, "--port", str(self.port), "--bind", self.host, "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), "--daemonize", "no"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + timeout
        while not self.ping():
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                output = (self.workdir / "redis.log").read_text(errors="replace")
                raise RuntimeError(f"redis-server did not start: {output[-500:]}")
            time.sleep(0.05)
        return self

    def ping(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None

    def __enter__(self) -> RedisPeer:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
