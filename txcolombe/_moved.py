"""The import paths of modules that moved into the layer packages keep working.

``import txcolombe.machine`` (0.1's flat layout) gives the very module now at
``txcolombe.client.machine``: nothing is copied, the old and the new name are one
module object. A module the package has imported already is entered in
:data:`sys.modules` under its old name at once (so that a later ``import
txcolombe.deliver`` cannot rebind the package's ``deliver`` function to the
module); the others are found on first use by a finder placed after every
real one.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from collections.abc import Sequence
from types import ModuleType

MOVED = {
    "txcolombe.address": "txcolombe.codec.address",
    "txcolombe.reply": "txcolombe.codec.reply",
    "txcolombe.errors": "txcolombe.codec.errors",
    "txcolombe.extensions": "txcolombe.codec.extensions",
    "txcolombe.dsn": "txcolombe.codec.dsn",
    "txcolombe.auth": "txcolombe.codec.sasl",
    "txcolombe.dotstuffing": "txcolombe.codec.data",
    "txcolombe.server.command": "txcolombe.codec.command",
    "txcolombe.machine": "txcolombe.client.machine",
    "txcolombe.protocol": "txcolombe.client.protocol",
    "txcolombe.body": "txcolombe.client.body",
    "txcolombe.connect": "txcolombe.client.connect",
    "txcolombe.session": "txcolombe.client.session",
    "txcolombe.pool": "txcolombe.client.pool",
    "txcolombe.receipt": "txcolombe.client.receipt",
    "txcolombe.api": "txcolombe.client.api",
    "txcolombe.routing": "txcolombe.delivery.routing",
    "txcolombe.dns": "txcolombe.delivery.dns",
    "txcolombe.tlspolicy": "txcolombe.delivery.tlspolicy",
    "txcolombe.mtasts": "txcolombe.delivery.mtasts",
    "txcolombe.replay": "txcolombe.client.replay",
    "txcolombe.outcome": "txcolombe.delivery.outcome",
    "txcolombe.deliver": "txcolombe.delivery.deliver",
    "txcolombe.pytest_plugin": "txcolombe.testing.pytest_plugin",
}
"""Old module path → where the module lives now."""


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old path only after every real finder has failed to."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module: ModuleType) -> None:
        """The module was executed under its new name already."""


def install() -> None:
    """Alias the modules already imported; add the finder for the rest, once."""
    for old, new in MOVED.items():
        if new in sys.modules:
            sys.modules.setdefault(old, sys.modules[new])
    if not any(isinstance(finder, _MovedFinder) for finder in sys.meta_path):
        sys.meta_path.append(_MovedFinder())
