"""The txcolombe the benchmarks measure: the one of the tree they are in.

A virtualenv made by ``dev.py`` has the project installed in editable mode,
pointing at the checkout that made it. Run from another checkout (a git
worktree, say, with the compiled core built in it), a benchmark would import
that other checkout's code and report it under this one's name. So each
script puts its own tree first on ``sys.path``, and in ``PYTHONPATH`` for the
processes it starts (the clients, the relay), and the results say which tree
it was and whether its core was compiled (``python3 dev.py accel``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def use_this_tree() -> None:
    """Import txcolombe from this tree, here and in every process started from here."""
    root = str(ROOT)
    if sys.path[:1] != [root]:
        sys.path.insert(0, root)
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if paths[:1] != [root]:
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *(p for p in paths if p != root)])


def compiled_modules() -> list[str]:
    """The modules of this tree imported from a compiled extension: those of
    ``tools/accel.py``'s build (``built()``), less mypyc's shared runtime."""
    from tools import accel  # importable once use_this_tree has run

    runtime = accel.GROUP.rpartition(".")[2] + "__mypyc"
    return sorted(
        ".".join((*so.relative_to(accel.ROOT).parent.parts, name))
        for so in accel.built()
        if (name := so.name.split(".", 1)[0]) != runtime
    )


def describe() -> dict[str, object]:
    """Where the measured txcolombe comes from, for the results."""
    modules = compiled_modules()
    return {"tree": str(ROOT), "core": "compiled (mypyc)" if modules else "pure Python",
            "compiled_modules": modules}  # fmt: skip


def headline() -> str:
    """One line saying which txcolombe is measured."""
    modules = compiled_modules()
    plural = "" if len(modules) == 1 else "s"
    core = f"compiled core ({len(modules)} module{plural}, mypyc)" if modules else "pure Python"
    return f"txcolombe: {ROOT}, {core}"
