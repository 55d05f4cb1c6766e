"""OpenDKIM, a verifier nobody here wrote, checks our DKIM signatures.

``opendkim -t FILE`` (test mode) verifies a message file and reports every
signature in an Authentication-Results field. It looks the public keys up
in DNS through libunbound, pointed by the test at a twisted.names
authoritative server on 127.0.0.1 (a free port) that serves the test's own
``_domainkey`` records, so the lookup is the real one, on loopback only.
Debian's opendkim and opendkim-tools come from tools/install_peers.sh; under
CI=true a missing opendkim is a failure, not a skip.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.internet import reactor as _reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.names import common, dns, server
from twisted.names.authority import FileAuthority

from tests.dkim_support import DOMAIN, pem, signed_message, signer
from tests.test_dkim import CANONICALIZATIONS, MESSAGES, SHAPES, _shape
from txcolombe.codec.dkim import DKIMSigner

reactor: Any = _reactor

pytestmark = pytest.mark.network

OPENDKIM = shutil.which("opendkim") or "/usr/sbin/opendkim"
_RESULT = re.compile(rb"dkim=(\w+)\b(.*?)header\.s=([\w.-]+)", re.S)


def _require_opendkim() -> None:
    if os.access(OPENDKIM, os.X_OK):
        return
    reason = "opendkim is not installed (run tools/install_peers.sh)"
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the OpenDKIM tests, but: {reason}")
    pytest.skip(reason)


class _KeyZone(FileAuthority):
    """The ``test.`` zone with a TXT record per published key."""

    def __init__(self) -> None:
        common.ResolverBase.__init__(self)
        self._cache: dict[Any, Any] = {}
        soa = dns.Record_SOA(mname=b"ns.test", rname=b"root.test", serial=1, minimum=60, expire=60)
        self.soa = (b"test", soa)
        self.records: dict[bytes, list[Any]] = {b"test": [soa]}

    def publish(self, dkim: DKIMSigner) -> None:
        record = dkim.dns_record().encode()
        strings = [record[i : i + 255] for i in range(0, len(record), 255)]
        name = f"{dkim.selector}._domainkey.{dkim.domain}".encode()
        self.records[name] = [dns.Record_TXT(*strings)]


@dataclass
class OpenDKIM:
    zone: _KeyZone
    config: Path
    workdir: Path

    async def results(self, message: bytes, signers: list[DKIMSigner]) -> dict[str, str]:
        """OpenDKIM's verdict per selector (``pass``, ``fail``, ...)."""
        for dkim in signers:
            self.zone.publish(dkim)
        path = self.workdir / "message.eml"
        path.write_bytes(message)
        args = ("-x", str(self.config), "-vvv", "-t", str(path))
        out, err, code = await getProcessOutputAndValue(OPENDKIM, args, env=dict(os.environ))
        assert code == 0, err.decode(errors="replace")
        report = out + err
        found = {s.decode(): verdict.decode() for verdict, _, s in _RESULT.findall(report)}
        assert found, report.decode(errors="replace")
        return found


@pytest_twisted.async_yield_fixture(name="opendkim")
async def opendkim_fixture(tmp_path: Path) -> AsyncIterator[OpenDKIM]:
    _require_opendkim()
    zone = _KeyZone()
    factory = server.DNSServerFactory(authorities=[zone])
    udp = reactor.listenUDP(0, dns.DNSDatagramProtocol(controller=factory), interface="127.0.0.1")
    # UDP only: an answer with a 2048-bit RSA key fits in one datagram.
    port = udp.getHost().port
    unbound = tmp_path / "unbound.conf"
    # libunbound: ask our server for everything, without DNSSEC validation,
    # and lift its built-in empty zone for the special-use name "test.".
    unbound.write_text(
        "server:\n"
        "  do-not-query-localhost: no\n"
        '  module-config: "iterator"\n'
        '  local-zone: "test." nodefault\n'
        "forward-zone:\n"
        '  name: "."\n'
        f"  forward-addr: 127.0.0.1@{port}\n"
    )
    config = tmp_path / "opendkim.conf"
    config.write_text(f"Mode v\nSyslog no\nResolverConfiguration {unbound}\n")
    try:
        yield OpenDKIM(zone, config, tmp_path)
    finally:
        await udp.stopListening()


#: OpenDKIM's test mode hands each field to its milter code as the MTA
#: would, value without the white space after the colon, and puts back one
#: space: under simple header canonicalization it then fails any field not
#: written "Name: value" (dkimpy verifies those). So here, one space there.
OPENDKIM_MESSAGES = {
    **MESSAGES,
    "header whitespace": (
        b"From: alice@example.test  \r\nSUBJECT: spaced \t out \r\n   again\r\n\r\nx\r\n"
    ),
}


@pytest.mark.parametrize("message", OPENDKIM_MESSAGES.values(), ids=OPENDKIM_MESSAGES.keys())
@pytest.mark.parametrize("canonicalization", CANONICALIZATIONS)
@pytest_twisted.ensureDeferred
async def test_opendkim_verifies(opendkim: OpenDKIM, canonicalization: str, message: bytes) -> None:
    dual = [signer("rsa", canonicalization), signer("ed25519", canonicalization)]
    signed = await signed_message(message, dual)
    assert await opendkim.results(signed, dual) == {"rsa": "pass", "ed25519": "pass"}


@pytest.mark.parametrize("shape", SHAPES)
@pytest_twisted.ensureDeferred
async def test_opendkim_verifies_every_body_shape(
    opendkim: OpenDKIM, shape: str, tmp_path: Path
) -> None:
    body, _ = _shape(shape, tmp_path)
    dual = [signer("rsa"), signer("ed25519", "simple/simple")]
    try:
        signed = await signed_message(body, dual)
    finally:
        if hasattr(body, "close"):
            body.close()
    assert await opendkim.results(signed, dual) == {"rsa": "pass", "ed25519": "pass"}


@pytest.mark.parametrize("canonicalization", ["relaxed/relaxed", "simple/simple"])
@pytest_twisted.ensureDeferred
async def test_opendkim_rejects_tampering(opendkim: OpenDKIM, canonicalization: str) -> None:
    dual = [signer("rsa", canonicalization), signer("ed25519", canonicalization)]
    signed = await signed_message(MESSAGES["plain"], dual)
    both_fail = {"rsa": "fail", "ed25519": "fail"}
    assert await opendkim.results(signed.replace(b"hello\r\n", b"hellO\r\n"), dual) == both_fail
    assert await opendkim.results(signed.replace(b"Subject: hello", b"Subject: hi"), dual) == (
        both_fail
    )
    added = signed.replace(b"From: Alice", b"Subject: forged\r\nFrom: Alice", 1)
    assert await opendkim.results(added, dual) == both_fail


@pytest_twisted.ensureDeferred
async def test_opendkim_sees_a_wrong_key(opendkim: OpenDKIM) -> None:
    # The record at the selector is another key's: the lookup is real.
    dkim = signer("ed25519")
    signed = await signed_message(MESSAGES["plain"], [dkim])
    other = DKIMSigner(DOMAIN, "ed25519", pem(ed25519.Ed25519PrivateKey.generate()))
    assert await opendkim.results(signed, [other]) == {"ed25519": "fail"}
