"""DKIM signatures (txcolombe.codec.dkim, txcolombe.client.signing), verified by dkimpy.

Every signed message is checked as a server would store it (line breaks as
DATA sends them) by dkimpy's verifier, with the public keys our signers
publish; tampering must make that verifier fail.
"""

from __future__ import annotations

import email.message
import hashlib
import io
import re
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from dkim.canonicalization import Relaxed, Simple
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.task import deferLater

from tests.conftest import on_the_wire
from tests.dkim_support import (
    DOMAIN,
    Collect,
    ed25519_pem,
    rsa_pem,
    signed_message,
    signer,
    verify,
    verify_all,
)
from txcolombe import DKIMSigner
from txcolombe.client.body import IterableProducer, message_bytes
from txcolombe.client.signing import signed_body, signed_producer, signers
from txcolombe.codec.dkim import (
    DEFAULT_HEADERS,
    MAX_HEADER_BLOCK,
    OVERSIGNED,
    BodyHasher,
    MessageSigner,
)
from txcolombe.codec.errors import InvalidArgument, InvalidBody, UsageError

ALGORITHMS = ["rsa", "ed25519"]
CANONICALIZATIONS = ["relaxed/relaxed", "simple/simple", "relaxed/simple", "simple/relaxed"]

HEADERS = (
    b"From: Alice <alice@example.test>\r\n"
    b"To: bob@example.org\r\n"
    b"Subject: hello\r\n"
    b"Date: Tue, 1 Dec 2026 10:00:00 +0000\r\n"
    b"Message-ID: <1@example.test>\r\n"
)
LONG_TO = b"To: " + b",\r\n\t".join(f"user{i}@example.org".encode() for i in range(40)) + b"\r\n"

MESSAGES = {
    "plain": HEADERS + b"\r\nhello\r\n",
    "trailing blank lines": HEADERS + b"\r\nbody\r\n\r\n\r\n  \r\n\r\n",
    "only blank lines": HEADERS + b"\r\n\r\n\r\n\r\n",
    "empty body": HEADERS + b"\r\n",
    "headers only": HEADERS,
    "no final line break": HEADERS + b"\r\nno newline  ",
    "whitespace": HEADERS + b"\r\n  lead\t\tand  inner \t \r\n\t\r\nend \r\n",
    "bare LF": HEADERS.replace(b"\r\n", b"\n") + b"\nline\n\n.dot\n",
    "long folded headers": (
        HEADERS.replace(b"To: bob@example.org\r\n", LONG_TO)
        + b"X-Long: "
        + b" ".join([b"word"] * 150)
        + b"\r\nX-Folded: "
        + b"\r\n ".join([b"folded word"] * 100)
        + b"\r\n\r\nbody\r\n"
    ),
    "UTF-8 headers": (
        "From: Zoë <zoe@example.test>\r\nTo: José <jose@example.org>\r\n"
        "Subject: Grüße,   über   alles\r\n\r\nUTF-8 body: ça va\r\n"
    ).encode(),
    "every signed field": (
        HEADERS
        + b"".join(
            f"{name}: value of {name}\r\n".encode()
            for name in DEFAULT_HEADERS
            if name not in OVERSIGNED  # HEADERS has those
        )
        + b"\r\nbody\r\n"
    ),
    "header whitespace": (
        b"From:  alice@example.test  \r\nSUBJECT:\t spaced \t out \r\n   again\r\n\r\nx\r\n"
    ),
}


@pytest.mark.parametrize("message", MESSAGES.values(), ids=MESSAGES.keys())
@pytest.mark.parametrize("canonicalization", CANONICALIZATIONS)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest_twisted.ensureDeferred
async def test_dkimpy_verifies(algorithm: str, canonicalization: str, message: bytes) -> None:
    dkim = signer(algorithm, canonicalization)
    signed = await signed_message(message, [dkim])
    assert signed.startswith(b"DKIM-Signature: v=1; a=")
    assert f"c={canonicalization};".encode() in signed
    assert verify(signed, [dkim])


def _big_message() -> bytes:
    """Over 1 MiB: several chunks, with CRLFs, spaces and blank lines at their edges."""
    lines = [f"line {i:06d} {' ' * (i % 7)}\t{'x' * (i % 50)}".encode() for i in range(40000)]
    return HEADERS + b"\r\n" + b"\r\n".join(lines) + b"\r\n\r\n\r\n"


def _email_message() -> email.message.EmailMessage:
    message = email.message.EmailMessage()
    message["From"] = "Zoë <zoe@example.test>"
    message["To"] = "bob@example.org"
    message["Subject"] = "une pièce jointe"
    message.set_content("bonjour\n\n")
    message.add_attachment(b"\x00\x01" * 5000, maintype="application", subtype="octet-stream")
    return message


