"""Which core the tests run: the mypyc-compiled one exactly when TXCOLOMBE_MYPYC asks.

With ``TXCOLOMBE_MYPYC=1`` every module of ``tools/accel.py``'s list must be
imported from its compiled ``.so`` (``python3 dev.py accel`` builds them), so
the rest of the suite, the wire-bytes tests among them, checks the compiled
core; without it none may be, so the default run checks pure Python. A
compiled module older than its source would run code the ``.py`` no longer
says: a failure too.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from tools import accel


@pytest.mark.parametrize("source", accel.MODULES)
def test_core_is_compiled_when_asked(source: str) -> None:
    module = importlib.import_module(accel.module_name(source))
    compiled = str(module.__file__).endswith(".so")
    if accel.wanted():
        assert compiled, f"{module.__file__}: not compiled; run python3 dev.py accel"
    else:
        assert not compiled, (
            f"{module.__file__}: compiled, but {accel.ENV} is not set; "
            "run python3 dev.py accel --clean, or set it"
        )


def test_compiled_modules_are_not_stale() -> None:
    stale = []
    for so in accel.built():
        source = so.with_name(so.name.split(".")[0] + ".py")
        if source.exists() and source.stat().st_mtime > so.stat().st_mtime:
            stale.append(str(source.relative_to(accel.ROOT)))
    assert not stale, f"edited since the build: {stale}; run python3 dev.py accel"


def test_every_listed_module_exists() -> None:
    assert all((accel.ROOT / source).is_file() for source in accel.MODULES)
    assert all(Path(source).parts[0] == "txcolombe" for source in accel.MODULES)
