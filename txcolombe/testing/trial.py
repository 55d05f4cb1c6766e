"""The trial (and unittest) mix-in: an in-memory SMTP server for each test."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, cast

from twisted.internet.defer import Deferred

from txcolombe.codec.errors import SMTPError
from txcolombe.testing.network import MemorySMTP
from txcolombe.testing.server import MemorySMTPServer, Transaction

__all__ = ["SMTPTestMixin"]


class SMTPTestMixin:
    """Give each test of a ``TestCase`` an in-memory SMTP server: ``self.smtp``.

    Put it before the ``TestCase`` (trial's or unittest's)::

        class SignupTests(SMTPTestMixin, TestCase):
            def make_smtp_server(self):
                return MemorySMTPServer(users={"alice": "s3cret"})

            def test_welcome_mail(self):
                d = send_welcome("bob@example.org", reactor=self.smtp.reactor)
                self.smtpResult(d)
                self.assertMailSent(recipients=["bob@example.org"], subject="Welcome")

    :ivar smtp: a fresh :class:`MemorySMTP` for each test, made in ``setUp``
        from :meth:`make_smtp_server`.
    """

    smtp: MemorySMTP

    def make_smtp_server(self) -> MemorySMTPServer:
        """The server for each test; override to configure it."""
        return MemorySMTPServer()

    def setUp(self) -> Any:
        self.smtp = MemorySMTP(self.make_smtp_server())
        return cast(Any, super()).setUp()

    def _fail(self, error: AssertionError) -> AssertionError:
        failure = getattr(self, "failureException", AssertionError)
        return cast(AssertionError, failure(str(error)))

    def smtpResult(
        self, work: Deferred[Any] | Coroutine[Any, Any, Any], advance: float = 0.0
    ) -> Any:
        """:meth:`MemorySMTP.run`: the result of ``work``, once the conversation is over."""
        try:
            return self.smtp.run(work, advance=advance)
        except AssertionError as error:
            raise self._fail(error) from None

    def assertMailSent(self, **criteria: Any) -> Transaction:
        """:meth:`MemorySMTP.assert_sent`: the one message matching ``criteria``."""
        try:
            return self.smtp.assert_sent(**criteria)
        except AssertionError as error:
            raise self._fail(error) from None

    def assertNoMailSent(self) -> None:
        """Fail if the server accepted any message."""
        try:
            self.smtp.assert_nothing_sent()
        except AssertionError as error:
            raise self._fail(error) from None

    def assertSMTPError(
        self,
        work: Deferred[Any] | Coroutine[Any, Any, Any],
        error_type: type[SMTPError] = SMTPError,
        *,
        code: int | None = None,
        advance: float = 0.0,
    ) -> SMTPError:
        """Run ``work`` and check that it fails with ``error_type`` (and ``code``).

        :returns: the error, for more checks.
        """
        try:
            result = self.smtp.run(work, advance=advance)
        except error_type as error:
            if code is not None and error.code != code:
                raise self._fail(
                    AssertionError(f"expected reply code {code}, got {error.code}: {error}")
                ) from None
            return error
        except AssertionError as error:
            raise self._fail(error) from None
        raise self._fail(
            AssertionError(f"expected {error_type.__name__}, got a result: {result!r}")
        )

    def assertSMTPClean(self) -> None:
        """:meth:`MemorySMTP.assert_clean`: no open connection, no pending timer."""
        try:
            self.smtp.assert_clean()
        except AssertionError as error:
            raise self._fail(error) from None
