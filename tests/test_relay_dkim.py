"""The relay DKIM-signs what its own clients send (real ``twistd smtprelay``
processes, aiosmtpd as the smarthost, dkimpy and OpenDKIM as verifiers)."""

from __future__ import annotations

import json
import smtplib
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
import trustme

from tests.dkim_support import DOMAIN, ed25519_pem, pem, rsa_pem, signer, verify
from tests.test_dkim_opendkim import OpenDKIM, opendkim_fixture  # noqa: F401 - a fixture
from tests.test_relay_config import assert_one_line_exit_2, run_twistd
from tests.test_relay_e2e import intake_ca, peer, relay_args, split_received  # noqa: F401
from tests.test_relay_signals import hup_and_wait
from tools.peers.aiosmtpd_peer import AiosmtpdPeer, free_port
from tools.peers.relay_process import RelayProcess, wait_for
from txcolombe.codec.dkim import DKIMSigner
from txcolombe.relay.options import Options
from txcolombe.relay.signing import KeySpec, RelaySigning, from_domain, load_keys
from txcolombe.relay.spool import Spool
from txcolombe.server.machine import ServerEnvelope

#: The relay's keys for DOMAIN (selectors as in tests.dkim_support.signer).
DUAL = [signer("rsa"), signer("ed25519")]


def message(sender: str = f"alice@{DOMAIN}", body: bytes = b"Hello.\r\n") -> bytes:
    return (
        f"From: Alice <{sender}>\r\nTo: bob@example.org\r\nSubject: signed\r\n"
        "Message-ID: <1@example.test>\r\n\r\n"
    ).encode() + body


def key_args(tmp_path: Path) -> list[str]:
    (tmp_path / "rsa.pem").write_bytes(rsa_pem())
    (tmp_path / "ed25519.pem").write_bytes(ed25519_pem())
    return [
        f"--dkim={DOMAIN}:rsa:{tmp_path / 'rsa.pem'}",
        f"--dkim={DOMAIN}:ed25519:{tmp_path / 'ed25519.pem'}",
    ]


@pytest.fixture
def relay(
    tmp_path: Path,
    peer: AiosmtpdPeer,  # noqa: F811
    intake_ca: trustme.CA,  # noqa: F811
) -> Iterator[RelayProcess]:
    """Loopback is a relay network (the default); two keys for DOMAIN."""
    args = relay_args(tmp_path, peer, "--max-size=2000000", *key_args(tmp_path))
    with RelayProcess(tmp_path, free_port(), args) as running:
        yield running


@pytest.fixture
def strict_relay(
    tmp_path: Path,
    peer: AiosmtpdPeer,  # noqa: F811
    intake_ca: trustme.CA,  # noqa: F811
) -> Iterator[RelayProcess]:
    """Loopback is not a relay network: only AUTH lets a client relay."""
    args = relay_args(tmp_path, peer, "--relay-network=192.0.2.0/24", *key_args(tmp_path))
    with RelayProcess(tmp_path, free_port(), args) as running:
        yield running


def send(
    relay: RelayProcess, data: bytes, *, login: bool = False, rcpt: str = "b@example.org"
) -> None:
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=20) as client:
        if login:
            client.starttls(
                context=ssl.create_default_context(cafile=str(relay.workdir / "relay-ca.pem"))
            )
            client.login("bob", "hunter2")
        assert client.sendmail(f"alice@{DOMAIN}", [rcpt], data) == {}


def delivered(peer: AiosmtpdPeer, count: int = 1) -> bytes:  # noqa: F811
    wait_for(lambda: len(peer.received) >= count, 20, "the delivery")
    return peer.received[count - 1].data


def signatures(data: bytes) -> int:
    return data.count(b"\r\nDKIM-Signature:") + data.startswith(b"DKIM-Signature:")


def test_relay_network_mail_is_signed_over_the_received_line(
    relay: RelayProcess,
    peer: AiosmtpdPeer,  # noqa: F811
) -> None:
    send(relay, message())
    data = delivered(peer)
    assert data.startswith(b"DKIM-Signature: v=1; a=rsa-sha256;")
    assert signatures(data) == 2
    assert [verify(data, DUAL, index) for index in (0, 1)] == [True, True]
    # The signatures stand above the relay's Received line, and nothing else changed.
    after = data[data.index(b"\r\nReceived: ") + 2 :]
    received, rest = split_received(after)
    assert b"by relay.test" in received and rest == message()
    # Tampering with what the relay sent breaks both.
    tampered = data.replace(b"Hello.", b"Hullo.")
    assert [verify(tampered, DUAL, index) for index in (0, 1)] == [False, False]


