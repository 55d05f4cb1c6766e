"""The relay passes the client's BODY and SMTPUTF8 on as it got them (a real
``twistd smtprelay`` and an aiosmtpd smarthost that records MAIL FROM's
parameters)."""

from __future__ import annotations

import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.test_relay_e2e import intake_ca, relay_args  # noqa: F401
from tools.peers.aiosmtpd_peer import AiosmtpdPeer, Received, free_port
from tools.peers.relay_process import RelayProcess, wait_for


def parameters(received: Received) -> list[str]:
    """The MAIL FROM parameters but SIZE (which the relay always adds)."""
    return [o for o in received.mail_options if not o.upper().startswith("SIZE")]


def by_subject(peer: AiosmtpdPeer) -> dict[str, Received]:
    out = {}
    for received in peer.received:
        if b"Subject: " in received.data:
            subject = received.data.split(b"Subject: ")[1].split(b"\r\n")[0]
            out[subject.decode("utf-8")] = received
    return out


def message(subject: str, body: str = "plain text") -> bytes:
    return f"Subject: {subject}\r\n\r\n{body}\r\n".encode()


def run_relay(tmp_path: Path, peer: AiosmtpdPeer) -> RelayProcess:
    return RelayProcess(tmp_path, free_port(), relay_args(tmp_path, peer))


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[AiosmtpdPeer]:
    with AiosmtpdPeer(tmp_path) as running:
        yield running


@pytest.fixture
def relay(
    tmp_path: Path,
    peer: AiosmtpdPeer,
    intake_ca: trustme.CA,  # noqa: F811
) -> Iterator[RelayProcess]:
    with run_relay(tmp_path, peer) as running:
        yield running


def test_body_and_smtputf8_pass_through(relay: RelayProcess, peer: AiosmtpdPeer) -> None:
    sent = {
        "none": [],
        "7bit": ["BODY=7BIT"],
        "8bit": ["BODY=8BITMIME"],
        "utf8": ["SMTPUTF8"],
        "utf8 8bit": ["SMTPUTF8", "BODY=8BITMIME"],
    }
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        for subject, options in sent.items():
            body = "naïve" if "8bit" in subject else "plain"
            data = message(subject, body)
            assert client.sendmail("a@example.com", ["b@example.org"], data, options) == {}
        # Non-ASCII: an address (SMTPUTF8 needed), and a UTF-8 header.
        assert client.sendmail("jörg@example.com", ["b@example.org"], message("utf8 address"),
                               ["SMTPUTF8"]) == {}  # fmt: skip
        assert client.sendmail("a@example.com", ["b@example.org"], message("Grüße"),
                               ["SMTPUTF8", "BODY=8BITMIME"]) == {}  # fmt: skip
    wait_for(lambda: len(peer.received) == 7, 15, "every message delivered")
    got = {subject: parameters(r) for subject, r in by_subject(peer).items()}
    assert got == {
        "none": [],  # not BODY=8BITMIME, which the smarthost offers
        "7bit": [],  # 7BIT is what no BODY says
        "8bit": ["BODY=8BITMIME"],
        "utf8": ["SMTPUTF8"],
        "utf8 8bit": ["SMTPUTF8", "BODY=8BITMIME"],
        "utf8 address": ["SMTPUTF8"],
        "Grüße": ["SMTPUTF8", "BODY=8BITMIME"],
    }
    assert by_subject(peer)["utf8 address"].sender == "jörg@example.com"


@pytest.fixture
def ascii_peer(tmp_path: Path) -> Iterator[AiosmtpdPeer]:
    with AiosmtpdPeer(tmp_path, smtputf8=False) as running:
        yield running


def test_smtputf8_to_a_next_hop_without_it(
    tmp_path: Path,
    ascii_peer: AiosmtpdPeer,
    intake_ca: trustme.CA,  # noqa: F811
) -> None:
    """RFC 6531 §3.2: what needs SMTPUTF8 bounces (5.6.7) at a next hop
    without it; an SMTPUTF8 message that needs nothing of it goes on without."""
    peer = ascii_peer
    with run_relay(tmp_path, peer) as relay:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
            options = ["SMTPUTF8", "BODY=8BITMIME"]
            assert client.sendmail("a@example.com", ["b@example.org"], message("ascii"),
                                   options) == {}  # fmt: skip
            assert client.sendmail("a@example.com", ["b@example.org"], message("Grüße"),
                                   options) == {}  # fmt: skip
            assert client.sendmail("a@example.com", ["jörg@example.org"],
                                   message("utf8 address"), options) == {}  # fmt: skip
        wait_for(lambda: len(peer.received) == 3, 15, "one delivery and two bounces")
        ascii_message = by_subject(peer)["ascii"]
        assert parameters(ascii_message) == ["BODY=8BITMIME"]
        bounces = [r for r in peer.received if r.sender in ("", "<>")]
        assert len(bounces) == 2 and all(r.recipients == ["a@example.com"] for r in bounces)
        for bounce in bounces:
            assert b"Status: 5.6.7" in bounce.data and b"Action: failed" in bounce.data
            assert b"needs SMTPUTF8, which the server does not offer" in bounce.data
        assert any(b"UTF-8 header" in r.data for r in bounces)
        assert any(b"non-ASCII address" in r.data for r in bounces)
        queue = relay.spool / "queue"
        wait_for(lambda: not list(queue.glob("*.msg")), 10, "an empty queue")


def test_an_smtputf8_envelope_reaches_the_next_hop_as_received(
    relay: RelayProcess, peer: AiosmtpdPeer
) -> None:
    """RFC 6531: domains in U-labels are not turned into A-labels for a next hop
    that offers SMTPUTF8 (one given in A-labels stays so), and one that IDNA 2008
    refuses is not refused (553 before)."""
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        refused = client.sendmail(
            "jörg@bücher.example",
            ["zoë@bücher.example", "ann@xn--bcher-kva.example", "bo@☃.example"],
            message("idn"), ["SMTPUTF8"],
        )  # fmt: skip
        assert refused == {}
    wait_for(lambda: len(peer.received) == 1, 15, "the message delivered")
    [got] = peer.received
    assert got.sender == "jörg@bücher.example"
    # ☃ is no IDNA 2008 label, but RFC 6531 lets an SMTPUTF8 envelope carry it.
    assert got.recipients == ["zoë@bücher.example", "ann@xn--bcher-kva.example", "bo@☃.example"]
