"""Build, or remove, the optional mypyc-compiled sans-I/O core, in place.

    python tools/accel.py          # compile MODULES: a .so beside each .py
    python tools/accel.py --clean  # remove them again: back to pure Python

The compiled modules are the same typed sources, compiled by mypyc (from the
``mypy`` package, a test dependency) with the machine's C compiler and Python
headers; pure Python stays the default and the reference. A module's ``.so``,
once there, is imported instead of its ``.py``, so ``--clean`` is how to go
back, and an edited ``.py`` needs a new build (``tests/test_accel.py`` fails on
a stale one). MODULES is the one list of what is compiled, chosen by profiling
the client (``bench/profiling.py reuse``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: The hot modules of the sans-I/O client core. Compiled code checks the
#: annotated types at run time, so a value mypy would refuse is a TypeError there.
#: Not here: ``codec/dsn.py`` (``DSN(notify={...})``, a set where the annotation
#: says frozenset, is accepted in pure Python and by the tests), ``codec/extensions.py``
#: (a dataclass that is a ``Mapping``: mypyc's class fails at import), and the
#: Twisted side (``client/protocol.py``, ``client/session.py``: subclasses of
#: Twisted's classes, no fewer instructions compiled; ``client/body.py``: mypyc
#: fails on its ``async`` method).
MODULES = (
    "txcolombe/codec/reply.py",
    "txcolombe/codec/command.py",
    "txcolombe/codec/address.py",
    "txcolombe/codec/data.py",
    "txcolombe/client/machine.py",
    "txcolombe/client/events.py",
    "txcolombe/client/states.py",
    "txcolombe/client/envelope.py",
    "txcolombe/client/recipients.py",
)

#: The runtime library the compiled modules share: txcolombe/_accel__mypyc.*.so.
GROUP = "txcolombe._accel"

#: Set to 1 to build the compiled core before ``dev.py test`` and ``dev.py demo``
#: (and to have ``tests/test_accel.py`` require it); unset, pure Python is required.
ENV = "TXCOLOMBE_MYPYC"


def wanted() -> bool:
    """Whether TXCOLOMBE_MYPYC asks for the compiled core."""
    return os.environ.get(ENV, "") not in ("", "0")


def module_name(source: str) -> str:
    """``txcolombe/codec/reply.py`` → ``txcolombe.codec.reply``."""
    return source.removesuffix(".py").replace("/", ".")


def built() -> list[Path]:
    """The extension modules in the tree: this build's, or an earlier one's."""
    return sorted((ROOT / "txcolombe").glob("**/*.so"))


def clean() -> None:
    for so in built():
        so.unlink()
    shutil.rmtree(ROOT / "build", ignore_errors=True)


def build() -> None:
    # Imported here: only the build needs mypyc and setuptools.
    from mypyc.build import mypycify
    from setuptools import Distribution

    clean()
    os.chdir(ROOT)  # mypy reads its configuration, pyproject.toml, from here
    # A bare Distribution, not setup(): setup() would also read pyproject.toml's
    # metadata, which needs a newer setuptools than this build does.
    extensions = mypycify(list(MODULES), group_name=GROUP)
    dist = Distribution({"name": "txcolombe-accel", "ext_modules": extensions})
    dist.script_args = ["build_ext", "--inplace"]
    dist.parse_command_line()
    dist.run_commands()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clean", action="store_true", help="remove the compiled modules")
    options = parser.parse_args()
    if options.clean:
        clean()
    else:
        build()
    for so in built():
        print(so.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
