"""Run every benchmark under bench/, one after another, printing each one's output.

    python bench/run.py [--quick]

``messages.py`` (messages per second, three scenarios, every client), then
``large_body.py`` with a 100 MiB body, plain and over STARTTLS, then
``relay.py`` (the twistd smtprelay against Postfix; Postfix needs root).
``--quick`` runs each with small settings instead: a smoke run of the whole
set. A benchmark that fails does not stop the others; the exit status says
if any did.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: (script, its default arguments, its arguments for --quick)
BENCHMARKS: list[tuple[str, list[str], list[str]]] = [
    ("messages.py", [], ["--quick"]),
    ("large_body.py", ["--mib", "100"], ["--mib", "10"]),
    ("large_body.py", ["--mib", "100", "--tls"], ["--mib", "10", "--tls"]),
    ("relay.py", [], ["--messages", "200"]),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small settings: a smoke run")
    options = parser.parse_args()
    failed: list[str] = []
    for script, default_args, quick_args in BENCHMARKS:
        args = quick_args if options.quick else default_args
        title = " ".join([f"bench/{script}", *args])
        print(f"\n==> {title}", flush=True)
        start = time.perf_counter()
        code = subprocess.run([sys.executable, str(HERE / script), *args], check=False).returncode
        status = "ok" if code == 0 else f"FAILED (exit status {code})"
        print(f"==> {title}: {status} in {time.perf_counter() - start:.0f} s", flush=True)
        if code != 0:
            failed.append(title)
    if failed:
        print(f"\nfailed: {'; '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
