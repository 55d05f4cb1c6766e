"""Self-check of the private Postfix peer, driven by Python's smtplib."""

from __future__ import annotations

import smtplib
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tools.peers.postfix_peer import PostfixPeer, available

pytestmark = [pytest.mark.postfix, pytest.mark.network]

_REASON = available()


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@pytest.fixture
def peer(tmp_path: Path, ca: trustme.CA) -> Iterator[PostfixPeer]:
    if _REASON is not None:
        pytest.skip(_REASON)
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert_pem = tmp_path / "cert.pem"
    key_pem = tmp_path / "key.pem"
    cert_pem.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    key_pem.write_bytes(cert.private_key_pem.bytes())
    with PostfixPeer(tmp_path / "peer", cert_pem, key_pem, users={"alice": "s3cret"}) as running:
        yield running


def _message(subject: str, *body: str) -> bytes:
    head = f"From: alice@example.org\r\nTo: bob@example.org\r\nSubject: {subject}\r\n\r\n"
    return (head + "".join(line + "\r\n" for line in body)).encode()


def _stored_body(message: bytes) -> list[str]:
    _, _, body = message.partition(b"\n\n")
    return body.decode().split("\n")[:-1]


def test_postfix_peer_selfcheck(peer: PostfixPeer, client_context: ssl.SSLContext) -> None:
    host = peer.host
    bodies = {
        "plain-starttls": ["line one", ".leading dot", "", "last line"],
        "smtps-plain": ["implicit TLS", "AUTH PLAIN"],
        "submission-login": ["submission", "AUTH LOGIN after STARTTLS"],
    }

    # (a) plain port, STARTTLS, no AUTH.
    with smtplib.SMTP(host, peer.ports.smtp, timeout=10) as client:
        client.ehlo()
        assert client.has_extn("starttls")
        for extension in ("pipelining", "size", "8bitmime", "smtputf8", "dsn", "chunking"):
            assert client.has_extn(extension), extension
        assert client.has_extn("enhancedstatuscodes")
        client.starttls(context=client_context)
        client.ehlo()
        client.sendmail(
            "alice@example.org",
            ["bob@example.org"],
            _message("plain-starttls", *bodies["plain-starttls"]),
        )

    # (b) implicit TLS with AUTH PLAIN, and a wrong password.
    with smtplib.SMTP_SSL(host, peer.ports.smtps, context=client_context, timeout=10) as client:
        client.ehlo()
        assert "PLAIN" in client.esmtp_features["auth"].split()
        client.user, client.password = "alice", "wrong"
        with pytest.raises(smtplib.SMTPAuthenticationError) as failed:
            client.auth("PLAIN", client.auth_plain)
        assert failed.value.smtp_code == 535
        client.user, client.password = "alice", "s3cret"
        code, _ = client.auth("PLAIN", client.auth_plain)
        assert code == 235
        client.sendmail(
            "alice@example.org",
            ["bob@example.org"],
            _message("smtps-plain", *bodies["smtps-plain"]),
        )

    # (c) submission: no AUTH before STARTTLS, AUTH LOGIN after it.
    with smtplib.SMTP(host, peer.ports.submission, timeout=10) as client:
        client.ehlo()
        assert client.has_extn("starttls")
        assert not client.has_extn("auth")
        client.starttls(context=client_context)
        client.ehlo()
        assert "LOGIN" in client.esmtp_features["auth"].split()
        # Unauthenticated submission is refused per recipient.
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            client.sendmail("alice@example.org", ["bob@example.org"], b"Subject: x\r\n\r\nx\r\n")
        assert refused.value.recipients["bob@example.org"][0] == 554
        client.user, client.password = "alice", "s3cret"
        code, _ = client.auth("LOGIN", client.auth_login)
        assert code == 235
        client.sendmail(
            "alice@example.org",
            ["bob@example.org"],
            _message("submission-login", *bodies["submission-login"]),
        )

    # Per-recipient failures and relaying are refused at RCPT.
    with smtplib.SMTP(host, peer.ports.smtp, timeout=10) as client:
        client.ehlo()
        assert client.mail("alice@example.org")[0] == 250
        assert client.rcpt("refuse-me@example.org")[0] == 550
        assert client.rcpt("later-please@example.org")[0] == 450
        assert client.rcpt("someone@elsewhere.test")[0] == 554
        client.rset()

    messages = peer.wait_for_messages(3, timeout=15)
    assert len(messages) == 3
    by_subject = {}
    for message in messages:
        assert b"\r\n" not in message
        assert message.startswith(b"Return-Path: <alice@example.org>\n")
        assert b"\nDelivered-To: bob@example.org\n" in message
        subject = next(
            line.split(b": ", 1)[1].decode()
            for line in message.split(b"\n")
            if line.startswith(b"Subject: ")
        )
        by_subject[subject] = _stored_body(message)
    assert by_subject == bodies
    assert peer.log_path.is_file()
