"""Shared command-line plumbing: logging flags and the error boundary of every script."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from lungct.errors import UserError

__all__ = ["add_logging_flags", "configure_logging", "run_main"]

LOG = logging.getLogger("lungct")


def add_logging_flags(parser: argparse.ArgumentParser) -> None:
    """Add ``--verbose`` / ``--quiet`` to ``parser``."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    group.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")


def configure_logging(verbose: bool = False, quiet: bool = False) -> None:
    """Log to stderr as ``LEVEL message``; INFO by default.

    Also quiets framework start-up noise that is not news to a user: TensorFlow's C++ notices
    (e.g. "failed call to cuInit" on a CPU machine; set before TensorFlow is imported) and
    JAX's "no TPU found". Python exceptions still report real failures.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def run_main(body: Callable[[], int | None]) -> int:
    """Run a stage body; turn user errors and Ctrl-C into one line and an exit code."""
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
