"""txcolombe.testing.SMTPTestMixin in a trial TestCase (pytest runs it too).

Run with trial: ``trial tests.test_testing_trial`` (from the repository root).
"""

from __future__ import annotations

import unittest
from typing import Any

from twisted.internet.error import ConnectionRefusedError
from twisted.trial.unittest import SynchronousTestCase, TestCase

import txcolombe
from txcolombe import Authentication
from txcolombe.codec.errors import (
    AuthenticationFailed,
    ConnectionRefused,
    MailboxUnavailable,
    NoSuchDomain,
    ProcessingError,
    RecipientsRefused,
    ResponseTimeout,
    SMTPError,
)
from txcolombe.codec.reply import Reply
from txcolombe.testing import MemorySMTPServer, SMTPTestMixin, Transaction

MESSAGE = b"From: alice@example.com\r\nSubject: Welcome\r\n\r\nHello Bob.\r\n"


def send(test: SMTPTestMixin, *recipients: str, **options: Any) -> Any:
    """sendmail() through the test's fake network: only ``reactor=`` points it there."""
    options.setdefault("trust_root", test.smtp.trust_root)
    options.setdefault("domain", "client.example.com")
    return txcolombe.sendmail(
        "mx.example.org",
        "alice@example.com",
        list(recipients or ["bob@example.org"]),
        MESSAGE,
        reactor=test.smtp.reactor,
        **options,
    )


class MixinTests(SMTPTestMixin, TestCase):
    def test_each_test_has_a_fresh_server(self) -> None:
        self.assertEqual(self.smtp.server.transactions, [])
        self.assertEqual(self.smtp.connections, [])

    def test_sendmail_reaches_the_server_through_the_reactor_alone(self) -> None:
        receipt = self.smtpResult(send(self))
        transaction = self.assertMailSent(
            sender="alice@example.com", recipients=["bob@example.org"], subject="Welcome"
        )
        self.assertIsInstance(transaction, Transaction)
        self.assertEqual(transaction.data, MESSAGE)
        self.assertTrue(transaction.tls)
        self.assertEqual(transaction.helo, "client.example.com")
        self.assertEqual(receipt.queue_id, transaction.queue_id)
        self.assertIsNotNone(receipt.tls)
        # the connection went through the fake reactor's connectTCP (name resolved in memory)
        [(host, port, *_)] = self.smtp.reactor.tcpClients
        self.assertEqual((host, port), ("127.0.0.1", 25))
        self.assertSMTPClean()

    def test_assert_mail_sent_fails_when_nothing_or_several_match(self) -> None:
        with self.assertRaises(self.failureException) as caught:
            self.assertMailSent(recipients=["bob@example.org"])
        self.assertIn("the server received: nothing", str(caught.exception))
        self.smtpResult(send(self))
        self.smtpResult(send(self))
        with self.assertRaises(self.failureException) as caught:
            self.assertMailSent(subject="Welcome")
        self.assertIn("2 message(s) match subject='Welcome'", str(caught.exception))
        with self.assertRaises(self.failureException):
            self.assertMailSent(recipients=["carol@example.org"])
        with self.assertRaises(self.failureException):
            self.assertMailSent(contains=b"Goodbye")
        self.assertEqual(len(self.smtp.server.transactions), 2)

    def test_assert_no_mail_sent(self) -> None:
        self.assertNoMailSent()
        self.smtpResult(send(self))
        with self.assertRaises(self.failureException) as caught:
            self.assertNoMailSent()
        self.assertIn("<alice@example.com> -> <bob@example.org>", str(caught.exception))

    def test_assert_smtp_error_checks_type_and_code(self) -> None:
        self.smtp.server.script("MAIL", Reply.of(451, "4.3.0 try later"))
        error = self.assertSMTPError(send(self), ProcessingError, code=451)
        self.assertTrue(error.temporary)
        self.smtp.server.script("RCPT", Reply.of(550, "5.1.1 no such user"))
        refused = self.assertSMTPError(send(self), RecipientsRefused)
        self.assertIsInstance(refused, RecipientsRefused)
        self.assertEqual(refused.refused["bob@example.org"].code, 550)  # type: ignore[attr-defined]
        self.assertNoMailSent()
        self.smtp.server.script("MAIL", Reply.of(550, "5.7.1 go away"))
        with self.assertRaises(self.failureException):  # wrong code
            self.assertSMTPError(send(self), MailboxUnavailable, code=551)
        with self.assertRaises(self.failureException):  # it succeeds
            self.assertSMTPError(send(self))
        self.smtp.server.script("MAIL", Reply.of(451, "4.3.0 try later"))
        with self.assertRaises(ProcessingError):  # another error type goes through
            self.assertSMTPError(send(self), MailboxUnavailable)

    def test_smtp_result_fails_if_the_conversation_waits_on_the_clock(self) -> None:
        self.smtp.server.script("MAIL", None)  # the server never answers MAIL
        d = send(self)
        with self.assertRaises(self.failureException) as caught:
            self.smtpResult(d)
        self.assertIn("has not fired", str(caught.exception))
        # letting fake time pass: the 5-minute MAIL timeout, then 10 s for QUIT
        self.assertSMTPError(d, ResponseTimeout, advance=400)
        self.assertSMTPClean()

    def test_assert_smtp_clean_sees_an_open_session(self) -> None:
        session = self.smtpResult(
            txcolombe.connect(
                "mx.example.org",
                trust_root=self.smtp.trust_root,
                domain="client.example.com",
                reactor=self.smtp.reactor,
            )
        )
        with self.assertRaises(self.failureException) as caught:
            self.assertSMTPClean()
        self.assertIn("1 open connection(s)", str(caught.exception))
        self.smtpResult(session.quit())
        self.assertSMTPClean()

    def test_connection_refused(self) -> None:
        self.smtp.connect_error = ConnectionRefusedError()
        # HostnameEndpoint gives up on a name after its 0.3 s attempt delay
        d = send(self)
        with self.assertRaises(self.failureException):
            self.smtpResult(d)
        self.assertSMTPError(d, ConnectionRefused, advance=1)
        self.assertEqual(self.smtp.connections, [])

    def test_deliver_with_the_memory_resolver(self) -> None:
        result = self.smtpResult(
            txcolombe.deliver(
                "alice@example.com",
                ["bob@example.org", "carol@example.net"],
                MESSAGE,
                domain="client.example.com",
                reactor=self.smtp.reactor,
                resolver=self.smtp.resolver,
            )
        )
        self.assertTrue(all(outcome.delivered for outcome in result.values()))
        self.assertMailSent(recipients=["bob@example.org"])
        self.assertMailSent(recipients=["carol@example.net"])
        self.assertIn(("example.org", "MX"), self.smtp.resolver.queries)

    def test_deliver_to_a_missing_domain(self) -> None:
        self.smtp.resolver.missing = {"nowhere.example"}
        result = self.smtpResult(
            txcolombe.deliver(
                "alice@example.com",
                ["bob@nowhere.example"],
                MESSAGE,
                domain="client.example.com",
                reactor=self.smtp.reactor,
                resolver=self.smtp.resolver,
            )
        )
        outcome = result["bob@nowhere.example"]
        self.assertFalse(outcome.delivered)
        self.assertIsInstance(outcome.error, NoSuchDomain)
        self.assertNoMailSent()

    def test_pool_reuses_one_connection(self) -> None:
        pool = txcolombe.Pool(reactor=self.smtp.reactor)
        for n in range(3):
            self.smtpResult(
                pool.send(
                    "mx.example.org",
                    "alice@example.com",
                    [f"user{n}@example.org"],
                    MESSAGE,
                    trust_root=self.smtp.trust_root,
                    domain="client.example.com",
                )
            )
        self.assertEqual(len(self.smtp.connections), 1)
        self.assertEqual(len(self.smtp.server.transactions), 3)
        self.smtpResult(pool.close())
        self.assertSMTPClean()


