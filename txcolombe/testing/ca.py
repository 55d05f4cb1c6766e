"""The throw-away certificate authority behind the in-memory server's TLS.

Each set of host names gets one CA and one certificate it signed, made by
`trustme <https://trustme.readthedocs.io>`_ (the ``testing`` extra) and kept
for the process, so that building many servers costs one key pair.
"""

from __future__ import annotations

import functools

from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

__all__ = ["ServerTLS", "credentials"]


@functools.lru_cache(maxsize=8)
def credentials(hostnames: tuple[str, ...]) -> tuple[bytes, bytes, bytes]:
    """A new CA's certificate, and a certificate for ``hostnames`` (DNS
    names, wildcards or IP addresses) it signed with its key: all PEM."""
    import trustme

    ca = trustme.CA(organization_name="txcolombe.testing")
    leaf = ca.issue_cert(*hostnames, common_name=hostnames[0])
    return ca.cert_pem.bytes(), leaf.cert_chain_pems[0].bytes(), leaf.private_key_pem.bytes()


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """Server TLS with one certificate and its key (TLS 1.2 and later)."""

    def __init__(self, certificate_pem: bytes, key_pem: bytes) -> None:
        context = SSL.Context(SSL.TLS_METHOD)
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        context.use_certificate(x509.load_pem_x509_certificate(certificate_pem))
        context.use_privatekey(load_pem_private_key(key_pem, None))  # type: ignore[arg-type]
        self._context = context

    def serverConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        return SSL.Connection(self._context, None)
