"""The command line's progress display, on a fake clock."""

from __future__ import annotations

import io

from twisted.internet.task import Clock

from txcolombe.progress import INTERVAL, CountingFile, ProgressDisplay, describe

MIB = 1024 * 1024


def test_describe_with_and_without_a_size() -> None:
    assert describe(3 * MIB, 8 * MIB, 2.0) == "3.0 MiB of 8.0 MiB sent (37%), 1.5 MiB/s"
    assert describe(MIB // 2, None, 0.0) == "0.5 MiB sent, 0.0 MiB/s"


def test_counting_file_counts_reads_and_knows_the_size() -> None:
    raw = io.BytesIO(b"x" * 1000)
    counting = CountingFile(raw)
    assert counting.size is None  # a BytesIO has no file descriptor
    assert counting.read(300) == b"x" * 300
    buffer = bytearray(500)
    assert counting.readinto(buffer) == 500
    assert counting.count == 800
    assert counting.tell() == 800


def test_the_display_updates_every_interval_and_ends_with_a_last_line() -> None:
    clock = Clock()
    out = io.StringIO()
    counting = CountingFile(io.BytesIO(b"z" * (4 * MIB)))
    counting.size = 4 * MIB
    display = ProgressDisplay(counting, out, clock, terminal=False)
    display.start()
    assert out.getvalue() == ""
    counting.read(MIB)
    clock.advance(INTERVAL)
    counting.read(3 * MIB)
    display.stop()
    clock.advance(10 * INTERVAL)  # stopped: nothing more
    assert out.getvalue().splitlines() == [
        "1.0 MiB of 4.0 MiB sent (25%), 2.0 MiB/s",
        "4.0 MiB of 4.0 MiB sent (100%), 8.0 MiB/s",
    ]


def test_on_a_terminal_one_line_is_rewritten() -> None:
    clock = Clock()
    out = io.StringIO()
    counting = CountingFile(io.BytesIO(b"z" * MIB))
    display = ProgressDisplay(counting, out, clock, terminal=True)
    display.start()
    counting.read(MIB)
    clock.advance(INTERVAL)
    display.stop()
    assert out.getvalue() == ("\r1.0 MiB sent, 2.0 MiB/s\x1b[K\r1.0 MiB sent, 2.0 MiB/s\x1b[K\n")
