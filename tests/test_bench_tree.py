"""The benchmarks measure the txcolombe of their own tree (bench/tree.py).

The virtualenv's editable install points at one checkout; a benchmark run
from another (a worktree with the compiled core, say) must still import its
own, in its own process and in the client processes it starts.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: Imports txcolombe after bench/tree.py, then again in a child process.
PROBE = """
import subprocess, sys
sys.path.insert(0, sys.argv[1])
import tree
tree.use_this_tree()
import txcolombe
print(txcolombe.__file__)
child = "import txcolombe; print(txcolombe.__file__)"
print(subprocess.run([sys.executable, "-c", child], capture_output=True, text=True).stdout.strip())
print(tree.headline())
"""


def test_another_txcolombe_first_on_the_path_is_not_measured(tmp_path: Path) -> None:
    other = tmp_path / "other-checkout"
    (other / "txcolombe").mkdir(parents=True)
    (other / "txcolombe" / "__init__.py").write_text("")
    env = {**os.environ, "PYTHONPATH": str(other)}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(ROOT / "bench")],
        capture_output=True, text=True, env=env, cwd=tmp_path, check=True, timeout=60,
    )  # fmt: skip
    here, child, headline = out.stdout.strip().splitlines()
    expected = str(ROOT / "txcolombe" / "__init__.py")
    assert here == expected
    assert child == expected
    assert headline.startswith(f"txcolombe: {ROOT}, ")


def test_the_results_name_the_compiled_modules(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import tree

    from tools import accel

    assert tree.describe()["tree"] == str(ROOT)
    fake = tmp_path / "txcolombe" / "codec"
    fake.mkdir(parents=True)
    (fake / "reply.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    (tmp_path / "txcolombe" / "_accel__mypyc.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    monkeypatch.setattr(tree, "ROOT", tmp_path)
    monkeypatch.setattr(accel, "ROOT", tmp_path)
    assert tree.compiled_modules() == ["txcolombe.codec.reply"]
    assert tree.describe()["core"] == "compiled (mypyc)"
    assert tree.headline() == f"txcolombe: {tmp_path}, compiled core (1 module, mypyc)"
    (fake / "reply.cpython-311-x86_64-linux-gnu.so").unlink()
    assert tree.describe()["core"] == "pure Python"
    assert tree.headline() == f"txcolombe: {tmp_path}, pure Python"


def test_every_benchmark_script_imports_its_own_tree() -> None:
    """A script that imports txcolombe (or the test peers) calls use_this_tree
    first, or imports bench/run.py, which does."""
    for script in sorted((ROOT / "bench").glob("*.py")):
        text = script.read_text()
        if script.name == "tree.py" or not any(
            word in text
            for word in ("import txcolombe", "from txcolombe", "from tools", "from tests")
        ):
            continue
        uses = "tree.use_this_tree()" in text or "import run as bench" in text
        assert uses, f"{script.name} may measure another checkout's txcolombe"
