"""The ``twistd smtprelay`` plugin (see docs/relay.md)."""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService, IServiceMaker
from twisted.plugin import IPlugin
from twisted.python import usage
from zope.interface import implementer

from txcolombe.relay.options import Options


@implementer(IServiceMaker, IPlugin)
class _RelayServiceMaker:
    tapname = "smtprelay"
    description = "A durable SMTP relay (txcolombe): spool with fsync, retries, bounces."
    options = Options

    def makeService(self, options: Any) -> IService:
        from txcolombe.relay.service import make_service

        try:
            return make_service(options)
        except usage.UsageError as error:
            # twistd only catches usage errors from parseOptions; a late one
            # (a malformed credentials file...) would otherwise be a traceback.
            raise SystemExit(f"twistd smtprelay: {error}") from None


smtprelay = _RelayServiceMaker()
