"""--executor local|dask (lungct.prepare.executors): same bytes, clear failures, no leftovers."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import sys
from pathlib import Path

import pytest

import lungct
from lungct import contract
from lungct.errors import UserError
from lungct.prepare import executors
from lungct.prepare.cli import main
from lungct.prepare.executors import LocalExecutor, open_executor

distributed = pytest.importorskip("distributed")

REAL_VERSION = lungct.__version__

SYNTHETIC = ["--source", "synthetic", "--synthetic-patients", "6", "--synthetic-size", "64",
             "--image-size", "32", "--quiet"]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_local_and_dask_write_identical_datasets(tmp_path, monkeypatch):
    """A 2-process LocalCluster writes output_dataset/ byte for byte as the local pool does,
    and neither executor nor worker count reaches dataset.json."""
    monkeypatch.setattr(executors, "_dashboard_address", lambda: None)
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    work = ["--work-dir", str(tmp_path / "work")]
    local, dask = tmp_path / "local", tmp_path / "dask"
    assert main([*SYNTHETIC, *work, "--output", str(local), "--workers", "1"]) == 0
    assert main([*SYNTHETIC, *work, "--output", str(dask), "--workers", "2",
                 "--executor", "dask"]) == 0
    local_files, dask_files = _files(local), _files(dask)
    assert len(local_files) > 100
    assert local_files == dask_files
    info = json.loads(local_files[contract.DATASET_FILE])
    assert not {"executor", "workers", "dask_scheduler"} & set(info)
    assert "dask" not in local_files[contract.DATASET_FILE].decode()


def test_a_user_cluster_from_the_environment_variable(tmp_path, monkeypatch):
    """With $DASK_SCHEDULER_ADDRESS, prepare runs on that cluster (and leaves it running)."""
    local = tmp_path / "local"
    work = ["--work-dir", str(tmp_path / "work")]
    assert main([*SYNTHETIC, *work, "--output", str(local), "--workers", "1"]) == 0
    with distributed.LocalCluster(n_workers=1, processes=False,
                                  dashboard_address=None) as cluster:
        monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", cluster.scheduler_address)
        assert main([*SYNTHETIC, *work, "--output", str(tmp_path / "remote"),
                     "--executor", "dask"]) == 0
        assert cluster.status.name == "running"
    assert _files(tmp_path / "remote") == _files(local)


def test_dask_scheduler_needs_the_dask_executor(tmp_path, capsys):
    """--dask-scheduler with --executor local is one sentence and exit code 2."""
    code = main([*SYNTHETIC, "--output", str(tmp_path / "out"), "--dask-scheduler",
                 "tcp://127.0.0.1:8786"])
    assert code == 2
    assert "invalid argument: --dask-scheduler needs --executor dask" in capsys.readouterr().err


def test_missing_dask_names_the_extra(monkeypatch):
    """Without the extra, --executor dask says how to install it."""
    monkeypatch.setitem(sys.modules, "distributed", None)
    with (pytest.raises(UserError, match=r"^--executor dask needs Dask: pip install "
                                         r"'lungct\[dask\]'\.$"),
          open_executor("dask", 1)):
        pass


def test_unreachable_scheduler_is_one_sentence_not_a_hang(monkeypatch):
    """A wrong address fails after the connect timeout with one sentence."""
    monkeypatch.setattr(executors, "CONNECT_TIMEOUT_S", 1.0)
    with (pytest.raises(UserError, match=r"^cannot reach the Dask scheduler at "
                                         r"tcp://127\.0\.0\.1:9 within 1 s \(\w+\): check "
                                         r"--dask-scheduler or DASK_SCHEDULER_ADDRESS\.$"),
          open_executor("dask", 1, "tcp://127.0.0.1:9")):
        pass


def test_a_dying_worker_is_one_error_and_ctrl_c_closes_the_cluster():
    """A task that kills its worker each time ends as one UserError; leaving the block by
    KeyboardInterrupt closes the client and the LocalCluster's worker processes."""
    with (pytest.raises(KeyboardInterrupt),
          open_executor("dask", 1, dashboard_address=None) as executor):
        assert executor.workers == 1
        assert list(executor.map(abs, [-1, -2, 3], "abs")) == [1, 2, 3]
        with pytest.raises(UserError, match=r"^a Dask worker died 3 times running one "
                                            r"boom task \(out of memory, or killed\?\)"):
            list(executor.map(os._exit, [1], "boom"))
        raise KeyboardInterrupt
    assert executor.client.status == "closed"
    assert multiprocessing.active_children() == []


def test_local_executor_keeps_task_order(caplog):
    """The local executor is the process pool, results in task order."""
    with caplog.at_level(logging.INFO), open_executor("local", 2) as executor:
        assert isinstance(executor, LocalExecutor)
        assert list(executor.map(abs, [-3, 1, -2, 5], "abs")) == [3, 1, 2, 5]


def test_workers_are_asked_for_the_folders_and_version_and_task_errors_are_one_line(
        tmp_path, monkeypatch):
    """Before any task: a folder a worker cannot see, or another lungct on the workers, is
    one sentence; a task's own error (not a killed worker) is one sentence too."""
    with open_executor("dask", 1, dashboard_address=None) as executor:
        executor.check_shared(tmp_path, "read the input from")
        absent = tmp_path / "not-shared"
        with pytest.raises(UserError, match=(
                rf"^the Dask workers cannot see {re.escape(str(absent))} \(1 of 1, e\.g\. "
                r"tcp://[^)]+\): workers must read the input from a path they all share\.$")):
            executor.check_shared(absent, "read the input from")
        monkeypatch.setattr(lungct, "__version__", "9.9.9")  # this process only
        with pytest.raises(UserError, match=(
                rf"^the Dask workers run lungct {re.escape(REAL_VERSION)} but this process "
                r"runs 9\.9\.9: install the same lungct on every worker\.$")):
            executor.check_shared(tmp_path, "write the output to")
        with pytest.raises(UserError, match=(
                r"^a parse task failed on a Dask worker \(ValueError: invalid literal for "
                r"int\(\) with base 10: 'x'\): see the workers' logs, or run with "
                r"--executor local to see it here\.$")):
            list(executor.map(int, ["1", "x"], "parse"))


def test_prepare_stops_when_the_workers_cannot_see_the_input(tmp_path, monkeypatch, capsys):
    """prepare asks before reading headers: exit 2 and the sentence, no dataset."""
    monkeypatch.setattr(executors, "_dashboard_address", lambda: None)
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    monkeypatch.setattr(executors, "_worker_view", lambda folders: (folders, lungct.__version__))
    assert main([*SYNTHETIC, "--work-dir", str(tmp_path / "work"), "--output",
                 str(tmp_path / "out"), "--workers", "1", "--executor", "dask"]) == 2
    err = capsys.readouterr().err
    assert "the Dask workers cannot see " + str(tmp_path / "work" / "raw_synthetic") in err
    assert "workers must read the input from a path they all share." in err
    assert not (tmp_path / "out").exists()
