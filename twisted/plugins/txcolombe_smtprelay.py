"""The ``twistd smtprelay`` plugin (see docs/relay.md)."""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService, IServiceMaker
from twisted.plugin import IPlugin
from zope.interface import implementer

from txcolombe.relay.options import Options


@implementer(IServiceMaker, IPlugin)
class _RelayServiceMaker:
    tapname = "smtprelay"
    description = "A durable SMTP relay (txcolombe): spool with fsync, retries, bounces."
    options = Options

    def makeService(self, options: Any) -> IService:
        from txcolombe.relay.service import make_service

        return make_service(options)


smtprelay = _RelayServiceMaker()