def test_authenticated_mail_is_signed_and_others_are_not(
    strict_relay: RelayProcess,
    peer: AiosmtpdPeer,  # noqa: F811
) -> None:
    send(strict_relay, message(), login=True)
    data = delivered(peer)
    assert signatures(data) == 2 and verify(data, DUAL, 0) and verify(data, DUAL, 1)
    # Without AUTH, from outside the relay networks: only local mail is taken,
    # and it leaves unsigned although its From domain has keys.
    send(strict_relay, message(), rcpt="postmaster")
    data = delivered(peer, 2)
    assert [r.lower() for r in peer.received[1].recipients] == ["postmaster"]
    assert signatures(data) == 0 and data.startswith(b"Received: ")


def test_only_the_exact_from_domain_is_signed(
    relay: RelayProcess,
    peer: AiosmtpdPeer,  # noqa: F811
) -> None:
    send(relay, message("carol@other.test"))
    send(relay, message(f"dave@sub.{DOMAIN}"))
    send(relay, message(f"erin@{DOMAIN.upper()}"))
    wait_for(lambda: len(peer.received) == 3, 20, "three deliveries")
    by_from = {m.data.split(b"From: Alice <")[1].split(b">")[0]: m.data for m in peer.received}
    assert signatures(by_from[b"carol@other.test"]) == 0
    assert signatures(by_from[f"dave@sub.{DOMAIN}".encode()]) == 0
    upper = by_from[f"erin@{DOMAIN.upper()}".encode()]  # domains compare case-blind
    assert signatures(upper) == 2 and verify(upper, DUAL, 0) and verify(upper, DUAL, 1)


def test_streamed_and_already_signed_mail(
    relay: RelayProcess,
    peer: AiosmtpdPeer,  # noqa: F811
) -> None:
    """A message over 64 KiB is spooled as it arrives and hashed on the way;
    one already signed (by the author's own key) gets the relay's on top."""
    big = message(body=b"".join(b"line %06d of a long body\r\n" % n for n in range(20000)))
    author = DKIMSigner(DOMAIN, "author", pem_of_new_key())
    presigned = author.signature(*_split(message()))
    send(relay, big)
    send(relay, presigned + message())
    wait_for(lambda: len(peer.received) == 2, 20, "two deliveries")
    streamed, resigned = sorted((m.data for m in peer.received), key=len, reverse=True)
    assert len(streamed) > 500_000
    assert signatures(streamed) == 2 and verify(streamed, DUAL, 0) and verify(streamed, DUAL, 1)
    assert signatures(resigned) == 3
    everyone = [*DUAL, author]
    assert [verify(resigned, everyone, index) for index in range(3)] == [True, True, True]


def pem_of_new_key() -> bytes:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return pem(ed25519.Ed25519PrivateKey.generate())


def _split(data: bytes) -> tuple[bytes, bytes]:
    """A message's header block and relaxed body hash (for a signature made here)."""
    from txcolombe.codec.dkim import BodyHasher

    head, _, body = data.partition(b"\r\n\r\n")
    hasher = BodyHasher("relaxed")
    hasher.update(body)
    return head + b"\r\n", hasher.digest()


