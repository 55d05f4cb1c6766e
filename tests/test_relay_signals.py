"""SIGHUP reloads the relay's live settings (real ``twistd -n smtprelay``)."""

from __future__ import annotations

import signal
import smtplib
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.test_relay_e2e import intake_ca, peer, relay_args  # noqa: F401
from tools.peers.aiosmtpd_peer import AiosmtpdPeer, free_port
from tools.peers.relay_process import RelayProcess, wait_for
from txcolombe.relay.passwords import set_user


@pytest.fixture
def hup_relay(
    tmp_path: Path,
    peer: AiosmtpdPeer,  # noqa: F811
    intake_ca: trustme.CA,  # noqa: F811
) -> Iterator[RelayProcess]:
    """Relay networks come from a config file, so that a reload can change them."""
    (tmp_path / "relay.toml").write_text('relay_network = ["127.0.0.0/8"]\n')
    args = relay_args(tmp_path, peer, f"--config={tmp_path / 'relay.toml'}")
    with RelayProcess(tmp_path, free_port(), args) as running:
        yield running


def served_certificate(port: int, cafile: Path) -> bytes:
    """The DER certificate the relay presents after STARTTLS."""
    context = ssl.create_default_context(cafile=str(cafile))
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.starttls(context=context)
        der = client.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
    assert der is not None
    return der


def can_login(port: int, cafile: Path, user: str, password: str) -> bool:
    context = ssl.create_default_context(cafile=str(cafile))
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.starttls(context=context)
        client.ehlo("client.test")
        try:
            client.login(user, password)
        except smtplib.SMTPAuthenticationError:
            return False
        return True


def hup_and_wait(relay: RelayProcess, marker: str) -> None:
    """SIGHUP, then wait for one more ``marker`` line in the log."""
    assert relay.proc is not None
    before = relay.log_text().count(marker)
    relay.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: relay.log_text().count(marker) > before, 10, f"{marker!r} in the log")


def test_sighup_under_load_drops_nothing(
    hup_relay: RelayProcess,
    peer: AiosmtpdPeer,  # noqa: F811
) -> None:
    accepted: list[str] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def client(number: int) -> None:
        try:
            with smtplib.SMTP("127.0.0.1", hup_relay.port, timeout=20) as smtp:
                sent = 0
                while not stop.is_set() or sent < 3:
                    subject = f"c{number}m{sent}"
                    body = f"Subject: {subject}\r\n\r\nunder load\r\n".encode()
                    assert smtp.sendmail("a@example.com", ["b@example.org"], body) == {}
                    accepted.append(subject)
                    sent += 1
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for _ in range(5):
        time.sleep(0.2)
        hup_and_wait(hup_relay, "reloaded:")
    stop.set()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert hup_relay.proc is not None and hup_relay.proc.poll() is None
    wait_for(lambda: len(peer.received) >= len(accepted), 30, "every message delivered")
    delivered = {r.data.split(b"Subject: ")[1].split(b"\r\n")[0].decode() for r in peer.received}
    assert delivered == set(accepted) and len(accepted) >= 12


def test_sighup_reloads_certificate_users_networks(hup_relay: RelayProcess, tmp_path: Path) -> None:
    cafile = tmp_path / "relay-ca.pem"
    old_cert = served_certificate(hup_relay.port, cafile)
    assert can_login(hup_relay.port, cafile, "bob", "hunter2")
    # A new certificate (new CA) and key, a new users file, no trusted network.
    new_ca = trustme.CA()
    new = new_ca.issue_cert("localhost", "127.0.0.1")
    (tmp_path / "relay-cert.pem").write_bytes(b"".join(b.bytes() for b in new.cert_chain_pems))
    (tmp_path / "relay-key.pem").write_bytes(new.private_key_pem.bytes())
    new_cafile = tmp_path / "new-ca.pem"
    new_ca.cert_pem.write_to_path(str(new_cafile))
    (tmp_path / "users").unlink()
    set_user(tmp_path / "users", "carol", "correct horse")
    (tmp_path / "relay.toml").write_text('relay_network = ["192.0.2.0/24"]\n')
    hup_and_wait(hup_relay, "reloaded:")
    new_cert = served_certificate(hup_relay.port, new_cafile)
    assert new_cert != old_cert
    assert can_login(hup_relay.port, new_cafile, "carol", "correct horse")
    assert not can_login(hup_relay.port, new_cafile, "bob", "hunter2")
    with smtplib.SMTP("127.0.0.1", hup_relay.port, timeout=10) as client:
        client.ehlo("client.test")
        client.mail("a@example.com")
        code, _ = client.rcpt("b@example.org")
        assert code == 554  # loopback is no longer trusted: relaying needs AUTH
    # A broken certificate: one error line, the previous settings stay.
    (tmp_path / "relay-cert.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\ntruncated\n")
    hup_and_wait(hup_relay, "reload failed")
    errors = [line for line in hup_relay.log_text().splitlines() if "reload failed" in line]
    assert len(errors) == 1 and "Traceback" not in hup_relay.log_text()
    assert served_certificate(hup_relay.port, new_cafile) == new_cert
    assert can_login(hup_relay.port, new_cafile, "carol", "correct horse")


def implicit_tls_certificate(port: int, cafile: Path) -> bytes:
    """The DER certificate an implicit-TLS (``ssl:``) listener presents."""
    context = ssl.create_default_context(cafile=str(cafile))
    with smtplib.SMTP_SSL("127.0.0.1", port, context=context, timeout=10) as client:
        client.ehlo("client.test")
        der = client.sock.getpeercert(binary_form=True)
    assert der is not None
    return der


def test_sighup_reloads_the_implicit_tls_certificate(
    tmp_path: Path,
    peer: AiosmtpdPeer,  # noqa: F811
    intake_ca: trustme.CA,  # noqa: F811
) -> None:
    tls_port = free_port()
    args = relay_args(tmp_path, peer, f"--listen=ssl:port={tls_port}:interface=127.0.0.1")
    with RelayProcess(tmp_path, free_port(), args) as relay:
        old_cert = implicit_tls_certificate(tls_port, tmp_path / "relay-ca.pem")
        context = ssl.create_default_context(cafile=str(tmp_path / "relay-ca.pem"))
        before = smtplib.SMTP_SSL("127.0.0.1", tls_port, context=context, timeout=10)
        before.ehlo("client.test")
        new_ca = trustme.CA()
        new = new_ca.issue_cert("localhost", "127.0.0.1")
        (tmp_path / "relay-cert.pem").write_bytes(b"".join(b.bytes() for b in new.cert_chain_pems))
        (tmp_path / "relay-key.pem").write_bytes(new.private_key_pem.bytes())
        new_cafile = tmp_path / "new-ca.pem"
        new_ca.cert_pem.write_to_path(str(new_cafile))
        hup_and_wait(relay, "reloaded:")
        new_cert = implicit_tls_certificate(tls_port, new_cafile)
        assert new_cert != old_cert
        assert new_cert == served_certificate(relay.port, new_cafile)  # STARTTLS agrees
        # The session opened before the reload goes on, on its old certificate.
        assert before.sock.getpeercert(binary_form=True) == old_cert
        assert before.sendmail("a@example.com", ["b@example.org"], b"Subject: s\r\n\r\nx\r\n") == {}
        before.quit()
        wait_for(lambda: len(peer.received) == 1, 10, "the delivery")
        assert b"with ESMTPS" in peer.received[0].data
