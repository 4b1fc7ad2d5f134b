"""One writer per stage output: an OS lock on a dedicated lock file beside the target.

The lock is a POSIX record lock (``fcntl.lockf``) on ``<target>.lock``. Unlike ``flock``
locks, record locks belong to the process that took them and are not inherited by forked
workers, so a killed stage releases its lock at once even while orphaned workers live on;
the kernel releases it on any exit, ``SIGKILL`` included. The lock file holds the owner's pid,
stage and start time so a second run can name it; it is never deleted (deleting a lock file
races with the next locker). Readers of another stage's output take the same lock shared.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

from lungct.errors import UserError

__all__ = ["LOCK_SUFFIX", "lock_path", "output_lock", "shared_lock"]

LOCK_SUFFIX = ".lock"
_BUSY = (errno.EACCES, errno.EAGAIN)
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
_READ_ONLY = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT)

LOG = logging.getLogger(__name__)


def lock_path(target: Path) -> Path:
    """The lock file of ``target``: ``<target>.lock`` beside it."""
    target = Path(target)
    return target.with_name(target.name + LOCK_SUFFIX)


def _holder(path: Path) -> str:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        return (f"lungct {record['stage']} run (pid {record['pid']}, started "
                f"{record['started']})")
    except (OSError, ValueError, KeyError, TypeError):
        return "lungct run"


@contextlib.contextmanager
def _locked(target: Path, stage: str, exclusive: bool) -> Iterator[None]:
    path = lock_path(target)
    try:
        if exclusive:
            path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except OSError as error:
        if not exclusive and error.errno in _READ_ONLY:
            LOG.debug("no lock file for %s (%s): reading it without a lock", target,
                      error.strerror)
            yield
            return
        raise UserError(f"cannot create the lock file {path} ({error.strerror}).") from error
    try:
        try:
            fcntl.lockf(descriptor, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
                        | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno in _BUSY:
                doing = "writing" if exclusive else "reading"
                raise UserError(f"another {_holder(path)} is using {target} ({path}); wait for "
                                f"it to finish before {doing} it again.") from None
            if error.errno in _UNSUPPORTED:
                raise UserError(f"the file system of {path} does not support file locks "
                                f"({error.strerror}); run lungct on a local disk.") from None
            raise
        if exclusive:
            record = {"stage": stage, "pid": os.getpid(),
                      "started": time.strftime("%Y-%m-%d %H:%M:%S")}
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, json.dumps(record).encode(), 0)
        yield
    finally:
        os.close(descriptor)  # releases the lock


def output_lock(target: Path, stage: str) -> contextlib.AbstractContextManager[None]:
    """Hold the exclusive lock of ``target`` while ``stage`` writes it.

    Raises:
        UserError: another run holds the lock, or the file system has no locks.
    """
    return _locked(target, stage, exclusive=True)


def shared_lock(target: Path, stage: str) -> contextlib.AbstractContextManager[None]:
    """Hold a shared lock of ``target`` while ``stage`` reads it (no writer meanwhile).

    Where the lock file cannot be created (a read-only dataset), ``target`` is read unlocked.

    Raises:
        UserError: a writer holds the lock, or the file system has no locks.
    """
    return _locked(target, stage, exclusive=False)
