"""DKIM signing (RFC 6376; Ed25519-SHA256 per RFC 8463), sans-I/O and streamed.

:class:`DKIMSigner` holds a domain, a selector, a private key and the
signing choices. :class:`MessageSigner` is fed a message in chunks of any
size: it keeps the header block (needed whole to sign it) and hashes the
body as it goes, through one :class:`BodyHasher` per body canonicalisation,
so that a body of any size is signed in constant memory. ``finish()``
returns the ``DKIM-Signature`` header fields to put in front of the message.

Why not dkimpy: it signs a whole message held in memory. Only the body
hash needs streaming; dkimpy still verifies what this module signs, in the
tests.

Line breaks are hashed as they are sent: DATA's encoder
(:mod:`txcolombe.codec.data`) turns every lone CR or LF into CRLF and ends
an unterminated body with CRLF, and so do these hashers. A BINARYMIME body
(sent untouched) must therefore already use CRLF line breaks to verify.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import idna
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from txcolombe.codec.errors import InvalidArgument, InvalidBody, UsageError

__all__ = ["DEFAULT_HEADERS", "OVERSIGNED", "BodyHasher", "DKIMSigner", "MessageSigner"]

#: Header fields signed when present (RFC 6376 §5.4.1's list, less the
#: trace and resent fields that relays add or change).
DEFAULT_HEADERS = (
    "From", "Sender", "Reply-To", "Subject", "Date", "Message-ID", "To", "Cc",
    "MIME-Version", "Content-Type", "Content-Transfer-Encoding", "Content-ID",
    "Content-Description", "In-Reply-To", "References", "List-Id", "List-Help",
    "List-Unsubscribe", "List-Unsubscribe-Post", "List-Subscribe", "List-Post",
    "List-Owner", "List-Archive",
)  # fmt: skip
#: Signed once more than they occur, so that adding one breaks the signature.
OVERSIGNED = ("From", "To", "Subject", "Date", "Message-ID")

#: The largest header block kept in memory to be signed.
MAX_HEADER_BLOCK = 1024 * 1024

_CANONICALIZATIONS = ("simple", "relaxed")
_LINE_BREAK = re.compile(rb"\r\n|\r|\n")
_WSP_RUN = re.compile(rb"[ \t]+")
_CRLF = b"\r\n"
_CRLF_BLOCK = _CRLF * 32768


class _LineBreaks:
    """Turn lone CRs and LFs into CRLF across chunks, as DATA's encoder does."""

    def __init__(self) -> None:
        self._skip_lf = False

    def feed(self, chunk: bytes) -> bytes:
        if self._skip_lf and chunk:
            # The previous chunk ended in CR, already given as CRLF.
            self._skip_lf = False
            if chunk.startswith(b"\n"):
                chunk = chunk[1:]
        if not chunk:
            return b""
        self._skip_lf = chunk.endswith(b"\r")
        breaks = chunk.count(_CRLF)
        if chunk.count(b"\n") != breaks or chunk.count(b"\r") != breaks:
            chunk = _LINE_BREAK.sub(_CRLF, chunk)
        return chunk


