"""predict's worker pool (forkserver, so that Keras may load beside it) leaves no orphans: when
the stage process is killed, its workers exit, and with them the fork server
(:func:`lungct.parallel.exit_with_parent`: the workers, children of the fork server, watch
the stage process itself)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from test_reliability import assert_workers_exit_with_parent

REPO = Path(__file__).resolve().parents[1]


def test_forkserver_workers_exit_when_the_stage_is_killed(tmp_path: Path) -> None:
    """SIGKILL the process that owns a forkserver pool: its workers are gone within seconds."""
    script = tmp_path / "stage.py"
    script.write_text(textwrap.dedent(f"""
        import os, time
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import get_context
        from lungct.parallel import exit_with_parent

        def work(item):
            open({str(tmp_path)!r} + f"/worker-{{os.getpid()}}", "w").close()
            time.sleep(60)

        if __name__ == "__main__":
            with ProcessPoolExecutor(2, mp_context=get_context("forkserver"),
                                     initializer=exit_with_parent,
                                     initargs=(os.getpid(),)) as pool:
                list(pool.map(work, range(4)))
    """))
    assert_workers_exit_with_parent(subprocess.Popen([sys.executable, str(script)], cwd=REPO),
                                    tmp_path)