class ConfiguredServerTests(SMTPTestMixin, SynchronousTestCase):
    """make_smtp_server() configures the server; setUp chains to the TestCase's."""

    def make_smtp_server(self) -> MemorySMTPServer:
        return MemorySMTPServer(users={"alice": "s3cret"}, require_auth=True)

    def test_submission_with_auth(self) -> None:
        self.smtpResult(
            txcolombe.submit(
                "smtp.example.com",
                "alice@example.com",
                ["bob@example.org"],
                MESSAGE,
                authentication=Authentication("alice", "s3cret"),
                trust_root=self.smtp.trust_root,
                domain="client.example.com",
                reactor=self.smtp.reactor,
            )
        )
        transaction = self.assertMailSent(auth="alice", tls=True)
        self.assertEqual(self.smtp.connections[0].server.getHost().port, 465)
        self.assertTrue(self.smtp.connections[0].server_protocol.implicit_tls)
        self.assertEqual(transaction.recipients, ("bob@example.org",))

    def test_wrong_password(self) -> None:
        d = txcolombe.submit(
            "smtp.example.com",
            "alice@example.com",
            ["bob@example.org"],
            MESSAGE,
            authentication=Authentication("alice", "wrong"),
            trust_root=self.smtp.trust_root,
            domain="client.example.com",
            reactor=self.smtp.reactor,
        )
        error = self.assertSMTPError(d, AuthenticationFailed, code=535)
        self.assertIsInstance(error, SMTPError)
        self.assertNoMailSent()


class SetUpOrder(unittest.TestCase):
    """The mixin calls the next setUp in the MRO (here, this base's)."""

    def setUp(self) -> None:
        self.base_set_up = True


class UnittestTests(SMTPTestMixin, SetUpOrder):
    """The mixin works with the standard library's TestCase too."""

    def test_set_up_chain_and_failure_exception(self) -> None:
        self.assertTrue(self.base_set_up)
        self.assertIsNotNone(self.smtp)
        with self.assertRaises(AssertionError):
            self.assertMailSent()
