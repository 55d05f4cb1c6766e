#!/usr/bin/env python3
"""Set up and run txcolombe's development tasks with nothing but Python.

    python3 dev.py demo    # a real send through a real SMTP server on loopback
    python3 dev.py test    # every check: lint, types, the docs, the whole test suite
    python3 dev.py bench   # the benchmarks under bench/
    python3 dev.py accel   # optional: compile the sans-I/O core with mypyc, in place
                           # (--clean removes it; TXCOLOMBE_MYPYC=1 builds it before test/demo)

Each task first makes ``.venv`` and installs the project with its test
extras into it (again only when pyproject.toml changed). ``test`` also
installs the Debian packages of the real peers (Postfix, Dovecot, swaks, Redis)
when it runs as root with apt-get; without them those tests skip and say why.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

from tools import accel as accel_tool  # standard library only, like this script

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PYTHON = VENV / "bin" / "python"


def step(message: str) -> None:
    print(f"==> {message}", flush=True)


def run(*args: str | Path, check: bool = True) -> int:
    return subprocess.run([str(a) for a in args], cwd=ROOT, check=check).returncode


def ensure_venv() -> None:
    """Create .venv and install the project, unless pyproject.toml is unchanged."""
    stamp = VENV / ".txcolombe-installed"
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text() == digest and PYTHON.exists():
        return
    if not PYTHON.exists():
        step(f"creating {VENV}")
        venv.EnvBuilder(with_pip=True).create(VENV)
    step("installing txcolombe and its test dependencies into .venv")
    run(PYTHON, "-m", "pip", "install", "--quiet", "--upgrade", "pip")
    run(PYTHON, "-m", "pip", "install", "--quiet", "-e", ".[test,demo,bench,docs]")
    stamp.write_text(digest)


def install_peers() -> None:
    """Postfix, Dovecot, swaks and OpenDKIM from Debian, for the real-peer tests."""
    script = ROOT / "tools" / "install_peers.sh"
    step("installing the real peers (Postfix, Dovecot, swaks, Redis, OpenDKIM) if missing")
    # In CI the real-peer tier must run: a failed installation is a failure.
    strict = ["--strict"] if os.environ.get("CI") else []
    run("bash", script, *strict, check=bool(strict))


def build_accel_if_asked() -> None:
    """With TXCOLOMBE_MYPYC=1, compile the core (tools/accel.py) before running it."""
    if accel_tool.wanted():
        step(f"{accel_tool.ENV} is set: compiling the sans-I/O core with mypyc")
        run(PYTHON, ROOT / "tools" / "accel.py")


def demo(args: list[str]) -> int:
    ensure_venv()
    build_accel_if_asked()
    step("running the demo: real sends through a real SMTP server on loopback")
    return run(PYTHON, ROOT / "tools" / "demo.py", *args, check=False)


def test(args: list[str]) -> int:
    ensure_venv()
    install_peers()
    step("ruff: lint and format check")
    failed = run(PYTHON, "-m", "ruff", "check", ".", check=False)
    failed |= run(PYTHON, "-m", "ruff", "format", "--check", ".", check=False)
    step("mypy --strict")
    failed |= run(PYTHON, "-m", "mypy", check=False)
    step("sphinx: the documentation, warnings as errors")
    sphinx = ["-W", "--keep-going", "-q", "-b", "html", "docs", "docs/_build/html"]
    failed |= run(PYTHON, "-m", "sphinx", *sphinx, check=False)
    # After Sphinx: autodoc documents the .py sources, not the compiled modules.
    build_accel_if_asked()
    step("pytest: the whole suite")
    code = run(PYTHON, "-m", "pytest", *args, check=False)
    if code == 5:
        print("pytest collected no test: that is a failure here", file=sys.stderr)
    return code or (1 if failed else 0)


def bench(args: list[str]) -> int:
    ensure_venv()
    install_peers()
    step("running the benchmarks")
    return run(PYTHON, ROOT / "bench" / "run.py", *args, check=False)


def accel(args: list[str]) -> int:
    ensure_venv()
    step("tools/accel.py: the optional mypyc-compiled sans-I/O core")
    return run(PYTHON, ROOT / "tools" / "accel.py", *args, check=False)


TASKS = {"demo": demo, "test": test, "bench": bench, "accel": accel}


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in TASKS:
        print(__doc__)
        return 2
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    return TASKS[sys.argv[1]](sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