@pytest.mark.parametrize("size", [2000, 200_000], ids=["in memory", "streamed"])
def test_the_signature_is_made_once_and_kept_in_the_spool(
    tmp_path: Path,
    peer: AiosmtpdPeer,  # noqa: F811
    intake_ca: trustme.CA,  # noqa: F811
    size: int,
) -> None:
    """Signed at intake and stored: a relay restarted without the keys (the
    smarthost was down before) still sends the signatures made at intake."""
    data = message(body=(b"x" * 70 + b"\r\n") * (size // 72))
    closed = [f"--smarthost=127.0.0.1:{free_port()}", "--min-backoff=600"]
    args = relay_args(tmp_path, peer, "--max-size=2000000", *key_args(tmp_path))
    port = free_port()
    with RelayProcess(tmp_path, port, [*args, *closed]) as first:
        send(first, data)
        wait_for(lambda: " deferred " in first.control("list").stdout, 20, "a deferral")
        (queued,) = json.loads(first.control("--json", "list").stdout)
        shown = json.loads(first.control("--json", "show", queued["id"]).stdout)
        assert shown["headers"].startswith("DKIM-Signature: v=1; a=rsa-sha256;")
    assert not peer.received
    again = relay_args(tmp_path, peer, "--max-size=2000000")
    with RelayProcess(tmp_path, port, again) as second:
        assert second.control("flush").returncode == 0
        got = delivered(peer)
    assert signatures(got) == 2 and verify(got, DUAL, 0) and verify(got, DUAL, 1)


def test_sighup_changes_the_key_and_a_broken_one_keeps_the_old(
    tmp_path: Path,
    peer: AiosmtpdPeer,  # noqa: F811
    intake_ca: trustme.CA,  # noqa: F811
) -> None:
    key = tmp_path / "key.pem"
    key.write_bytes(ed25519_pem())
    (tmp_path / "relay.toml").write_text(
        f'[[dkim]]\ndomain = "{DOMAIN}"\nselector = "ed25519"\nkey = "{key}"\n'
    )
    args = relay_args(tmp_path, peer, f"--config={tmp_path / 'relay.toml'}")
    old = signer("ed25519")
    new_pem = pem_of_new_key()
    new = DKIMSigner(DOMAIN, "ed25519", new_pem)
    with RelayProcess(tmp_path, free_port(), args) as relay:
        send(relay, message())
        first = delivered(peer, 1)
        assert verify(first, [old]) and not verify(first, [new])
        key.write_bytes(new_pem)
        hup_and_wait(relay, "reloaded:")
        send(relay, message())
        second = delivered(peer, 2)
        assert verify(second, [new]) and not verify(second, [old])
        key.write_bytes(b"not a key")
        hup_and_wait(relay, "reload failed")
        assert relay.log_text().count("reload failed") == 1
        send(relay, message())
        third = delivered(peer, 3)
        assert verify(third, [new])


@pytest_twisted.ensureDeferred
async def test_opendkim_verifies_what_the_relay_signed(
    relay: RelayProcess,
    peer: AiosmtpdPeer,  # noqa: F811
    opendkim: OpenDKIM,
) -> None:
    send(relay, message("alice@example.test", "Grüße\r\n".encode()))
    data = delivered(peer)
    assert await opendkim.results(data, DUAL) == {"rsa": "pass", "ed25519": "pass"}


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("example.test:sel", "expected DOMAIN:SELECTOR:KEYFILE"),
        ("not_a domain:sel:{key}", "is not a valid domain"),
        ("localhost:sel:{key}", "is not a valid domain"),
        ("example.test:-bad-:{key}", "is not a valid selector"),
        ("example.test:sel:{missing}", "No such file or directory"),
        ("example.test:sel:{directory}", "Is a directory"),
        ("example.test:sel:{garbage}", "not a PEM private key"),
    ],
)
def test_a_bad_dkim_option_is_one_line_exit_2(tmp_path: Path, spec: str, expected: str) -> None:
    (tmp_path / "key.pem").write_bytes(ed25519_pem())
    (tmp_path / "garbage.pem").write_bytes(b"not a key\n")
    paths = {
        "key": tmp_path / "key.pem",
        "missing": tmp_path / "missing.pem",
        "directory": tmp_path,
        "garbage": tmp_path / "garbage.pem",
    }
    result = run_twistd(tmp_path, f"--spool={tmp_path / 'spool'}", f"--dkim={spec.format(**paths)}")
    line = assert_one_line_exit_2(result)
    assert expected in line and "--dkim" in line, line


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('dkim = ["example.test:sel:{missing}"]', "No such file or directory"),
        ('dkim = [{{domain = "example.test", selector = "sel"}}]', "dkim entries are"),
        ('dkim = [{{domain = "a b", selector = "sel", key = "{key}"}}]', "not a valid domain"),
        ("dkim = 3", "dkim entries are"),
    ],
)
def test_a_bad_dkim_config_entry_is_one_line_exit_2(
    tmp_path: Path, value: str, expected: str
) -> None:
    (tmp_path / "key.pem").write_bytes(ed25519_pem())
    config = tmp_path / "relay.toml"
    config.write_text(value.format(key=tmp_path / "key.pem", missing=tmp_path / "no.pem") + "\n")
    result = run_twistd(tmp_path, f"--spool={tmp_path / 'spool'}", f"--config={config}")
    assert expected in assert_one_line_exit_2(result)


