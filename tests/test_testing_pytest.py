"""txcolombe's pytest plugin: the ``smtp`` and ``smtp_server`` fixtures.

These tests use no import of the plugin: the fixtures come from the plugin
registration (the ``pytest11`` entry point, or tests/conftest.py in a
checkout that was not reinstalled). Everything runs on the fake clock, so
no reactor runs, except in the one pytest-twisted test that shows both mix.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

import txcolombe
from txcolombe import Authentication
from txcolombe.codec.errors import AuthenticationRequired, MailboxBusy, ResponseTimeout
from txcolombe.codec.reply import Reply
from txcolombe.testing import MemorySMTP, MemorySMTPServer

ROOT = Path(__file__).resolve().parent.parent
MESSAGE = b"Subject: Your order\r\n\r\nIt has shipped.\r\n"


def notify(smtp: MemorySMTP, customer: str, **options: object) -> object:
    """Code under test: mail a customer, on whatever reactor it is given."""
    return txcolombe.sendmail(
        "mx.example.org",
        "shop@example.com",
        [customer],
        MESSAGE,
        domain="shop.example.com",
        trust_root=smtp.trust_root,
        reactor=smtp.reactor,
        **options,
    )


def test_smtp_fixture_records_the_message(smtp: MemorySMTP) -> None:
    receipt = smtp.run(notify(smtp, "bob@example.org"))
    transaction = smtp.assert_sent(recipients=["bob@example.org"], subject="Your order")
    assert transaction.sender == "shop@example.com"
    assert transaction.data == MESSAGE and transaction.tls
    assert receipt.accepted.keys() == {"bob@example.org"}
    smtp.assert_clean()


def test_each_test_gets_a_fresh_network(smtp: MemorySMTP, smtp_server: MemorySMTPServer) -> None:
    assert smtp.server is smtp_server
    assert smtp.server.transactions == [] and smtp.connections == []
    assert smtp.reactor.seconds() == 0


def test_assertions_fail_with_what_was_received(smtp: MemorySMTP) -> None:
    smtp.assert_nothing_sent()
    with pytest.raises(AssertionError, match="received: nothing"):
        smtp.assert_sent()
    smtp.run(notify(smtp, "bob@example.org"))
    smtp.run(notify(smtp, "carol@example.org"))
    with pytest.raises(AssertionError, match=r"2 message\(s\) match subject='Your order'"):
        smtp.assert_sent(subject="Your order")
    with pytest.raises(AssertionError, match=re.escape("<shop@example.com> -> <bob@example.org>")):
        smtp.assert_nothing_sent()
    assert smtp.assert_sent(contains="shipped", recipients=["carol@example.org"])
    with pytest.raises(AssertionError, match="no message"):
        smtp.assert_sent(tls=False)


def test_errors_are_raised_by_run(smtp: MemorySMTP) -> None:
    smtp.server.script("MAIL", Reply.of(450, "4.2.1 mailbox busy"))
    with pytest.raises(MailboxBusy) as caught:
        smtp.run(notify(smtp, "bob@example.org"))
    assert caught.value.code == 450 and caught.value.temporary
    smtp.assert_nothing_sent()


def test_run_moves_the_clock_only_when_told(smtp: MemorySMTP) -> None:
    smtp.server.script("RCPT", Reply.of(250, "2.1.5 slowly"), delay=60)
    d = notify(smtp, "bob@example.org")
    with pytest.raises(AssertionError, match="has not fired"):
        smtp.run(d)
    assert smtp.reactor.seconds() == 0
    smtp.run(d, advance=120)
    assert smtp.reactor.seconds() == 60  # stopped as soon as it was done
    smtp.assert_sent(recipients=["bob@example.org"])


def test_a_hung_server_ends_in_a_timeout(smtp: MemorySMTP) -> None:
    smtp.server.script("DATA", None)
    with pytest.raises(ResponseTimeout):
        smtp.run(notify(smtp, "bob@example.org"), advance=3600)
    smtp.assert_nothing_sent()
    smtp.assert_clean()


def test_react_runs_a_main_function(smtp: MemorySMTP) -> None:
    async def main(reactor: object, customer: str) -> str:
        receipt = await txcolombe.sendmail(
            "mx.example.org",
            "shop@example.com",
            [customer],
            MESSAGE,
            domain="shop.example.com",
            trust_root=smtp.trust_root,
            reactor=reactor,
        )
        return receipt.queue_id or ""

    assert smtp.react(main, ["dave@example.org"]) == "MEM000001"
    assert smtp.react(lambda reactor: 42) == 42
    smtp.assert_sent(recipients=["dave@example.org"])


class TestOverriddenServer:
    """Overriding ``smtp_server`` configures the server ``smtp`` uses."""

    @pytest.fixture
    def smtp_server(self) -> MemorySMTPServer:
        return MemorySMTPServer(users={"shop": "pw"}, require_auth=True)

    def test_auth_required(self, smtp: MemorySMTP) -> None:
        with pytest.raises(AuthenticationRequired):
            smtp.run(notify(smtp, "bob@example.org"))
        smtp.run(notify(smtp, "bob@example.org", authentication=Authentication("shop", "pw")))
        assert smtp.assert_sent(auth="shop").recipients == ("bob@example.org",)


@pytest_twisted.ensureDeferred
async def test_with_pytest_twisted_and_the_real_reactor(smtp: MemorySMTP) -> None:
    # The real reactor runs this test; the mail still goes in memory.
    await deferLater(reactor, 0, lambda: None)
    d = notify(smtp, "bob@example.org")
    smtp.flush()
    receipt = await d
    assert receipt.queue_id == "MEM000001"
    smtp.assert_sent(recipients=["bob@example.org"])


def test_loading_the_plugin_installs_no_reactor() -> None:
    # pytest loads entry-point plugins before pytest-twisted installs the
    # reactor it was asked for (--reactor): the plugin must not install one,
    # and it leaves txcolombe.testing (OpenSSL, the fake reactor) to the fixtures.
    code = (
        "import sys, txcolombe.testing.pytest_plugin; "
        "print('twisted.internet.reactor' in sys.modules, "
        "any('txcolombe.testing.' + m in sys.modules"
        " for m in ('server', 'transport', 'network', 'ca', 'trial')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


def test_the_plugin_loads_by_name_in_a_fresh_pytest(tmp_path: Path) -> None:
    (tmp_path / "test_user.py").write_text(
        textwrap.dedent(
            """
            import txcolombe

            def test_uses_the_fixture(smtp):
                d = txcolombe.sendmail("192.0.2.7", "a@example.com", ["b@example.org"],
                                       b"hi\\r\\n", starttls=False, domain="c.example.com",
                                       reactor=smtp.reactor)
                smtp.run(d)
                assert smtp.assert_sent(recipients=["b@example.org"]).tls is False
            """
        )
    )
    # -p no:txcolombe: whether or not the entry point is installed, load it by module name.
    args = ["-p", "no:txcolombe", "-p", "txcolombe.testing.pytest_plugin", "-p", "no:cacheprovider"]
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", *args, "test_user.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert "1 passed" in out.stdout, out.stdout + out.stderr
