"""DKIM signing in the relay: its keys by ``From:`` domain, and when it signs.

``--dkim DOMAIN:SELECTOR:KEYFILE`` (repeatable, or ``dkim = [...]`` in the
configuration file) gives one key per entry; the algorithm follows from the
key (RSA: ``rsa-sha256``, Ed25519: ``ed25519-sha256``), and two entries for
one domain (an RSA and an Ed25519 key) give two signatures.

The relay signs a message when its client authenticated or is in a relay
network, and the domain of its ``From:`` address is exactly a key's domain
(``sub.example.com`` is not signed by the key of ``example.com``). Mail
accepted from anyone else (for a local domain) is never signed. The
signatures are made once, at intake, over the message with the relay's
``Received:`` field, and stored with it: every attempt sends the same bytes.
"""

from __future__ import annotations

import email.utils
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.logger import Logger
from twisted.python import usage

from txcolombe.codec.address import parse_domain
from txcolombe.codec.dkim import MAX_HEADER_BLOCK, DKIMSigner, MessageSigner
from txcolombe.codec.errors import InvalidAddress, InvalidBody, UsageError
from txcolombe.server.machine import ServerEnvelope

log = Logger(namespace="txcolombe.relay")

__all__ = ["KeySpec", "RelaySigning", "StreamSigning", "load_keys", "parse_spec", "parse_specs"]

#: A selector: dot-separated labels of letters, digits and inner hyphens.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_SELECTOR = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_HEADER_END = re.compile(rb"\r?\n\r?\n")
_LINE = re.compile(rb"\r?\n")


@dataclass(frozen=True)
class KeySpec:
    """One ``--dkim`` entry: sign mail from ``domain`` with the key in ``key``."""

    domain: str
    selector: str
    key: str

    def __str__(self) -> str:
        return f"{self.domain}:{self.selector}:{self.key}"


def parse_spec(text: str) -> KeySpec:
    """``DOMAIN:SELECTOR:KEYFILE`` (the path may hold colons).

    :raises usage.UsageError: a malformed entry, domain or selector.
    """
    domain, _, rest = text.partition(":")
    selector, _, key = rest.partition(":")
    if not domain or not selector or not key:
        raise usage.UsageError(f"--dkim {text}: expected DOMAIN:SELECTOR:KEYFILE")
    return _checked(domain, selector, key, f"--dkim {text}")


def _checked(domain: str, selector: str, key: str, what: str) -> KeySpec:
    try:
        name = parse_domain(domain)
    except InvalidAddress:
        name = ""
    if not name or name.startswith("[") or "." not in name:
        raise usage.UsageError(f"{what}: {domain!r} is not a valid domain")
    if not _SELECTOR.fullmatch(selector):
        raise usage.UsageError(f"{what}: {selector!r} is not a valid selector")
    return KeySpec(name.lower(), selector, key)


def parse_specs(path: str, value: Any) -> list[KeySpec]:
    """The configuration file's ``dkim``: a string, or a list of strings and
    tables ``{domain = ..., selector = ..., key = ...}``."""
    entries = value if isinstance(value, list) else [value]
    specs: list[KeySpec] = []
    for entry in entries:
        if isinstance(entry, str):
            specs.append(parse_spec(entry))
        elif isinstance(entry, dict) and set(entry) == {"domain", "selector", "key"}:
            if not all(isinstance(v, str) for v in entry.values()):
                raise usage.UsageError(f"{path}: dkim: domain, selector and key are strings")
            specs.append(
                _checked(entry["domain"], entry["selector"], entry["key"], f"{path}: dkim")
            )
        else:
            raise usage.UsageError(
                f"{path}: dkim entries are 'domain:selector:keyfile' or tables with "
                "domain, selector and key"
            )
    return specs


def load_keys(specs: Iterable[KeySpec]) -> dict[str, list[DKIMSigner]]:
    """The signers of ``specs``, by domain (lower-case A-labels), keys read now.

    :raises usage.UsageError: a key that cannot be read or used, in one line.
    """
    keys: dict[str, list[DKIMSigner]] = {}
    for spec in specs:
        try:
            signer = DKIMSigner(spec.domain, spec.selector, spec.key)
        except UsageError as error:
            raise usage.UsageError(f"--dkim {spec}: {error}") from None
        keys.setdefault(spec.domain, []).append(signer)
    return keys