def test_dkim_in_the_config_file_and_the_command_line_wins(tmp_path: Path) -> None:
    (tmp_path / "rsa.pem").write_bytes(rsa_pem())
    (tmp_path / "ed.pem").write_bytes(ed25519_pem())
    config = tmp_path / "relay.toml"
    config.write_text(
        f'dkim = ["Example.TEST:rsa:{tmp_path / "rsa.pem"}",\n'
        f'        {{domain = "bücher.example", selector = "ed", key = "{tmp_path / "ed.pem"}"}}]\n'
    )
    options = Options()
    options.parseOptions([f"--config={config}"])
    assert options["dkim"] == [
        KeySpec("example.test", "rsa", str(tmp_path / "rsa.pem")),
        KeySpec("xn--bcher-kva.example", "ed", str(tmp_path / "ed.pem")),
    ]
    keys = load_keys(options["dkim"])
    assert [s.algorithm for s in keys["example.test"]] == ["rsa-sha256"]
    assert [s.algorithm for s in keys["xn--bcher-kva.example"]] == ["ed25519-sha256"]
    options = Options()
    options.parseOptions([f"--config={config}", f"--dkim=other.test:s:{tmp_path / 'ed.pem'}"])
    assert [str(spec) for spec in options["dkim"]] == [f"other.test:s:{tmp_path / 'ed.pem'}"]


def _envelope(authenticated: str | None, client: str) -> ServerEnvelope:
    return ServerEnvelope(None, (), "client.test", client, "ESMTP", False, authenticated)


def test_the_policy_and_streaming_in_any_chunks() -> None:
    """Streamed signing equals whole-message signing (Ed25519 is deterministic),
    whatever the chunks; the policy signs own clients' mail only."""
    ed = signer("ed25519")
    policy = RelaySigning({DOMAIN: [ed]}, lambda address: address == "10.0.0.1")
    whole = b"Received: from x\r\n\tby relay.test\r\n" + message(body=b"a \r\n\r\n\r\n")
    own = _envelope(None, "10.0.0.1")
    expected = policy.sign(own, whole)
    assert expected.startswith(b"DKIM-Signature:") and verify(expected + whole, [ed])
    for size in (1, 2, 3, 7, 64):
        stream = policy.stream(own)
        assert stream is not None
        for start in range(0, len(whole), size):
            stream.write(whole[start : start + size])
        assert stream.finish() == expected
    assert policy.sign(_envelope("bob", "192.0.2.9"), whole) == expected
    assert policy.sign(_envelope(None, "192.0.2.9"), whole) == b""
    assert policy.stream(_envelope(None, "192.0.2.9")) is None
    two_froms = b"From: a@example.test\r\n" + whole
    assert policy.sign(own, two_froms) == b""
    headers_only = b"From: a@example.test\r\nSubject: s"
    stream = policy.stream(own)
    assert stream is not None
    stream.write(headers_only)
    assert verify(stream.finish() + headers_only, [ed])
    assert RelaySigning({}, lambda address: True).stream(own) is None


@pytest.mark.parametrize(
    ("head", "domain"),
    [
        (b"From: Alice <a@Example.TEST>\r\nTo: b@x.org\r\n", "example.test"),
        (b'Received: x\r\n\tFrom: c@evil.test\r\nFrom:\r\n  "Al, ice" <a@ex.test>\r\n', "ex.test"),
        (b"FROM : a@ex.test\r\n", "ex.test"),
        ("From: Jörg <jörg@bücher.example>\r\n".encode(), "xn--bcher-kva.example"),
        (b"From: =?utf-8?q?J=C3=B6rg?= <j@ex.test>\n", "ex.test"),
        (b"From: a@ex.test\r\nFrom: b@ex.test\r\n", None),
        (b"From: a@ex.test, b@ex.test\r\n", None),
        (b"From: undisclosed\r\n", None),
        (b"Subject: no From\r\n", None),
    ],
)
def test_the_from_domain(head: bytes, domain: str | None) -> None:
    assert from_domain(head) == domain


def test_a_state_file_without_its_message_goes_at_start(tmp_path: Path) -> None:
    """A streamed message's signatures are stored (state file) before its
    message file: a crash in between leaves a state file alone, removed at start."""
    queue = tmp_path / "queue"
    queue.mkdir(parents=True)
    (queue / "A.state").write_text("{}")
    (queue / "B.state").write_text("{}")
    (queue / "B.msg").write_bytes(b"")
    spool = Spool(tmp_path, inline=True)
    spool.start()
    try:
        assert sorted(p.name for p in queue.iterdir()) == ["B.msg", "B.state"]
    finally:
        spool.stop()  # inline: synchronous
