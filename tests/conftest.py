"""Shared fixtures: real SMTP servers on loopback for the integration tests.

Every server a fixture starts is stopped by that fixture, whatever the test
did. Nothing here listens anywhere but 127.0.0.1 / ::1.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from twisted.internet import ssl

from tools.peers.aiosmtpd_peer import AiosmtpdPeer

_LINE_BREAK = re.compile(rb"\r\n|\r|\n")


def on_the_wire(body: bytes) -> bytes:
    """What a server that keeps CRLF stores for ``body``, dot-unstuffed.

    Every line break becomes CRLF and a last line without one gets one: the
    only changes SMTP transport makes to a message.
    """
    data = _LINE_BREAK.sub(b"\r\n", body)
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data


def crlf(data: bytes) -> bytes:
    """``data`` with every line break as CRLF (to compare what a server stored)."""
    return _LINE_BREAK.sub(b"\r\n", data)


#: Bodies that dot-stuffing and line-ending normalisation could get wrong.
TRICKY_BODIES = {
    "leading dots": b"Subject: dots\r\n\r\n.hidden\r\n..two\r\n...three\r\nend\r\n",
    "lines of one dot": b"Subject: dot\r\n\r\n.\r\nmiddle\r\n.\r\n",
    "bare LF": b"Subject: lf\n\nline one\nline two\n.dot\n.\n",
    "bare CR and mixed": b"Subject: mixed\r\n\r\na\rb\nc\r\nd\n\r\n",
    "no final line break": b"Subject: tail\r\n\r\nno newline at the end",
    "final dot without line break": b"Subject: tail\r\n\r\n.",
    "empty lines": b"Subject: blank\r\n\r\n\r\n\r\n\r\nafter blanks\r\n",
    "only a body": b"no headers at all\r\n",
}


@pytest.fixture
def aiosmtpd_peer(tmp_path: Path) -> Iterator[AiosmtpdPeer]:
    """Two aiosmtpd servers (STARTTLS and implicit TLS), stopped after the test."""
    peer = AiosmtpdPeer(tmp_path).start()
    try:
        yield peer
    finally:
        peer.stop()


@pytest.fixture
def aiosmtpd_ca(aiosmtpd_peer: AiosmtpdPeer) -> ssl.Certificate:
    """The peer's self-signed CA, as a trust root for ``trust_root=``."""
    return ssl.Certificate.loadPEM(aiosmtpd_peer.ca.cert_pem.bytes())


# -- Postfix ------------------------------------------------------------------

#: The private Postfix's message_size_limit: room for a 20 MiB body, small
#: enough that going over it stays quick.
POSTFIX_SIZE_LIMIT = 22_000_000


@pytest.fixture(scope="session")
def postfix_ca() -> trustme.CA:
    """The CA that signed the private Postfix's certificate."""
    return trustme.CA()


@pytest.fixture(scope="session")
def postfix_trust_root(postfix_ca: trustme.CA) -> ssl.Certificate:
    """:func:`postfix_ca` as a trust root for ``trust_root=``."""
    return ssl.Certificate.loadPEM(postfix_ca.cert_pem.bytes())


@pytest.fixture(scope="session")
def postfix_peer(postfix_ca: trustme.CA) -> Iterator[Any]:
    """A private Postfix + Dovecot on loopback for the whole session (or a skip).

    Its certificate names localhost and 127.0.0.1; users alice/s3cret; every
    @example.org recipient lands in one Maildir; the size limit is
    :data:`POSTFIX_SIZE_LIMIT`.
    """
    try:
        from tools.peers import postfix_peer as peers
    except ImportError as error:
        pytest.skip(f"no Postfix peer module: {error}")
    reason = peers.available()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the Postfix tier, but: {reason}")
        pytest.skip(reason)
    # Postfix's own users must reach the work directory; pytest's tmp_path is
    # private (0700), so use a directory of our own.
    workdir = Path(tempfile.mkdtemp(prefix="txc-postfix-"))
    try:
        workdir.chmod(0o755)
        leaf = postfix_ca.issue_cert("localhost", "127.0.0.1")
        cert, key = workdir / "cert.pem", workdir / "key.pem"
        cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        key.write_bytes(leaf.private_key_pem.bytes())
        peer = peers.PostfixPeer(workdir / "peer", cert, key, message_size_limit=POSTFIX_SIZE_LIMIT)
        with peer:
            yield peer
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# -- Redis -----------------------------------------------------------------------


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Any]:
    """A private redis-server on a free loopback port (or a skip; under CI a failure)."""
    from tools.peers import redis_peer

    reason = redis_peer.available()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the Redis tests, but: {reason}")
        pytest.skip(reason)
    with redis_peer.RedisPeer(tmp_path) as server:
        yield server


def pytest_configure(config: pytest.Config) -> None:
    """Register txcolombe's pytest plugin (fixtures ``smtp``, ``smtp_server``)
    when its ``pytest11`` entry point did not (a checkout not reinstalled)."""
    import txcolombe.testing.pytest_plugin as plugin

    if not config.pluginmanager.is_registered(plugin):
        config.pluginmanager.register(plugin, "txcolombe")
