"""Every Python example in docs/ runs here, against the in-memory server.

The examples are ordinary programs: they end with ``react(main)`` and pass
the reactor they are given to txcolombe. This harness makes that reactor a
:class:`~txcolombe.testing.MemorySMTP` one (see docs/testing.md, "How the
documentation's examples are tested"):

- ``twisted.internet.task.react`` runs ``main`` on the fake reactor
  (:meth:`MemorySMTP.react`) and returns instead of exiting;
- every connection made on that reactor, to any host and port, reaches one
  :class:`MemorySMTPServer` (``mx.example.org``, user ``alice`` with
  password ``s3cret``; recipients whose local part starts with ``unknown``
  are refused with 550, ``busy`` with 450), port 465 with implicit TLS;
- the platform's trust store is replaced by the fake server's CA, the DNS
  by :attr:`MemorySMTP.resolver`, and this host's name by
  ``client.example.com``;
- a connection attempted on a reactor that is not a fake one fails the
  test, so no example reaches the network.

Markers (HTML comments, invisible in the rendered pages) on the line before
a fence say what to do with it; a ``python`` fence without one runs:

- ``<!-- output -->`` before a ``text`` fence: what the examples printed
  since the previous output block, exactly;
- ``<!-- file: NAME -->`` before a ``python`` fence: written to NAME in the
  page's directory (the code under test of the testing how-to);
- ``<!-- test: trial -->`` / ``<!-- test: pytest -->`` before a ``python``
  fence: a test module, run with that runner in a subprocess.

The examples of a page run in order, in one namespace, in a temporary
directory, with one fake server; at the end every connection must be closed
and no timer pending.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.testing import MemoryReactorClock

from txcolombe.codec.reply import Reply
from txcolombe.testing import MemorySMTP, MemorySMTPServer

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
# by name: the package exports a function of the same name as this module
DELIVER = importlib.import_module("txcolombe.delivery.deliver")
Deliverer = importlib.import_module("txcolombe.delivery.deliverer").Deliverer
SESSION = importlib.import_module("txcolombe.client.session")
CONNECT = importlib.import_module("txcolombe.client.connect")

_FENCE = re.compile(r"^(`{3,})\s*([\w{}-]*)\s*$")
_MARKER = re.compile(r"^<!--\s*(output|file|test)\s*(?::\s*(\S+))?\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    """One fenced block of a page, with the marker on the line before it."""

    page: str
    line: int
    language: str
    code: str
    marker: str | None = None
    argument: str | None = None


def blocks(text: str, page: str = "<text>") -> list[Block]:
    """The fenced blocks of a Markdown page, in order."""
    lines = text.splitlines()
    found: list[Block] = []
    index = 0
    while index < len(lines):
        fence = _FENCE.match(lines[index])
        if fence is None:
            index += 1
            continue
        ticks, language = fence.groups()
        marker = _MARKER.match(lines[index - 1]) if index > 0 else None
        end = index + 1
        while end < len(lines) and lines[end].strip() != ticks:
            end += 1
        found.append(
            Block(
                page,
                index + 1,
                language,
                "\n".join(lines[index + 1 : end]) + "\n",
                marker.group(1) if marker else None,
                marker.group(2) if marker else None,
            )
        )
        index = end + 1
    return found


def docs_server() -> MemorySMTPServer:
    """The server every documentation example talks to."""
    # The server's defaults (SIZE 10485760 among them): an example that only
    # works with a larger limit would mislead its readers.
    server = MemorySMTPServer(name="mx.example.org", users={"alice": "s3cret"})

    def refusals(command: str, argument: str) -> Reply | None:
        if command != "RCPT":
            return None
        local = argument.partition("<")[2].partition("@")[0].lower()
        if local.startswith("unknown"):
            return Reply.of(550, "5.1.1 No such user here")
        if local.startswith("busy"):
            return Reply.of(450, "4.2.1 Mailbox busy, try later")
        return None

    server.add_responder(refusals)
    return server


@contextlib.contextmanager
def docs_world(fake: MemorySMTP, directory: Path) -> Iterator[None]:
    """Point everything an example touches at ``fake``; see the module docstring."""
    from twisted.internet import _sslverify, task

    def guarded(connect: Any) -> Any:
        def guarded_connect(reactor: Any, *args: Any, **kwargs: Any) -> Any:
            if not isinstance(reactor, MemoryReactorClock):
                raise AssertionError("a documentation example must pass reactor= to txcolombe")
            return connect(reactor, *args, **kwargs)

        return guarded_connect

    class GuardedDeliverer(Deliverer):
        def reactor(self, given: Any) -> Any:
            if given is None:
                raise AssertionError("a documentation example must pass reactor= to deliver()")
            return given

    def react(main: Any, argv: Any = (), _reactor: Any = None) -> None:
        fake.react(main, argv)

    patches: list[tuple[Any, str, Any]] = [
        (task, "react", react),
        (_sslverify, "platformTrust", lambda: fake.trust_root),
        (DELIVER, "default_deliverer", lambda: GuardedDeliverer(resolver=fake.resolver)),
        (SESSION, "default_domain", lambda: "client.example.com"),
        (SESSION, "endpoint_for", guarded(SESSION.endpoint_for)),
        (SESSION, "connect_tcp", guarded(SESSION.connect_tcp)),
    ]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    cwd = os.getcwd()
    # TLS options are cached per name and trust root: none made with the real
    # platform trust may serve an example, nor one made here a later test.
    CONNECT._verified_options.cache_clear()
    try:
        for owner, name, value in patches:
            setattr(owner, name, value)
        os.chdir(directory)
        yield
    finally:
        os.chdir(cwd)
        for owner, name, value in saved:
            setattr(owner, name, value)
        CONNECT._verified_options.cache_clear()


def run_test_module(block: Block, directory: Path, number: int) -> None:
    """Write a ``test:`` block to a module and run it with its runner."""
    module = f"test_docs_example_{number}"
    (directory / f"{module}.py").write_text(block.code)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(directory), str(ROOT)])}
    if block.argument == "trial":
        command = [sys.executable, "-m", "twisted.trial", module]
    elif block.argument == "pytest":
        plugin = ["-p", "no:txcolombe", "-p", "txcolombe.testing.pytest_plugin"]
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *plugin]
        command.append(f"{module}.py")
    else:
        raise AssertionError(f"{block.page}:{block.line}: unknown test runner {block.argument!r}")
    done = subprocess.run(
        command, cwd=directory, env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, (
        f"{block.page}:{block.line}: the {block.argument} example failed:\n"
        + done.stdout
        + done.stderr
    )
    assert ("PASSED" if block.argument == "trial" else " passed") in done.stdout, done.stdout


def run_page(page_blocks: list[Block], directory: Path) -> MemorySMTP:
    """Run a page's examples; return the fake network they used."""
    fake = MemorySMTP(docs_server())
    namespace: dict[str, Any] = {"__name__": "__main__"}
    printed = io.StringIO()
    tests = 0
    with docs_world(fake, directory):
        for block in page_blocks:
            where = f"{block.page}:{block.line}"
            if block.marker == "output":
                assert printed.getvalue() == block.code, f"{where}: the examples printed otherwise"
                printed = io.StringIO()
            elif block.language != "python":
                continue
            elif block.marker == "file":
                assert block.argument, f"{where}: file: needs a name"
                (directory / block.argument).write_text(block.code)
            elif block.marker == "test":
                tests += 1
                run_test_module(block, directory, tests)
            else:
                code = compile(block.code, where, "exec")
                with contextlib.redirect_stdout(printed):
                    exec(code, namespace)
    assert printed.getvalue() == "", "output after the last output block is not checked"
    fake.assert_clean()
    return fake


