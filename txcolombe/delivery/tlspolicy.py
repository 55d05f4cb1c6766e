"""TLS for delivery to mail exchangers: the policy levels and the checked
TLS options behind them.

The levels are Postfix's (``smtp_tls_security_level``):

- ``none``: never STARTTLS;
- ``may``: STARTTLS when offered, certificate not required to verify
  (RFC 7435, opportunistic security), plaintext when the handshake fails;
- ``encrypt``: STARTTLS required, certificate not required to verify;
- ``verify``: STARTTLS required, and the certificate must chain to a trusted
  root and name the exchanger (the MX host name, not the recipient domain).

:class:`CheckedTLS` always checks the certificate, and either enforces the
check (``verify``) or only records its result, so a delivery can say which
level it reached and why, and MTA-STS ``testing`` can log what would have
failed.
"""

from __future__ import annotations

import enum
import ipaddress

from OpenSSL import SSL, crypto
from service_identity import CertificateError, VerificationError
from service_identity.cryptography import (
    verify_certificate_hostname,
    verify_certificate_ip_address,
)
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import CertificateOptions, platformTrust
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

from txcolombe.client.connect import IOpenSSLTrustRoot
from txcolombe.client.machine import TLSMode
from txcolombe.codec.errors import UsageError

__all__ = ["CheckedTLS", "TLSLevel", "TLSPolicy"]


class TLSPolicy(enum.Enum):
    """How much TLS a delivery demands of each exchanger."""

    NONE = "none"
    MAY = "may"
    ENCRYPT = "encrypt"
    VERIFY = "verify"

    @classmethod
    def parse(cls, value: TLSPolicy | str) -> TLSPolicy:
        """Accept a member or its name (``"may"``, case-insensitive).

        :raises UsageError: anything else.
        """
        if isinstance(value, TLSPolicy):
            return value
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            names = ", ".join(member.value for member in cls)
            raise UsageError(f"unknown TLS policy {value!r} (one of {names})") from None

    @property
    def tls_mode(self) -> TLSMode:
        """The session's STARTTLS mode for this level."""
        if self is TLSPolicy.NONE:
            return TLSMode.NONE
        if self is TLSPolicy.MAY:
            return TLSMode.OPPORTUNISTIC
        return TLSMode.REQUIRED

    @property
    def enforces_certificate(self) -> bool:
        return self is TLSPolicy.VERIFY


class TLSLevel(enum.Enum):
    """The TLS a delivery actually got."""

    NONE = "none"
    """Plaintext."""
    ENCRYPTED = "encrypted"
    """TLS, with a certificate that did not verify (or was not checked)."""
    VERIFIED = "verified"
    """TLS, with a certificate that chains to a trusted root and names the host."""


_X509_ERRORS = {
    2: "unable to get issuer certificate",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    18: "self-signed certificate",
    19: "self-signed certificate in certificate chain",
    20: "unable to get local issuer certificate",
    21: "unable to verify the first certificate",
}


@implementer(IOpenSSLClientConnectionCreator)
class CheckedTLS:
    """TLS client options for one exchanger that check its certificate
    against ``hostname`` (a name, or an IP address for an address literal).

    With ``enforce`` a certificate that does not verify fails the handshake
    (an ``OpenSSL.SSL.Error``, hence a :class:`~txcolombe.codec.errors.TLSFailure`);
    without it the handshake goes on and :attr:`problem` says what was wrong.

    One instance serves one connection attempt: it records whether the
    handshake started and completed, which tells a failed handshake from a
    later failure.
    """

    def __init__(
        self,
        hostname: str,
        *,
        trust_root: IOpenSSLTrustRoot | None = None,
        enforce: bool = False,
    ) -> None:
        self.hostname = hostname
        self.enforce = enforce
        self._trust_root = trust_root
        self._ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None
        try:
            self._ip = ipaddress.ip_address(hostname.strip("[]").removeprefix("IPv6:"))
        except ValueError:
            self._ip = None
        self.started = False
        self.completed = False
        self.problem: str | None = None
        self._checked_leaf = False

    @property
    def verified(self) -> bool:
        """True once a handshake completed with a certificate that verified."""
        return self.completed and self.problem is None

    @property
    def handshake_failed(self) -> bool:
        """True when a handshake started and never completed."""
        return self.started and not self.completed

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        options = CertificateOptions(
            trustRoot=self._trust_root if self._trust_root is not None else platformTrust()  # type: ignore[no-untyped-call]
        )
        context = options.getContext()
        context.set_verify(SSL.VERIFY_PEER, self._verify)
        context.set_info_callback(self._info)
        connection = SSL.Connection(context, None)
        connection.set_app_data(tlsProtocol)
        if self._ip is None:
            connection.set_tlsext_host_name(self.hostname.encode("ascii"))
        self.started = True
        return connection

    def _verify(
        self, connection: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int
    ) -> bool:
        if not ok and self.problem is None:
            reason = _X509_ERRORS.get(errno, f"X.509 error {errno}")
            self.problem = f"certificate not trusted: {reason} (depth {depth})"
        if depth == 0 and not self._checked_leaf:
            self._checked_leaf = True
            self._check_name(cert)
        return self.problem is None or not self.enforce

    def _check_name(self, cert: crypto.X509) -> None:
        try:
            certificate = cert.to_cryptography()
            if self._ip is not None:
                verify_certificate_ip_address(certificate, str(self._ip))
            else:
                verify_certificate_hostname(certificate, self.hostname)
        except (VerificationError, CertificateError) as error:
            if self.problem is None:
                self.problem = f"certificate does not name {self.hostname} ({error})"

    def _info(self, connection: SSL.Connection, where: int, ret: int) -> None:
        if where & SSL.SSL_CB_HANDSHAKE_DONE:
            self.completed = True
