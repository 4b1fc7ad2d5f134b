"""Shared command-line plumbing: logging flags, checked numbers and the error boundary.

Every script ends in :func:`run_main`: a user error is one line and exit code 2, a file-system
error one line and 1, anything unexpected one line and 1 (the traceback only with
``--verbose``). Third-party log records reach the terminal as one line, without tracebacks,
and the C++ start-up lines of TensorFlow/XLA (which no setting silences) are captured around
the framework import and shown only with ``--verbose`` or when the import fails.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import sys
import tempfile
from collections.abc import Callable, Iterator

from lungct.errors import UserError

__all__ = [
    "add_logging_flags",
    "captured_stderr",
    "configure_logging",
    "finite_float",
    "non_negative_int",
    "positive_int",
    "run_main",
]

LOG = logging.getLogger("lungct")


def add_logging_flags(parser: argparse.ArgumentParser) -> None:
    """Add ``--verbose`` / ``--quiet`` to ``parser``."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    group.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")


def finite_float(text: str) -> float:
    """argparse type: a finite number (``nan`` and ``inf`` are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _int(text: str, minimum: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int(text, 0, "an integer >= 0")


class _OneLineFormatter(logging.Formatter):
    """``LEVEL message``; records from outside lungct lose their traceback unless verbose."""

    def __init__(self, verbose: bool) -> None:
        super().__init__("%(levelname)s %(message)s")
        self.verbose = verbose

    def format(self, record: logging.LogRecord) -> str:
        ours = record.name == "lungct" or record.name.startswith(("lungct.", "__main__"))
        if self.verbose or ours:
            return super().format(record)
        message = record.getMessage().strip().splitlines()
        return f"{record.levelname} {record.name}: {message[0] if message else ''}"


def configure_logging(verbose: bool = False, quiet: bool = False) -> None:
    """Log to stderr as ``LEVEL message``; INFO by default.

    Also quiets framework start-up noise that is not news to a user: TensorFlow's C++ notices
    (set before TensorFlow is imported) and JAX's "no TPU found".
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLineFormatter(verbose))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


@contextlib.contextmanager
def captured_stderr() -> Iterator[None]:
    """Send file descriptor 2 to a temporary file while the block runs.

    C++ libraries (TensorFlow, XLA) write to the descriptor directly, so redirecting
    ``sys.stderr`` is not enough. The captured text is replayed when the block raises or when
    logging is at DEBUG (``--verbose``).
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        failed = True
        try:
            yield
            failed = False
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if failed or logging.getLogger().isEnabledFor(logging.DEBUG):
                sink.seek(0)
                sys.stderr.write(sink.read().decode("utf-8", "replace"))


def run_main(body: Callable[[], int | None]) -> int:
    """Run a stage body; turn every error and Ctrl-C into one line and an exit code."""
    try:
        return body() or 0
    except UserError as error:
        LOG.error("%s", error)
        return error.exit_code
    except OSError as error:  # disk full, permission denied, a path that is a folder...
        where = f" ({error.filename})" if error.filename else ""
        LOG.error("file system error%s: %s", where, error.strerror or error)
        return 1
    except KeyboardInterrupt:
        LOG.error("interrupted; outputs written so far are complete, re-run to continue")
        return 130
    except Exception as error:  # noqa: BLE001 - the boundary: one sentence, never a traceback
        first = (str(error).strip().splitlines() or [""])[0][:300]
        LOG.debug("traceback of the unexpected error", exc_info=True)
        LOG.error("unexpected error %s: %s (re-run with --verbose for the traceback; please "
                  "report it)", type(error).__name__, first)
        return 1
