"""Keys, signers and a dkimpy verifier shared by the DKIM tests."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from twisted.internet.interfaces import IConsumer, IProducer
from zope.interface import implementer

from tests.conftest import on_the_wire
from txcolombe.client.body import Body
from txcolombe.client.signing import signed_replayable
from txcolombe.codec.dkim import DKIMSigner

DOMAIN = "example.test"


def pem(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@functools.cache
def rsa_pem(bits: int = 2048) -> bytes:
    return pem(rsa.generate_private_key(public_exponent=65537, key_size=bits))


@functools.cache
def ed25519_pem() -> bytes:
    return pem(ed25519.Ed25519PrivateKey.generate())


def signer(algorithm: str, canonicalization: str = "relaxed/relaxed", **options: Any) -> DKIMSigner:
    """A signer for :data:`DOMAIN` whose selector names the algorithm."""
    key = rsa_pem() if algorithm == "rsa" else ed25519_pem()
    return DKIMSigner(DOMAIN, algorithm, key, canonicalization=canonicalization, **options)


def records(signers: Iterable[DKIMSigner]) -> dict[str, bytes]:
    """The TXT records of ``signers``, by name (with the final dot)."""
    return {f"{s.selector}._domainkey.{s.domain}.": s.dns_record().encode() for s in signers}


def verify(message: bytes, signers: Iterable[DKIMSigner], index: int = 0) -> bool:
    """dkimpy's verdict on signature ``index`` of ``message`` (as received)."""
    published = records(signers)

    def txt(name: bytes, timeout: int = 5) -> bytes | None:
        return published.get(name.decode())

    verifier = dkim.DKIM(message)
    try:
        return bool(verifier.verify(idx=index, dnsfunc=txt))
    except dkim.DKIMException:  # e.g. a broken or expired signature
        return False


def verify_all(message: bytes, signers: list[DKIMSigner]) -> list[bool]:
    return [verify(message, signers, index) for index in range(len(signers))]


@implementer(IConsumer)
class Collect:
    """A consumer that keeps what it is given."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass


async def signed_message(body: Body, signers: list[DKIMSigner]) -> bytes:
    """The signed message as a server stores it (line breaks as sent)."""
    replayable = await signed_replayable(body, signers)
    try:
        consumer = Collect()
        await replayable.producer().startProducing(consumer)
    finally:
        replayable.close()
    return on_the_wire(bytes(consumer.data))
