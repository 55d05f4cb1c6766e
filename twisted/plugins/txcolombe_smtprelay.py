"""The ``twistd smtprelay`` plugin (see docs/relay.md)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, NoReturn

from twisted.application.service import IService, IServiceMaker
from twisted.plugin import IPlugin
from twisted.python import usage
from zope.interface import implementer

from txcolombe.relay.options import Options

#: The exit status of every configuration mistake.
USAGE_EXIT = 2


def _fail(error: object) -> NoReturn:
    """One line on stderr and exit status 2: no traceback, no ``--help`` dump."""
    sys.stderr.write(f"twistd smtprelay: {error}\n")
    sys.stderr.flush()
    raise SystemExit(USAGE_EXIT)


class TwistdOptions(Options):
    """:class:`Options` as twistd parses them: a mistake ends the process at once.

    twistd answers a usage error with the whole ``--help`` and status 1; and
    it writes its pid file after parsing, so the spool lock is taken here,
    before twistd touches the pid file, the log file or any socket.
    """

    def parseOptions(self, options: list[str] | None = None) -> None:
        from txcolombe.relay.options import check_free, listen_description
        from txcolombe.relay.service import lock_spool

        try:
            super().parseOptions(options)  # type: ignore[no-untyped-call]
            lock_spool(Path(self["spool"]))
            for description in self["listen"]:
                check_free(listen_description(self, description), "--listen")
            if self["metrics"]:
                check_free(self["metrics"], "--metrics")
        except usage.UsageError as error:
            _fail(error)


@implementer(IServiceMaker, IPlugin)
class _RelayServiceMaker:
    tapname = "smtprelay"
    description = "A durable SMTP relay (txcolombe): spool with fsync, retries, bounces."
    options = TwistdOptions

    def makeService(self, options: Any) -> IService:
        from txcolombe.relay.service import make_service

        try:
            return make_service(options)
        except usage.UsageError as error:
            # twistd only catches usage errors from parseOptions; a late one
            # would otherwise be a traceback.
            _fail(error)


smtprelay = _RelayServiceMaker()