def from_domain(header_block: bytes) -> str | None:
    """The domain of the single ``From:`` address (lower-case A-labels), or None
    when there is no From, several, or one that does not parse."""
    values: list[bytearray] = []
    current: bytearray | None = None
    for line in _LINE.split(header_block):
        if line[:1] in (b" ", b"\t"):
            if current is not None:
                current += line
            continue
        current = None
        name, colon, value = line.partition(b":")
        if colon and name.rstrip(b" \t").lower() == b"from":
            current = bytearray(value)
            values.append(current)
    if len(values) != 1:
        return None
    text = bytes(values[0]).decode("utf-8", "replace")
    addresses = email.utils.getaddresses([text])
    if len(addresses) != 1 or "@" not in addresses[0][1]:
        return None
    try:
        return parse_domain(addresses[0][1].rpartition("@")[2]).lower()
    except InvalidAddress:
        return None


class RelaySigning:
    """The relay's signing policy and keys (replaced whole on SIGHUP).

    :param keys: signers by domain (:func:`load_keys`).
    :param trusted: whether a client address is in a relay network.
    """

    def __init__(
        self, keys: Mapping[str, Sequence[DKIMSigner]], trusted: Callable[[str], bool]
    ) -> None:
        self.keys = dict(keys)
        self.trusted = trusted

    def wants(self, envelope: ServerEnvelope) -> bool:
        """May this message be signed: keys exist, and its client authenticated
        or is in a relay network (mail relayed for others never is)."""
        return bool(self.keys) and (
            envelope.authenticated is not None or self.trusted(envelope.client_address)
        )

    def signers_for(self, header_block: bytes) -> list[DKIMSigner]:
        """The signers of the ``From:`` domain of a message, or none."""
        domain = from_domain(header_block)
        return list(self.keys.get(domain, ())) if domain else []

    def sign(self, envelope: ServerEnvelope, message: bytes) -> bytes:
        """The ``DKIM-Signature`` fields to put in front of ``message`` (the
        whole message as it leaves), or ``b""`` when it is not to be signed."""
        if not self.wants(envelope):
            return b""
        match = _HEADER_END.search(message, 0, MAX_HEADER_BLOCK)
        signers = self.signers_for(message[: match.end() if match else MAX_HEADER_BLOCK])
        return _signed(signers, message) if signers else b""

    def stream(self, envelope: ServerEnvelope) -> StreamSigning | None:
        """A signer fed a message as it arrives, or None when it is not to be signed."""
        return StreamSigning(self) if self.wants(envelope) else None


def _signed(signers: Sequence[DKIMSigner], message: bytes) -> bytes:
    try:
        signer = MessageSigner(signers)
        signer.feed(message)
        return signer.finish()
    except InvalidBody as error:  # an unsignable message still goes, unsigned
        log.warn("not DKIM-signed: {error}", error=str(error))
        return b""


class StreamSigning:
    """Signs a message fed in parts: keeps its header block until it is whole
    (at most :data:`~txcolombe.codec.dkim.MAX_HEADER_BLOCK` octets), then
    hashes the body as it comes, in constant memory."""

    def __init__(self, signing: RelaySigning) -> None:
        self.signing = signing
        self._head = bytearray()
        self._signer: MessageSigner | None = None
        self._done = False  # decided: nothing to sign, or the head unsignable

    def write(self, data: bytes) -> None:
        if self._done:
            return
        if self._signer is not None:
            self._feed(data)
            return
        start = max(len(self._head) - 3, 0)
        self._head += data
        match = _HEADER_END.search(self._head, start)
        if match is None and len(self._head) <= MAX_HEADER_BLOCK:
            return
        head, self._head = bytes(self._head), bytearray()
        signers = self.signing.signers_for(head[: match.end() if match else MAX_HEADER_BLOCK])
        if not signers:
            self._done = True
            return
        self._signer = MessageSigner(signers)
        self._feed(head)

    def _feed(self, data: bytes) -> None:
        assert self._signer is not None
        try:
            self._signer.feed(data)
        except InvalidBody as error:
            log.warn("not DKIM-signed: {error}", error=str(error))
            self._signer, self._done = None, True

    def finish(self) -> bytes:
        """The ``DKIM-Signature`` fields for the whole message, or ``b""``."""
        if self._done:
            return b""
        if self._signer is None:  # the message ended within its header block
            signers = self.signing.signers_for(bytes(self._head))
            return _signed(signers, bytes(self._head)) if signers else b""
        try:
            return self._signer.finish()
        except InvalidBody as error:
            log.warn("not DKIM-signed: {error}", error=str(error))
            return b""