def pages() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def python_pages() -> list[Path]:
    return [p for p in pages() if any(b.language == "python" for b in blocks(p.read_text()))]


# -- the harness itself ---------------------------------------------------------------


def test_blocks_and_markers_are_parsed() -> None:
    text = (
        "intro\n\n```python\nx = 1\n```\n\n<!-- output -->\n```text\n1\n```\n"
        "<!-- file: app.py -->\n````python\nA = '```'\n````\n<!-- test: pytest -->\n```python\n"
        "def test(): pass\n```\n"
    )
    parsed = blocks(text, "t.md")
    assert [(b.language, b.marker, b.argument, b.line) for b in parsed] == [
        ("python", None, None, 3),
        ("text", "output", None, 8),
        ("python", "file", "app.py", 12),
        ("python", "test", "pytest", 16),
    ]
    assert parsed[2].code == "A = '```'\n"


def test_a_wrong_output_block_fails(tmp_path: Path) -> None:
    text = "```python\nprint('hello')\n```\n<!-- output -->\n```text\nbonjour\n```\n"
    with pytest.raises(AssertionError, match="printed otherwise"):
        run_page(blocks(text, "t.md"), tmp_path)
    text = "```python\nprint('unchecked')\n```\n"
    with pytest.raises(AssertionError, match="not checked"):
        run_page(blocks(text, "t.md"), tmp_path)


def test_an_example_without_the_reactor_is_stopped(tmp_path: Path) -> None:
    text = (
        "```python\nimport txcolombe\n"
        "d = txcolombe.sendmail('mx.example.org', 'a@example.com', ['b@example.org'], b'x')\n"
        "failure = []\nd.addErrback(failure.append)\n"
        "assert 'must pass reactor=' in str(failure[0].value)\n```\n"
    )
    run_page(blocks(text, "t.md"), tmp_path)


def test_every_page_with_python_has_runnable_examples() -> None:
    found = python_pages()
    names = {p.name for p in found}
    assert {"tutorial.md", "testing.md", "migration.md", "deliver.md"} <= names
    for page in found:
        kinds = {b.marker for b in blocks(page.read_text()) if b.language == "python"}
        assert kinds & {None, "test"}, f"{page.name}: nothing runs"


# -- the docs ---------------------------------------------------------------------------


@pytest.mark.parametrize("page", python_pages(), ids=lambda p: p.name)
def test_examples(page: Path, tmp_path: Path) -> None:
    fake = run_page(blocks(page.read_text(), page.name), tmp_path)
    runs = [b for b in blocks(page.read_text()) if b.language == "python" and b.marker is None]
    if any("react(main" in b.code for b in runs):
        assert fake.connections, f"{page.name}: the examples never reached the server"
