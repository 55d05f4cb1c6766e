"""``twistd -n smtprelay`` as a child process on loopback, for tests, the crash
test and the benchmark. Every process started here is stopped by :meth:`stop`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

ROOT = Path(__file__).resolve().parents[2]
TWISTD = Path(sys.executable).with_name("twistd")


def wait_for(condition: Callable[[], bool], timeout: float, what: str, poll: float = 0.02) -> None:
    """Poll ``condition`` until it holds; bounded by ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(poll)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


class RelayProcess:
    """One relay: ``port`` on 127.0.0.1, spool in ``workdir/spool``; ``args``
    for ``smtprelay``, ``twistd_args`` for twistd itself (``--profile``, say)."""

    def __init__(
        self,
        workdir: Path,
        port: int,
        args: Sequence[str] = (),
        twistd_args: Sequence[str] = (),
    ) -> None:
        self.workdir = workdir
        self.port = port
        self.spool = workdir / "spool"
        self.log = workdir / "relay.log"
        self.args = list(args)
        self.twistd_args = list(twistd_args)
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        return [
            str(TWISTD), "-n", "--pidfile=", f"--logfile={self.log}", *self.twistd_args,
            "smtprelay",
            f"--listen=tcp:port={self.port}:interface=127.0.0.1", f"--spool={self.spool}",
            "--hostname=relay.test", *self.args,
        ]  # fmt: skip

    def start(self, timeout: float = 20.0) -> RelayProcess:
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        self.proc = subprocess.Popen(self.command(), cwd=self.workdir, env=env)
        proc = self.proc

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"relay exited with {proc.returncode}: {self.log_text()[-2000:]}"
                )
            return port_open(self.port)

        wait_for(ready, timeout, "the relay to listen")
        return self

    def kill(self) -> None:
        """SIGKILL: the crash test's crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.kill()

    def control(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "txcolombe.relay.control", "-s", str(self.spool), *args],
            capture_output=True, text=True, timeout=30, cwd=ROOT,
        )  # fmt: skip

    def log_text(self) -> str:
        try:
            return self.log.read_text("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> RelayProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