class BodyHasher:
    """The canonical body hash (RFC 6376 §3.4.3, §3.4.4), fed in chunks.

    Constant memory whatever the body: trailing CRLFs are counted, not kept
    (empty lines at the end of the body are not hashed), and in relaxed mode
    at most one pending space is carried to the next chunk (it is dropped if
    the line ends there).
    """

    def __init__(self, canonicalization: str = "relaxed") -> None:
        if canonicalization not in _CANONICALIZATIONS:
            raise InvalidArgument(f"unknown body canonicalization {canonicalization!r}")
        self._relaxed = canonicalization == "relaxed"
        self._hash = hashlib.sha256()
        self._lines = _LineBreaks()
        self._space = False  # relaxed: a WSP run ends the text so far
        self._crlfs = 0  # CRLFs held back: they may end the body
        self._content = False  # something but empty lines was hashed
        self._digest: bytes | None = None

    def update(self, chunk: bytes) -> None:
        """Hash the next ``chunk`` of the body."""
        self.update_normalized(self._lines.feed(bytes(chunk)))

    def update_normalized(self, data: bytes) -> None:
        """Hash the next chunk, whose line breaks are all CRLF already (and
        which does not end inside one): :class:`MessageSigner` normalises
        once for all its hashers."""
        if self._digest is not None:
            raise UsageError("the body hash is already computed")
        if not data:
            return
        if self._relaxed:
            if self._space:
                data = b" " + data
            # WSP runs to one SP with bytes methods (a regex is 10x slower).
            data = data.replace(b"\t", b" ")
            while b"  " in data:
                data = data.replace(b"  ", b" ")
            data = data.replace(b" \r\n", _CRLF)
            self._space = data.endswith(b" ")
            if self._space:
                data = data[:-1]
        self._emit(data)

    def _emit(self, data: bytes) -> None:
        """Hash ``data``, holding back its trailing CRLFs."""
        end = len(data)
        while end >= 2 and data[end - 2 : end] == _CRLF:
            end -= 2
        if end == 0:
            self._crlfs += len(data) // 2
            return
        self._flush_crlfs()
        self._hash.update(memoryview(data)[:end])
        self._crlfs = (len(data) - end) // 2
        self._content = True

    def _flush_crlfs(self) -> None:
        while self._crlfs:
            count = min(self._crlfs, len(_CRLF_BLOCK) // 2)
            self._hash.update(_CRLF_BLOCK[: 2 * count])
            self._crlfs -= count

    def digest(self) -> bytes:
        """The SHA-256 of the canonical body; the body ends here."""
        if self._digest is None:
            if self._content or not self._relaxed:
                # Relaxed: an empty body hashes as nothing. Otherwise the
                # body ends with exactly one CRLF (the trailing space of an
                # unterminated last line is dropped, as the CRLF that DATA
                # adds ends that line).
                self._hash.update(_CRLF)
            self._digest = self._hash.digest()
        return self._digest


@dataclass(frozen=True)
class _Field:
    name: bytes
    raw: bytes  # the whole field, folded as it is, with its final CRLF

    def canonical(self, relaxed: bool) -> bytes:
        """The field as hashed, with its final CRLF (RFC 6376 §3.4.1, §3.4.2)."""
        if not relaxed:
            return self.raw
        value = self.raw.partition(b":")[2].replace(_CRLF, b"")
        value = _WSP_RUN.sub(b" ", value).strip(b" ")
        return self.name.rstrip(b" \t").lower() + b":" + value + _CRLF


def _fields(block: bytes) -> list[_Field]:
    """The header fields of a CRLF-normalised header block."""
    fields: list[_Field] = []
    for line in block.split(_CRLF)[:-1]:
        if line[:1] in (b" ", b"\t") and fields:
            last = fields[-1]
            fields[-1] = _Field(last.name, last.raw + line + _CRLF)
        else:
            fields.append(_Field(line.partition(b":")[0], line + _CRLF))
    return fields


def _load_key(
    private_key: bytes | str | os.PathLike[str],
) -> rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey:
    if isinstance(private_key, bytes | bytearray):
        pem = bytes(private_key)
    elif isinstance(private_key, str) and private_key.lstrip().startswith("-----BEGIN"):
        pem = private_key.encode("ascii")  # PEM text, not a path (never quoted in errors)
    else:
        try:
            pem = Path(private_key).read_bytes()
        except OSError as error:
            raise UsageError(f"cannot read the DKIM key {private_key}: {error.strerror}") from None
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as error:
        raise UsageError(f"not a PEM private key without a password: {error}") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < 1024:
            raise UsageError(
                f"an RSA DKIM key needs 1024 bits or more (RFC 8301), not {key.key_size}"
            )
        return key
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    raise UsageError(f"DKIM keys are RSA or Ed25519, not {type(key).__name__}")


def _pieces(tags: Sequence[str]) -> list[tuple[str, str]]:
    """Each tag as ``(separator, text)`` pieces; ``h=`` may fold after a colon."""
    pieces: list[tuple[str, str]] = []
    for tag in tags:
        if tag.startswith("h="):
            names = tag.split(":")
            pieces.append((" ", names[0] + ":" if len(names) > 1 else names[0]))
            pieces.extend(("", name + ":") for name in names[1:-1])
            if len(names) > 1:
                pieces.append(("", names[-1]))
        else:
            pieces.append((" ", tag))
    return pieces


def _fold(tags: Sequence[str], signature: str) -> bytes:
    """``DKIM-Signature: tag; tag; ...; b=...`` folded before 78 columns."""
    lines: list[str] = []
    line = "DKIM-Signature:"
    for separator, text in _pieces([*tags, "b="]):
        if len(line) + len(separator) + len(text) > 76 and line.strip():
            lines.append(line)
            line, separator = "", " "
        line += separator + text
    rest = signature
    room = max(76 - len(line), 0)
    line, rest = line + rest[:room], rest[room:]
    while rest:
        lines.append(line)
        line, rest = " " + rest[:75], rest[75:]
    lines.append(line)
    return "\r\n".join(lines).encode("ascii") + _CRLF


class DKIMSigner:
    """Signs messages for ``domain`` with the key published at ``selector``.

    :param private_key: a PEM private key (RSA of 1024 bits or more, or
        Ed25519), as bytes (or PEM text) or as the path of a file.
    :param canonicalization: ``"header/body"``, each ``relaxed`` or
        ``simple`` (one name sets both; the body defaults to ``simple``
        as for ``c=``).
    :param headers: the header fields signed when present
        (:data:`DEFAULT_HEADERS` by default).
    :param oversign: fields signed once more than they occur, so that one
        added later breaks the signature (:data:`OVERSIGNED` by default).
    :param identity: the ``i=`` tag (an address at or below ``domain``).
    :param timestamp: add ``t=`` (the signing time).
    :param expiration: seconds after signing when the signature expires
        (``x=``; implies ``t=``).
    :param clock: the time in seconds since the epoch, for ``t=``/``x=``.
    :raises UsageError: an unreadable, encrypted or unsupported key, or an
        invalid option.
    """

    def __init__(
        self,
        domain: str,
        selector: str,
        private_key: bytes | str | os.PathLike[str],
        *,
        canonicalization: str = "relaxed/relaxed",
        headers: Iterable[str] | None = None,
        oversign: Iterable[str] = OVERSIGNED,
        identity: str | None = None,
        timestamp: bool = False,
        expiration: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        header_c, _, body_c = canonicalization.lower().partition("/")
        body_c = body_c or "simple"
        if header_c not in _CANONICALIZATIONS or body_c not in _CANONICALIZATIONS:
            raise UsageError(f"invalid DKIM canonicalization {canonicalization!r}")
        if not domain or not selector:
            raise UsageError("a DKIM signer needs a domain and a selector")
        if expiration is not None and expiration <= 0:
            raise UsageError("the DKIM expiration must be a positive number of seconds")
        if identity is not None:
            identity_domain = identity.rpartition("@")[2].lower().rstrip(".")
            own = domain.lower().rstrip(".")
            if identity_domain != own and not identity_domain.endswith("." + own):
                raise UsageError(f"the DKIM identity {identity!r} is not within {domain!r}")
        self.domain = domain if domain.isascii() else idna.encode(domain, uts46=True).decode()
        self.selector = selector
        self.header_canonicalization = header_c
        self.body_canonicalization = body_c
        self.identity = identity
        self.timestamp = timestamp or expiration is not None
        self.expiration = expiration
        self._clock = clock
        self._key = _load_key(private_key)
        self._headers = [h.lower() for h in (DEFAULT_HEADERS if headers is None else headers)]
        self._oversign = {h.lower() for h in oversign}
        if "from" not in self._headers:
            raise UsageError("DKIM signs the From field: it must be in the signed headers")

    @property
    def algorithm(self) -> str:
        """``rsa-sha256`` or ``ed25519-sha256``, from the key."""
        return (
            "ed25519-sha256" if isinstance(self._key, ed25519.Ed25519PrivateKey) else "rsa-sha256"
        )

    def dns_record(self) -> str:
        """The TXT record to publish at ``selector._domainkey.domain``."""
        public = self._key.public_key()
        if isinstance(public, ed25519.Ed25519PublicKey):
            raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            return f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode()}"
        der = public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"

    def signature(self, header_block: bytes, body_hash: bytes) -> bytes:
        """The ``DKIM-Signature`` field (with its CRLF) for a message.

        :param header_block: the message's header fields, CRLF line breaks,
            without the empty line that ends them.
        :param body_hash: :meth:`BodyHasher.digest` of its body, hashed with
            this signer's body canonicalization.
        :raises InvalidBody: the message has no ``From`` field.
        """
        fields = _fields(header_block)
        relaxed = self.header_canonicalization == "relaxed"
        signed, names = self._select(fields)
        if not any(f.name.strip(b" \t").lower() == b"from" for f in signed):
            raise InvalidBody("a DKIM-signed message needs a From header field")
        tags = [
            "v=1",
            f"a={self.algorithm}",
            f"c={self.header_canonicalization}/{self.body_canonicalization}",
            f"d={self.domain}",
            f"s={self.selector}",
        ]
        if self.identity is not None:
            tags.append(f"i={self.identity}")
        if self.timestamp:
            now = int(self._clock())
            tags.append(f"t={now}")
            if self.expiration is not None:
                tags.append(f"x={now + max(1, round(self.expiration))}")
        tags.append("h=" + ":".join(names))
        tags.append(f"bh={base64.b64encode(body_hash).decode()};")
        tags = [tag if tag.endswith(";") else tag + ";" for tag in tags]
        unsigned = _Field(b"DKIM-Signature", _fold(tags, ""))
        data = b"".join(f.canonical(relaxed) for f in signed)
        data += unsigned.canonical(relaxed)[:-2]  # hashed without its CRLF
        return _fold(tags, base64.b64encode(self._sign(data)).decode())

    def _select(self, fields: list[_Field]) -> tuple[list[_Field], list[str]]:
        """The fields to sign, bottom-up per name (RFC 6376 §5.4.2), and ``h=``."""
        by_name: dict[str, list[_Field]] = {}
        for field in fields:
            by_name.setdefault(field.name.strip(b" \t").lower().decode("latin-1"), []).append(field)
        signed: list[_Field] = []
        names: list[str] = []
        for name in dict.fromkeys(self._headers):
            present = by_name.get(name, [])
            signed.extend(reversed(present))
            count = len(present) + (name in self._oversign)
            names.extend([name] * count)
        return signed, names

    def _sign(self, data: bytes) -> bytes:
        if isinstance(self._key, ed25519.Ed25519PrivateKey):
            # RFC 8463: Ed25519 over the SHA-256 of the data.
            return self._key.sign(hashlib.sha256(data).digest())
        return self._key.sign(data, padding.PKCS1v15(), hashes.SHA256())


class MessageSigner:
    """Fed a whole message in chunks; :meth:`finish` gives its signatures.

    Keeps the header block (up to :data:`MAX_HEADER_BLOCK` octets) and one
    :class:`BodyHasher` per body canonicalization the signers use.
    """

    def __init__(self, signers: Sequence[DKIMSigner]) -> None:
        if not signers:
            raise UsageError("no DKIM signer")
        self._signers = list(signers)
        self._lines = _LineBreaks()
        self._head = bytearray()
        self._header_block: bytes | None = None
        self._hashers = {
            s.body_canonicalization: BodyHasher(s.body_canonicalization) for s in signers
        }

    def feed(self, chunk: bytes) -> None:
        """The next ``chunk`` of the message."""
        data = self._lines.feed(bytes(chunk))
        if self._header_block is not None:
            self._hash(data)
            return
        start = max(len(self._head) - 3, 0)
        self._head += data
        if self._head.startswith(_CRLF):
            end = 0  # no header fields at all
        else:
            found = self._head.find(b"\r\n\r\n", start)
            end = found + 2 if found >= 0 else len(self._head)
            if end > MAX_HEADER_BLOCK:
                raise InvalidBody(f"the header block is longer than {MAX_HEADER_BLOCK} octets")
            if found < 0:
                return
        self._header_block = bytes(self._head[:end])
        body = bytes(self._head[end + 2 :])
        self._head = bytearray()
        self._hash(body)

    def _hash(self, data: bytes) -> None:
        for hasher in self._hashers.values():
            hasher.update_normalized(data)

    def finish(self) -> bytes:
        """The ``DKIM-Signature`` fields, one per signer, in the signers' order."""
        if self._header_block is None:
            # Only header fields (perhaps without a final line break).
            head = bytes(self._head)
            if head and not head.endswith(_CRLF):
                head += _CRLF
            self._header_block = head
        return b"".join(
            s.signature(self._header_block, self._hashers[s.body_canonicalization].digest())
            for s in self._signers
        )