def _chunks(data: bytes, size: int) -> Iterator[bytes]:
    return (data[i : i + size] for i in range(0, len(data), size))


async def _agen(data: bytes) -> AsyncIterator[bytes]:
    for chunk in _chunks(data, 65537):
        yield chunk


def _shape(name: str, tmp_path: Path) -> tuple[Any, bytes]:
    """A body of kind ``name``, with the message it carries."""
    big = _big_message()
    if name in ("file", "file at an offset"):
        skip = b"X-Skipped: yes\r\n" if name == "file at an offset" else b""
        path = tmp_path / "message.eml"
        path.write_bytes(skip + big)
        file = path.open("rb")
        file.seek(len(skip))
        return file, big
    if name == "EmailMessage":
        em = _email_message()
        return em, message_bytes(em)
    bodies: dict[str, Any] = {
        "bytes": big,
        "bytearray": bytearray(big),
        "memoryview": memoryview(big),
        "BytesIO": io.BytesIO(big),
        "iterator": _chunks(big, 1000),
        "async iterator": _agen(big),
        "producer": IterableProducer(_chunks(big, 4096)),
    }
    return bodies[name], big


SHAPES = [
    "bytes",
    "bytearray",
    "memoryview",
    "file",
    "file at an offset",
    "BytesIO",
    "EmailMessage",
    "iterator",
    "async iterator",
    "producer",
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest_twisted.ensureDeferred
async def test_every_body_shape_dual_signature(shape: str, tmp_path: Path) -> None:
    body, content = _shape(shape, tmp_path)
    dual = [signer("rsa"), signer("ed25519", "simple/simple")]
    try:
        signed = await signed_message(body, dual)
    finally:
        if hasattr(body, "close"):
            body.close()
    assert signed.count(b"DKIM-Signature:") == 2
    assert signed.endswith(on_the_wire(content))
    assert verify_all(signed, dual) == [True, True]


@pytest.mark.parametrize("shape", ["file", "iterator", "EmailMessage"])
@pytest_twisted.ensureDeferred
async def test_signed_body_is_a_replayable_producer(shape: str, tmp_path: Path) -> None:
    body, content = _shape(shape, tmp_path)
    dkim = [signer("ed25519")]
    async with signed_body(body, dkim) as producer:
        first, second = Collect(), Collect()
        await producer.startProducing(first)
        await producer.startProducing(second)
        assert producer.length == len(first.data)
    if hasattr(body, "close"):
        body.close()
    assert bytes(first.data).endswith(content)
    assert first.data == second.data
    assert verify(on_the_wire(bytes(first.data)), dkim)


@pytest_twisted.ensureDeferred
async def test_signed_producer_signs_when_started() -> None:
    dkim = [signer("rsa")]
    message = MESSAGES["trailing blank lines"]
    producer = signed_producer(iter([message[:10], message[10:]]), dkim)
    consumer = Collect()
    await producer.startProducing(consumer)
    assert verify(on_the_wire(bytes(consumer.data)), dkim)


@pytest_twisted.ensureDeferred
async def test_a_signing_producer_stopped_while_sending_removes_its_spool() -> None:
    producer: Any = signed_producer(_chunks(_big_message(), 50000), [signer("ed25519")])

    class StopAtOnce(Collect):
        def write(self, data: bytes) -> None:  # spooled, hashed, now sending
            super().write(data)
            producer.stopProducing()

    consumer = StopAtOnce()
    done = producer.startProducing(consumer)
    await deferLater(reactor, 0.2)
    assert 0 < len(consumer.data) < len(_big_message())
    assert not done.called  # IBodyProducer: a stopped producer never finishes
    assert producer._replayable._file.closed


@pytest_twisted.ensureDeferred
async def test_a_signing_producer_stopped_while_hashing_sends_nothing() -> None:
    producer: Any = signed_producer(_chunks(_big_message(), 50000), [signer("ed25519")])
    consumer = Collect()
    done = producer.startProducing(consumer)
    producer.pauseProducing()
    producer.stopProducing()
    await deferLater(reactor, 0.2)
    assert consumer.data == b""
    assert not done.called
    assert producer._replayable is None  # the spool was closed when hashing stopped


@pytest_twisted.ensureDeferred
async def test_a_paused_signing_producer_waits() -> None:
    message = _big_message()
    producer: Any = signed_producer(_chunks(message, 50000), [signer("ed25519")])
    consumer = Collect()
    producer.pauseProducing()  # paused before it starts sending
    done = producer.startProducing(consumer)
    await deferLater(reactor, 0.3)
    paused_at = len(consumer.data)
    assert paused_at < len(message)
    producer.resumeProducing()
    await done
    assert verify(on_the_wire(bytes(consumer.data)), [signer("ed25519")])


@pytest_twisted.ensureDeferred
async def test_signers_from_an_iterator() -> None:
    dual = [signer("rsa"), signer("ed25519")]
    async with signed_body(MESSAGES["plain"], iter(dual)) as body:
        consumer = Collect()
        await body.startProducing(consumer)  # type: ignore[union-attr]
    assert verify_all(bytes(consumer.data), dual) == [True, True]


@pytest_twisted.ensureDeferred
async def test_without_signers_the_body_is_unchanged() -> None:
    async with signed_body(b"Subject: x\r\n\r\ny\r\n", None) as body:
        assert body == b"Subject: x\r\n\r\ny\r\n"


# -- what must fail -------------------------------------------------------------------


@pytest.mark.parametrize("canonicalization", ["relaxed/relaxed", "simple/simple"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest_twisted.ensureDeferred
async def test_tampering_fails(algorithm: str, canonicalization: str) -> None:
    dkim = [signer(algorithm, canonicalization)]
    signed = await signed_message(MESSAGES["plain"], dkim)
    assert verify(signed, dkim)
    assert not verify(signed.replace(b"hello\r\n", b"hellO\r\n"), dkim)
    assert not verify(signed.replace(b"Subject: hello", b"Subject: hallo"), dkim)
    assert not verify(signed.replace(b"alice@", b"mallory@"), dkim)
    assert not verify(signed + b"appended\r\n", dkim)


@pytest.mark.parametrize("field", [b"From", b"To", b"Subject", b"Date", b"Message-ID"])
@pytest_twisted.ensureDeferred
async def test_a_field_added_later_breaks_an_oversigned_signature(field: bytes) -> None:
    dkim = [signer("rsa")]
    signed = await signed_message(MESSAGES["plain"], dkim)
    head, _, rest = signed.partition(b"\r\n\r\n")
    # Added above the original (where a bottom-up verifier would skip it)
    # and below it.
    added_above = signed.replace(b"From: Alice", field + b": forged\r\nFrom: Alice", 1)
    added_below = head + b"\r\n" + field + b": forged\r\n\r\n" + rest
    assert not verify(added_above, dkim)
    assert not verify(added_below, dkim)


@pytest_twisted.ensureDeferred
async def test_oversigning_is_what_protects() -> None:
    plain = [signer("rsa", oversign=())]
    signed = await signed_message(MESSAGES["plain"], plain)
    h_tag = re.search(rb"h=([^;]+);", signed)
    assert h_tag is not None
    assert re.sub(rb"\s", b"", h_tag.group(1)) == b"from:subject:date:message-id:to"
    # Without over-signing, a second Subject above the signed one passes...
    forged = signed.replace(b"From: Alice", b"Subject: forged\r\nFrom: Alice", 1)
    assert verify(forged, plain)
    # ...and a field that is not signed at all may always be added.
    oversigned = [signer("rsa")]
    signed = await signed_message(MESSAGES["plain"], oversigned)
    assert verify(
        signed.replace(b"From: Alice", b"Cc: added@example.org\r\nFrom: Alice"), oversigned
    )


def test_tags() -> None:
    dkim = DKIMSigner(
        DOMAIN,
        "sel",
        ed25519_pem(),
        identity="alice@mail.example.test",
        expiration=3600,
        clock=lambda: 1_800_000_000.5,
    )
    header = MessageSigner([dkim])
    header.feed(MESSAGES["every signed field"])
    field = re.sub(rb"\r\n\s", b" ", header.finish())
    tags = dict(tag.strip().split(b"=", 1) for tag in field.split(b":", 1)[1].split(b";"))
    assert tags[b"a"] == b"ed25519-sha256"
    assert tags[b"i"] == b"alice@mail.example.test"
    assert tags[b"t"] == b"1800000000"
    assert tags[b"x"] == b"1800003600"
    assert tags[b"h"].replace(b" ", b"").split(b":").count(b"from") == 2
    assert b"l" not in tags
    assert all(len(line) <= 78 for line in header.finish().split(b"\r\n"))


@pytest.mark.parametrize("canonicalization", CANONICALIZATIONS)
def test_expired_signature_fails(canonicalization: str) -> None:
    message = MESSAGES["plain"]
    verdicts = []
    for clock in (time.time, lambda: 1_000_000_000):  # now, then in 2001
        dkim = signer("rsa", canonicalization, expiration=60, clock=clock)
        header = MessageSigner([dkim])
        header.feed(message)
        verdicts.append(verify(header.finish() + message, [dkim]))
    assert verdicts == [True, False]


def test_key_from_a_path(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    path.write_bytes(rsa_pem())
    assert DKIMSigner(DOMAIN, "sel", path).algorithm == "rsa-sha256"
    assert DKIMSigner(DOMAIN, "sel", str(path)).dns_record().startswith("v=DKIM1; k=rsa; p=")
    assert DKIMSigner(DOMAIN, "sel", ed25519_pem()).dns_record().startswith("v=DKIM1; k=ed25519;")
    assert DKIMSigner(DOMAIN, "sel", ed25519_pem().decode()).algorithm == "ed25519-sha256"


def test_bad_keys_and_options(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot read the DKIM key"):
        DKIMSigner(DOMAIN, "sel", tmp_path / "missing.pem")
    with pytest.raises(UsageError, match="not a PEM private key"):
        DKIMSigner(DOMAIN, "sel", b"-----BEGIN PRIVATE KEY-----\nnope\n")
    encrypted = serialization.load_pem_private_key(rsa_pem(), None).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    with pytest.raises(UsageError, match="not a PEM private key"):
        DKIMSigner(DOMAIN, "sel", encrypted)
    ec_key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(UsageError, match="RSA or Ed25519"):
        DKIMSigner(DOMAIN, "sel", ec_key)
    with pytest.raises(UsageError, match="canonicalization"):
        DKIMSigner(DOMAIN, "sel", rsa_pem(), canonicalization="loose/simple")
    with pytest.raises(UsageError, match="From"):
        DKIMSigner(DOMAIN, "sel", rsa_pem(), headers=["Subject"])
    with pytest.raises(UsageError, match="not within"):
        DKIMSigner(DOMAIN, "sel", rsa_pem(), identity="a@elsewhere.test")
    with pytest.raises(InvalidArgument, match="DKIMSigner"):
        signers(["not a signer"])  # type: ignore[list-item]


def test_a_message_without_from_is_refused() -> None:
    header = MessageSigner([signer("ed25519")])
    header.feed(b"Subject: no sender\r\n\r\nbody\r\n")
    with pytest.raises(InvalidBody, match="From"):
        header.finish()


def test_a_huge_header_block_is_refused() -> None:
    header = MessageSigner([signer("ed25519")])
    with pytest.raises(InvalidBody, match="header block"):
        header.feed(b"X-Filler: " + b"y" * MAX_HEADER_BLOCK + b"\r\n")


@pytest.mark.parametrize("shape", ["bytes", "iterator"])
@pytest_twisted.ensureDeferred
async def test_signing_errors_reach_the_caller(shape: str) -> None:
    huge = b"X-Filler: " + b"y" * MAX_HEADER_BLOCK + b"\r\n\r\nbody\r\n"
    body: Any = huge if shape == "bytes" else _chunks(huge, 100000)
    with pytest.raises(InvalidBody, match="header block"):
        await signed_message(body, [signer("ed25519")])


def test_internationalized_domain() -> None:
    dkim = DKIMSigner("exämple.test", "sel", ed25519_pem())
    assert dkim.domain == "xn--exmple-cua.test"


# -- the streamed body hash against dkimpy's ----------------------------------------------

BODY_BYTES = st.lists(st.sampled_from([b"a", b"b", b" ", b"\t", b"\r", b"\n", b"\r\n", b"."]))


@settings(max_examples=400, deadline=None)
@given(parts=BODY_BYTES, cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=12))
def test_body_hash_equals_dkimpys(parts: list[bytes], cuts: list[int]) -> None:
    body = b"".join(parts)
    received = on_the_wire(body)
    points = sorted({min(cut, len(body)) for cut in cuts})
    chunks = [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True)]
    for name, dkimpy in (("simple", Simple), ("relaxed", Relaxed)):
        hasher = BodyHasher(name)
        for chunk in chunks:
            hasher.update(chunk)
        expected = hashlib.sha256(dkimpy.canonicalize_body(received)).digest()
        assert hasher.digest() == expected, (name, chunks)


@settings(max_examples=100, deadline=None)
@given(
    message=st.sampled_from(list(MESSAGES.values())),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=10),
)
def test_chunking_changes_no_signature(message: bytes, cuts: list[int]) -> None:
    # Ed25519 signatures are deterministic: any split gives the same field.
    dkim = [signer("ed25519"), signer("ed25519", "simple/simple")]
    whole = MessageSigner(dkim)
    whole.feed(message)
    points = sorted({min(cut, len(message)) for cut in cuts})
    split = MessageSigner(dkim)
    for a, b in zip([0, *points], [*points, len(message)], strict=True):
        split.feed(message[a:b])
    assert split.finish() == whole.finish()
