"""The package's layers, checked: lower layers never import higher ones.

Each sub-package of ``txcolombe`` is one layer (docs/architecture.md draws
them). The imports of every module, including those inside functions and
under ``TYPE_CHECKING``, are read from its source, so a rule broken in a
rarely run branch is caught too. The old flat import paths keep working.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import txcolombe
from txcolombe._moved import MOVED

PACKAGE = Path(txcolombe.__file__).resolve().parent
ROOT = PACKAGE.parent

ALLOWED: dict[str, set[str]] = {
    "codec": {"codec"},
    "client": {"codec", "client"},
    "server": {"codec", "server"},
    "delivery": {"codec", "client", "delivery"},
    "testing": {"codec", "client", "server", "testing"},
    "relay": {"codec", "client", "delivery", "server", "relay"},
}
"""What each layer may import of txcolombe (by sub-package)."""

SANS_IO = [
    "codec",
    "client/machine.py",
    "client/events.py",
    "client/states.py",
    "client/envelope.py",
    "client/recipients.py",
    "server/machine.py",
]
"""What must import neither Twisted nor any I/O library: the protocol as a description."""

IO_LIBRARIES = {"twisted", "OpenSSL", "service_identity", "treq", "zope", "socket", "asyncio"}

LONG_MODULES: dict[str, str] = {
    "client/machine.py": "every rule of the client's conversation in one class, like h11's"
    " _state.py; its events, state table, envelope checks and recipient splits are apart",
    "server/machine.py": "the server's whole state machine, kept in one place like h11's _state.py",
    "relay/queue.py": "per-recipient state, retries and bounces of the relay's queue",
    "delivery/deliver.py": "deliver(): per-domain routing, TLS policy and replay in one flow",
}
"""Modules allowed over 600 lines, each with its reason."""


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def imported(path: Path) -> set[str]:
    """Every module name ``path`` imports, relative imports resolved."""
    tree = ast.parse(path.read_text(), str(path))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def layer_of(name: str) -> str | None:
    parts = name.split(".")
    if parts[0] != "txcolombe":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in ALLOWED else "root"


@pytest.mark.parametrize(
    "path", [p for p in modules() if p.parent != PACKAGE], ids=lambda p: str(p.relative_to(PACKAGE))
)
def test_a_layer_imports_only_the_layers_below_it(path: Path) -> None:
    layer = path.relative_to(PACKAGE).parts[0]
    wrong = sorted(
        name
        for name in imported(path)
        if (other := layer_of(name)) is not None
        and other not in ALLOWED[layer]
        # relay/child.py finds the package's directory through txcolombe.__file__
        and not (layer == "relay" and name == "txcolombe")
    )
    assert not wrong, f"{layer} may import only {sorted(ALLOWED[layer])}: {wrong}"


@pytest.mark.parametrize("target", SANS_IO)
def test_the_protocol_core_imports_no_io(target: str) -> None:
    paths = sorted((PACKAGE / target).rglob("*.py")) if target == "codec" else [PACKAGE / target]
    for path in paths:
        io = sorted(n for n in imported(path) if n.split(".")[0] in IO_LIBRARIES)
        assert not io, f"{path.relative_to(PACKAGE)} imports {io}"


def test_the_protocol_core_runs_with_twisted_unimportable() -> None:
    # Not only the source: load the codec and both machines with Twisted blocked.
    code = (
        "import sys; sys.modules['twisted'] = None; sys.modules['OpenSSL'] = None\n"
        "import importlib.util, pathlib\n"
        f"root = pathlib.Path({str(PACKAGE)!r})\n"
        "import types; pkg = types.ModuleType('txcolombe'); pkg.__path__ = [str(root)]\n"
        "sys.modules['txcolombe'] = pkg\n"
        "for name in ['codec.errors', 'codec.data', 'codec.sasl', 'codec.command',"
        " 'client.machine', 'server.machine']:\n"
        "    importlib.import_module('txcolombe.' + name)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ok"]


def test_no_module_is_long_without_a_reason() -> None:
    long = {
        str(p.relative_to(PACKAGE)): n
        for p in modules()
        if (n := len(p.read_text().splitlines())) > 600
    }
    unexplained = {name: n for name, n in long.items() if name not in LONG_MODULES}
    assert not unexplained, f"over 600 lines with no stated reason: {unexplained}"
    stale = sorted(set(LONG_MODULES) - set(long))
    assert not stale, f"no longer long, take them out of LONG_MODULES: {stale}"


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_import_path_gives_the_moved_module(old: str) -> None:
    assert importlib.import_module(old) is importlib.import_module(MOVED[old])


def test_old_paths_leave_the_package_functions_alone() -> None:
    # txcolombe.deliver and txcolombe.connect are functions and were modules too.
    code = (
        "import txcolombe, txcolombe.deliver, txcolombe.connect, txcolombe.auth\n"
        "from txcolombe.machine import ClientMachine\n"
        "from txcolombe.pytest_plugin import smtp\n"
        "import txcolombe.delivery.deliver as d, txcolombe.client.session as s\n"
        "print(txcolombe.deliver is d.deliver, txcolombe.connect is s.connect)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True"]


def test_no_public_class_is_defined_twice_in_the_package() -> None:
    # Two classes of one name (the client's and the server's Envelope, say)
    # make a reader, a log or a type error ambiguous.
    homes: dict[str, list[str]] = {}
    for path in modules():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                homes.setdefault(node.name, []).append(str(path.relative_to(PACKAGE)))
    twice = {name: where for name, where in homes.items() if len(where) > 1}
    assert not twice, twice
