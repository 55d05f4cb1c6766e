"""The spool's incoming files: a message written as it arrives, then made a
spool message, or removed."""

from __future__ import annotations

from pathlib import Path

from txcolombe.relay.spool import Spool


def test_incoming_file_becomes_a_spool_message(tmp_path: Path) -> None:
    spool = Spool(tmp_path, inline=True)
    spool.start()
    incoming = spool.incoming("QID", {"id": "QID", "sender": "a@x.test", "recipients": ["b"]})
    assert (spool.queue_dir / "QID.in.tmp").exists()
    incoming.write(b"Subject: s\r\n\r\n")
    incoming.write(b"body\r\n")
    done: list[object] = []
    incoming.finish().addCallback(done.append)
    assert done == [None] and not (spool.queue_dir / "QID.in.tmp").exists()
    assert spool.read_envelope("QID")["size"] == 20  # filled in at the end
    assert spool.read_data("QID") == b"Subject: s\r\n\r\nbody\r\n"
    aborted = spool.incoming("QID2", {"id": "QID2"})
    aborted.write(b"x\r\n")
    aborted.abort()
    assert list(spool.queue_ids()) == ["QID"] and not list(spool.queue_dir.glob("*.tmp"))


def test_incoming_file_that_cannot_be_created_fails_at_finish(tmp_path: Path) -> None:
    """A spool that cannot take the file (here: its directory is gone) fails
    the message at its end, raising nothing while it arrives."""
    spool = Spool(tmp_path, inline=True, fsync=False)
    spool.start()
    spool.queue_dir.rename(tmp_path / "elsewhere")
    incoming = spool.incoming("QID", {"id": "QID", "sender": None, "recipients": []})
    incoming.write(b"data\r\n")
    failures: list[BaseException] = []
    incoming.finish().addErrback(lambda f: failures.append(f.value))
    assert len(failures) == 1 and isinstance(failures[0], FileNotFoundError)
