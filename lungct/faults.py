"""Deterministic kill points for the crash tests: a stage kills itself after a named step.

Set ``LUNGCT_KILL_AT=<stage>:<step>`` (test-only; never set it otherwise) and the stage sends
itself ``SIGKILL`` when it reaches that step, as a power cut or the OOM killer would. Tests
then check that re-running the same command gives the output of an uninterrupted run.
"""

from __future__ import annotations

import os
import signal

__all__ = ["KILL_VARIABLE", "kill_point"]

KILL_VARIABLE = "LUNGCT_KILL_AT"


def kill_point(stage: str, step: str) -> None:
    """``SIGKILL`` this process if ``LUNGCT_KILL_AT`` names ``stage:step``."""
    if os.environ.get(KILL_VARIABLE) == f"{stage}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
