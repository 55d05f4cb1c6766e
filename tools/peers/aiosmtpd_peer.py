"""aiosmtpd servers on loopback for tests, the demo and benchmarks.

:class:`AiosmtpdPeer` starts two aiosmtpd servers in a thread with a trustme
certificate: one offering STARTTLS (and AUTH PLAIN/LOGIN only under TLS),
one speaking implicit TLS. Every message it accepts is recorded with its
envelope and the exact bytes received.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session


@dataclass(frozen=True)
class Received:
    """One message as the server received it."""

    sender: str
    recipients: list[str]
    data: bytes
    tls: bool
    login: str | None
    mail_options: list[str] = field(default_factory=list)


class _Handler:
    def __init__(self, peer: AiosmtpdPeer, *, implicit_tls: bool) -> None:
        self.peer = peer
        self.implicit_tls = implicit_tls

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if address.split("@")[0].lower().startswith("refuse"):
            return "550 5.1.1 No such user here"
        if address.split("@")[0].lower().startswith("later"):
            return "450 4.2.1 Mailbox busy, try later"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        data = envelope.original_content or b""
        login = session.auth_data
        with self.peer.lock:
            self.peer.received.append(
                Received(
                    sender=envelope.mail_from or "",
                    recipients=list(envelope.rcpt_tos),
                    data=data,
                    tls=self.implicit_tls or session.ssl is not None,
                    login=login.decode() if isinstance(login, bytes) else login,
                    mail_options=list(envelope.mail_options),
                )
            )
            number = len(self.peer.received)
        return f"250 2.0.0 OK queued as AIO{number:05d}"


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (best effort: free when asked)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class _TLSController(Controller):
    """A controller whose readiness probe speaks implicit TLS."""

    def __init__(self, *args: Any, client_context: ssl.SSLContext, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._client_context = client_context

    def _trigger_server(self) -> None:
        with (
            socket.create_connection((self.hostname, self.port), timeout=5) as raw,
            self._client_context.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            tls.recv(1024)


class AiosmtpdPeer:
    """Two aiosmtpd servers: ``starttls_port`` and ``tls_port`` (implicit TLS).

    Recipients whose local part starts with ``refuse`` get 550, with
    ``later`` 450. ``users`` may authenticate (PLAIN, LOGIN) under TLS.
    ``smtputf8``: offer SMTPUTF8.
    """

    def __init__(
        self, workdir: Path, users: dict[str, str] | None = None, *, smtputf8: bool = True
    ) -> None:
        self.users = users if users is not None else {"alice": "s3cret"}
        self.received: list[Received] = []
        self.lock = threading.Lock()
        self.ca = trustme.CA()
        cert = self.ca.issue_cert("localhost", "127.0.0.1", "::1")
        self.ca_pem = workdir / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_pem))
        self.server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(self.server_context)
        client_context = ssl.create_default_context()
        self.ca.configure_trust(client_context)
        common: dict[str, Any] = {
            "hostname": "127.0.0.1",
            "authenticator": self._authenticate,
            "auth_require_tls": True,
            "enable_SMTPUTF8": smtputf8,
            "data_size_limit": None,
        }
        self.starttls_port = free_port()
        self._starttls = Controller(
            _Handler(self, implicit_tls=False),
            port=self.starttls_port,
            tls_context=self.server_context,
            **common,
        )
        self.tls_port = free_port()
        # aiosmtpd only counts STARTTLS as TLS; on the implicit-TLS port the
        # whole session is encrypted, so AUTH may be offered from the start.
        self._tls = _TLSController(
            _Handler(self, implicit_tls=True),
            port=self.tls_port,
            ssl_context=self.server_context,
            client_context=client_context,
            **{**common, "auth_require_tls": False},
        )

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        if isinstance(data, LoginPassword):
            user, password = data.login.decode(), data.password.decode()
            if self.users.get(user) == password:
                return AuthResult(success=True, auth_data=user)
        return AuthResult(success=False, handled=False)

    def start(self) -> AiosmtpdPeer:
        self._starttls.start()
        self._tls.start()
        return self

    def stop(self) -> None:
        for controller in (self._starttls, self._tls):
            with contextlib.suppress(AssertionError):  # never started
                controller.stop()

    def __enter__(self) -> AiosmtpdPeer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
