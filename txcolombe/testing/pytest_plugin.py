"""pytest fixtures for testing code that sends mail with txcolombe.

Registered as the pytest plugin ``txcolombe`` (an entry point in the
``pytest11`` group), so installing txcolombe makes these fixtures available
to every test, with no import:

- ``smtp_server``: the :class:`~txcolombe.testing.MemorySMTPServer`; override
  this fixture (in a ``conftest.py`` or a test module) to configure it;
- ``smtp``: a :class:`~txcolombe.testing.MemorySMTP` network with that server
  on it: pass ``reactor=smtp.reactor`` to the code under test, then
  ``smtp.run(deferred)`` and ``smtp.assert_sent(...)``.

::

    def test_welcome_mail(smtp):
        receipt = smtp.run(send_welcome("bob@example.org", reactor=smtp.reactor))
        smtp.assert_sent(recipients=["bob@example.org"], subject="Welcome")

Everything runs in memory on a fake clock, so these tests need no running
reactor (and no pytest-twisted). Loading this module installs no reactor
(pytest-twisted's ``--reactor`` still chooses it), and
:mod:`txcolombe.testing` is imported only when a fixture is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from txcolombe.testing import MemorySMTP, MemorySMTPServer

__all__ = ["smtp", "smtp_server"]


@pytest.fixture
def smtp_server() -> MemorySMTPServer:
    """The in-memory server of :func:`smtp`: a default
    :class:`~txcolombe.testing.MemorySMTPServer`. Override to configure it."""
    from txcolombe.testing import MemorySMTPServer

    return MemorySMTPServer()


@pytest.fixture
def smtp(smtp_server: MemorySMTPServer) -> MemorySMTP:
    """A fresh :class:`~txcolombe.testing.MemorySMTP` with :func:`smtp_server` on it."""
    from txcolombe.testing import MemorySMTP

    return MemorySMTP(smtp_server)
