"""Tests of lungct.locking: exclusive writers, shared readers, unsupported file systems."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lungct.errors import UserError
from lungct.locking import lock_path, output_lock, shared_lock


def _hold(target: Path, exclusive: bool) -> subprocess.Popen:
    """Another process holding ``target``'s lock until its stdin closes."""
    kind = "output_lock" if exclusive else "shared_lock"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from lungct.locking import {kind}
        with {kind}({str(target)!r}, "prepare"):
            print("locked", flush=True)
            sys.stdin.read()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_the_lock_file_names_its_holder(tmp_path: Path) -> None:
    """The lock file records stage and pid; it stays after release."""
    with output_lock(tmp_path / "out", "prepare"):
        record = json.loads(lock_path(tmp_path / "out").read_text())
        assert (record["stage"], record["pid"]) == ("prepare", os.getpid())
    assert lock_path(tmp_path / "out").is_file()


def test_a_writer_excludes_writers_and_readers(tmp_path: Path) -> None:
    """While another process writes, a second writer and a reader both stop, naming it."""
    holder = _hold(tmp_path / "out", exclusive=True)
    try:
        with (
            pytest.raises(UserError, match=rf"another lungct prepare run \(pid {holder.pid}"),
            output_lock(tmp_path / "out", "prepare"),
        ):
            pass
        with (
            pytest.raises(UserError, match="wait for it to finish before reading it again"),
            shared_lock(tmp_path / "out", "train"),
        ):
            pass
    finally:
        holder.communicate("", timeout=60)
    with output_lock(tmp_path / "out", "prepare"):
        pass


def test_readers_share_and_exclude_writers(tmp_path: Path) -> None:
    """Two readers at once are fine; a writer waits for neither but stops."""
    holder = _hold(tmp_path / "out", exclusive=False)
    try:
        with shared_lock(tmp_path / "out", "interpret"):
            pass
        with (
            pytest.raises(UserError, match="before writing it again"),
            output_lock(tmp_path / "out", "prepare"),
        ):
            pass
    finally:
        holder.communicate("", timeout=60)


def test_a_file_system_without_locks_is_one_sentence(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOLCK (some NFS mounts) becomes a sentence advising a local disk."""
    def no_locks(*_args: object) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "lockf", no_locks)
    with (
        pytest.raises(UserError, match="does not support file locks .* run lungct on a local"),
        output_lock(tmp_path / "out", "prepare"),
    ):
        pass


def test_a_read_only_dataset_is_read_without_a_lock(tmp_path: Path) -> None:
    """Where the lock file cannot be created, a reader proceeds unlocked."""
    with shared_lock(tmp_path / "missing-folder" / "dataset", "train"):
        pass
    assert not (tmp_path / "missing-folder").exists()
