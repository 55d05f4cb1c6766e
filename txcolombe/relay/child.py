"""Child processes of the relay (the spool's committer): started with a
socket pair, the child's end as its standard input, ours adopted by the
reactor. Their system calls run on another core and never contend for the
relay's interpreter lock.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol

import txcolombe


def spawn(
    module: str, args: Sequence[str], reactor: Any, protocol: Protocol
) -> subprocess.Popen[bytes]:
    """Run ``python -m module args`` with a socket as its standard input,
    connected to ``protocol`` through the reactor."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    root = str(Path(txcolombe.__file__).resolve().parents[1])
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    try:
        with contextlib.suppress(OSError):
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
        child = subprocess.Popen(
            [sys.executable, "-m", module, *args], stdin=theirs.fileno(), env=env, close_fds=True
        )
    finally:
        theirs.close()
    try:
        reactor.adoptStreamConnection(ours.fileno(), socket.AF_UNIX, OneProtocolFactory(protocol))
    finally:
        ours.close()  # the reactor holds its own copy
    return child


def reap_later(child: subprocess.Popen[bytes], reactor: Any, timeout: float) -> Deferred[None]:
    """Fires once ``child`` has exited, without blocking the reactor; killed
    after ``timeout`` seconds."""
    done: Deferred[None] = Deferred()
    deadline = reactor.seconds() + timeout

    def check() -> None:
        if child.poll() is not None:
            done.callback(None)
        elif reactor.seconds() >= deadline:
            child.kill()
            child.wait()
            done.callback(None)
        else:
            reactor.callLater(0.02, check)

    check()
    return done


class OneProtocolFactory(Factory):
    """Hands out one protocol instance (for an adopted connection)."""

    noisy = False

    def __init__(self, instance: Protocol) -> None:
        self.instance = instance

    def buildProtocol(self, addr: Any) -> Protocol:
        return self.instance
