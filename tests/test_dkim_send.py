"""``dkim=`` end to end: sent to aiosmtpd on loopback, the stored message verifies.

Each way of sending (sendmail, submit, Session.send, Pool.send, deliver)
signs with an RSA and an Ed25519 signer; dkimpy (and OpenDKIM once) checks
what the server received.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import ssl as twisted_ssl

from tests.dkim_support import signer, verify_all
from tests.test_dkim import MESSAGES, _big_message
from tests.test_dkim_opendkim import OpenDKIM, opendkim_fixture  # noqa: F401 - a fixture
from tools.peers.aiosmtpd_peer import AiosmtpdPeer
from txcolombe import (
    Authentication,
    InvalidBody,
    Pool,
    Timeouts,
    TLSMode,
    connect,
    deliver,
    sendmail,
    submit,
)
from txcolombe.delivery.deliver import DeliveryStatus
from txcolombe.testing import MemoryResolver

pytestmark = pytest.mark.network

QUICK = Timeouts(connect=5.0, greeting=10.0, command=10.0, data_block=10.0, data_end=30.0)
ALICE = Authentication("alice", "s3cret")
DUAL = [signer("rsa"), signer("ed25519", "simple/simple")]


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(data), 10000):
        yield data[start : start + 10000]


def _only(peer: AiosmtpdPeer) -> Any:
    [received] = peer.received
    assert received.data.count(b"DKIM-Signature:") == 2
    assert verify_all(received.data, DUAL) == [True, True]
    return received


@pytest_twisted.ensureDeferred
async def test_sendmail(aiosmtpd_peer: AiosmtpdPeer, aiosmtpd_ca: twisted_ssl.Certificate) -> None:
    await sendmail(
        "127.0.0.1",
        "alice@example.test",
        ["bob@example.org"],
        MESSAGES["trailing blank lines"],
        port=aiosmtpd_peer.starttls_port,
        trust_root=aiosmtpd_ca,
        timeouts=QUICK,
        dkim=DUAL,
    )
    _only(aiosmtpd_peer)


@pytest_twisted.ensureDeferred
async def test_submit_spools_a_one_shot_body(
    aiosmtpd_peer: AiosmtpdPeer, aiosmtpd_ca: twisted_ssl.Certificate, opendkim: OpenDKIM
) -> None:
    message = _big_message()
    await submit(
        "127.0.0.1",
        "alice@example.test",
        ["bob@example.org"],
        _chunks(message),
        port=aiosmtpd_peer.tls_port,
        trust_root=aiosmtpd_ca,
        authentication=ALICE,
        timeouts=QUICK,
        dkim=DUAL,
    )
    received = _only(aiosmtpd_peer)
    assert received.data.endswith(message)
    assert await opendkim.results(received.data, DUAL) == {"rsa": "pass", "ed25519": "pass"}


@pytest_twisted.ensureDeferred
async def test_session_send_signs_in_its_turn(
    aiosmtpd_peer: AiosmtpdPeer, aiosmtpd_ca: twisted_ssl.Certificate
) -> None:
    session = await connect(
        "127.0.0.1", port=aiosmtpd_peer.starttls_port, trust_root=aiosmtpd_ca, timeouts=QUICK
    )
    try:
        message = MESSAGES["long folded headers"]
        pieces = iter([message[:100], message[100:]])
        first = session.send("alice@example.test", ["bob@example.org"], pieces, dkim=DUAL)
        second = session.send("alice@example.test", ["carol@example.org"], b"Subject: x\r\n\r\n")
        await first
        await second
    finally:
        await session.quit()
    # Queued second, sent second: signing kept the pipeline's order.
    signed, unsigned = aiosmtpd_peer.received
    assert signed.recipients == ["bob@example.org"]
    assert verify_all(signed.data, DUAL) == [True, True]
    assert unsigned.data == b"Subject: x\r\n\r\n"


@pytest_twisted.ensureDeferred
async def test_pool_send_signs_a_file(
    aiosmtpd_peer: AiosmtpdPeer, aiosmtpd_ca: twisted_ssl.Certificate, tmp_path: Path
) -> None:
    path = tmp_path / "message.eml"
    path.write_bytes(MESSAGES["UTF-8 headers"])
    pool = Pool()
    try:
        with path.open("rb") as file:
            await pool.send(
                "127.0.0.1",
                "alice@example.test",
                ["bob@example.org"],
                file,
                dkim=DUAL,
                port=aiosmtpd_peer.starttls_port,
                trust_root=aiosmtpd_ca,
                tls_mode=TLSMode.REQUIRED,
                timeouts=QUICK,
            )
    finally:
        await pool.close()
    _only(aiosmtpd_peer)


@pytest_twisted.ensureDeferred
async def test_deliver_signs_once_for_every_domain(aiosmtpd_peer: AiosmtpdPeer) -> None:
    result = await deliver(
        "alice@example.test",
        ["bob@example.org", "carol@example.net"],
        MESSAGES["plain"],
        resolver=MemoryResolver(exchanger="mx.example.org", address="127.0.0.1"),
        port=aiosmtpd_peer.starttls_port,
        mta_sts=False,
        timeouts=QUICK,
        dkim=DUAL,
    )
    assert {o.status for o in result.values()} == {DeliveryStatus.DELIVERED}
    assert len(aiosmtpd_peer.received) == 2
    for received in aiosmtpd_peer.received:
        assert verify_all(received.data, DUAL) == [True, True]
    assert aiosmtpd_peer.received[0].data == aiosmtpd_peer.received[1].data


@pytest_twisted.ensureDeferred
async def test_a_message_without_from_is_refused_before_connecting(
    aiosmtpd_peer: AiosmtpdPeer, aiosmtpd_ca: twisted_ssl.Certificate
) -> None:
    with pytest.raises(InvalidBody, match="From"):
        await sendmail(
            "127.0.0.1",
            "alice@example.test",
            ["bob@example.org"],
            b"Subject: anonymous\r\n\r\nbody\r\n",
            port=aiosmtpd_peer.starttls_port,
            trust_root=aiosmtpd_ca,
            timeouts=QUICK,
            dkim=DUAL[0],
        )
    assert aiosmtpd_peer.received == []
