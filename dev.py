#!/usr/bin/env python3
"""Set up and run txcolombe's development tasks with nothing but Python.

    python3 dev.py demo    # a real send through a real SMTP server on loopback
    python3 dev.py test    # every check: lint, types, the docs, the whole test suite
    python3 dev.py bench   # the benchmarks under bench/

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


def demo(args: list[str]) -> int:
    ensure_venv()
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


TASKS = {"demo": demo, "test": test, "bench": bench}


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in TASKS:
        print(__doc__)
        return 2
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    return TASKS[sys.argv[1]](sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
