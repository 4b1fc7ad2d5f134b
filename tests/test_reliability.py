"""Reliability mechanisms: locks, kills, atomic sets, workers that die with their parent.

Stages run as real processes here (``subprocess``), because locks, ``SIGKILL`` and orphaned
workers only exist between processes. The uninterrupted reference is the session's
``pipeline`` run (tests/conftest.py), made with the same arguments.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lungct import contract
from lungct.faults import KILL_VARIABLE
from lungct.locking import lock_path

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {"prepare": "prepare_lung_dataset.py", "train": "training_lung_cnn.py",
           "interpret": "interpretation.py"}
VOLATILE = {"timing_seconds", "seconds", "train_seconds", "images_per_second", "dataset_dir",
            "out_dir", "results_path", "model_path", "inputs_sha256", "environment",
            "files_sha256", "model_sha256", "input_hash"}


def _args(stage: str, root: Path) -> list[str]:
    """The arguments the session's pipeline fixture used, for a run under ``root``."""
    if stage == "prepare":
        return ["--source", "synthetic", "--synthetic-patients", "12", "--synthetic-size", "64",
                "--view", "patch", "--image-size", "32", "--target-count", "120",
                "--split", "0.5,0.25,0.25", "--work-dir", str(root),
                "--output", str(root / "output_dataset"), "--workers", "1", "-q"]
    if stage == "train":
        return ["--dataset", str(root / "output_dataset"), "--out", str(root), "--models",
                "baseline", "--preset", "quick", "--epochs", "1", "--batch-size", "8", "-q"]
    return ["--results", str(root / contract.RESULTS_FILE), "--out", str(root / "reports"),
            "--bootstrap", "50", "-q"]


def _run(stage: str, root: Path, kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != KILL_VARIABLE}
    if kill_at:
        env[KILL_VARIABLE] = kill_at
    return subprocess.run([sys.executable, str(REPO / SCRIPTS[stage]), *_args(stage, root)],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)


def _stable(value: object) -> object:
    """JSON content without the fields that differ between two identical runs anyway."""
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def _json(path: Path) -> object:
    return _stable(json.loads(path.read_text(encoding="utf-8")))


def _inputs_of(stage: str, pipeline: dict[str, Path], root: Path) -> None:
    """Copy into ``root`` what ``stage`` reads, from the reference run."""
    if stage in ("train", "interpret"):
        shutil.copytree(pipeline["dataset"], root / "output_dataset",
                        ignore=shutil.ignore_patterns("cache"))
    if stage == "interpret":
        for name in (contract.RESULTS_FILE, *contract.MODEL_FILES.values()):
            shutil.copy2(pipeline["root"] / name, root / name)
        shutil.copytree(pipeline["root"] / "runs", root / "runs")
        results = json.loads((root / contract.RESULTS_FILE).read_text(encoding="utf-8"))
        results["config"]["dataset_dir"] = str(root / "output_dataset")
        (root / contract.RESULTS_FILE).write_text(json.dumps(results), encoding="utf-8")


def _assert_same_outputs(stage: str, pipeline: dict[str, Path], root: Path) -> None:
    if stage == "prepare":
        dataset = root / "output_dataset"
        for name in (contract.MANIFEST_FILE, contract.SKIPPED_FILE):
            assert (dataset / name).read_bytes() == (pipeline["dataset"] / name).read_bytes()
        assert _json(dataset / contract.DATASET_FILE) == _json(
            pipeline["dataset"] / contract.DATASET_FILE)
        for path in contract.read_manifest(dataset)["path"]:
            assert (dataset / path).read_bytes() == (pipeline["dataset"] / path).read_bytes()
    elif stage == "train":
        ours = _json(root / contract.RESULTS_FILE)
        reference = _json(pipeline["results"])
        assert ours["test"] == reference["test"] and ours["threshold"] == reference["threshold"]
        assert ours == reference
    else:
        assert _json(root / "reports" / "report.json") == _json(
            pipeline["reports"] / "report.json")
        assert sorted(p.name for p in (root / "reports" / "gradcam").iterdir()) == sorted(
            p.name for p in (pipeline["reports"] / "gradcam").iterdir())


def _kill_and_rerun(kill_at: str, pipeline: dict[str, Path], root: Path) -> None:
    stage = kill_at.split(":")[0]
    _inputs_of(stage, pipeline, root)
    killed = _run(stage, root, kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    rerun = _run(stage, root)
    assert rerun.returncode == 0, rerun.stderr
    _assert_same_outputs(stage, pipeline, root)
    assert not list(root.glob("*.partial")), "a staging folder survived the re-run"


@pytest.mark.parametrize("kill_at", ["prepare:rendered", "train:selected_saved",
                                     "interpret:written"])
def test_a_killed_stage_reruns_to_the_uninterrupted_output(
        kill_at: str, pipeline: dict[str, Path], tmp_path: Path) -> None:
    """SIGKILL after a named step, then the same command: output equals an uninterrupted run."""
    _kill_and_rerun(kill_at, pipeline, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", ["prepare:written", "train:run_saved"])
def test_every_kill_point_reruns_to_the_uninterrupted_output(
        kill_at: str, pipeline: dict[str, Path], tmp_path: Path) -> None:
    """The rest of the kill-point matrix (make test-slow)."""
    _kill_and_rerun(kill_at, pipeline, tmp_path)


def test_a_second_writer_stops_with_one_sentence_naming_the_first(tmp_path: Path) -> None:
    """Two prepare processes on one output: the second exits 2 naming the first's pid."""
    first = subprocess.Popen([sys.executable, str(REPO / SCRIPTS["prepare"]),
                              *_args("prepare", tmp_path)], cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = lock_path(tmp_path / "output_dataset")
    deadline = time.monotonic() + 60
    while f'"pid": {first.pid}' not in (lock.read_text() if lock.exists() else ""):
        assert time.monotonic() < deadline and first.poll() is None, "the first run never locked"
        time.sleep(0.05)
    second = _run("prepare", tmp_path)
    assert first.wait(timeout=600) == 0, first.stderr.read()
    assert second.returncode == 2
    assert f"another lungct prepare run (pid {first.pid}" in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    manifest = contract.read_manifest(tmp_path / "output_dataset")
    info = contract.read_dataset_info(tmp_path / "output_dataset")
    assert info["n_images"] == len(manifest)
    assert contract.dataset_files_sha256(tmp_path / "output_dataset") == info["files_sha256"]


def test_a_held_lock_stops_training_and_interpretation(pipeline: dict[str, Path],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """While another process writes training_results.json, training and interpretation stop."""
    import interpretation
    import training_lung_cnn

    root = pipeline["root"]
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from lungct.locking import output_lock
            with output_lock({str(pipeline["results"])!r}, "train"):
                print("locked", flush=True)
                sys.stdin.read()
        """)], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert training_lung_cnn.main(_args("train", root)) == 2
        assert f"another lungct train run (pid {holder.pid}" in capsys.readouterr().err
        assert interpretation.main(_args("interpret", root)) == 2
        assert "wait for it to finish before reading it again" in capsys.readouterr().err
    finally:
        holder.communicate("", timeout=60)


def test_a_replaced_model_file_is_refused_by_interpretation(
        pipeline: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A model file from another run beside training_results.json: one sentence, exit 2."""
    import interpretation

    _inputs_of("interpret", pipeline, tmp_path)
    keras_file = tmp_path / contract.MODEL_FILES["keras"]
    keras_file.write_bytes(keras_file.read_bytes() + b"\0")
    assert interpretation.main(_args("interpret", tmp_path)) == 2
    err = capsys.readouterr().err
    assert f"{keras_file} changed after {tmp_path / contract.RESULTS_FILE} was written" in err
    assert not (tmp_path / "reports").exists()


def assert_workers_exit_with_parent(parent: subprocess.Popen, folder: Path) -> None:
    """Wait for two ``worker-<pid>`` files in ``folder``, SIGKILL ``parent``, then check that
    every worker is gone (or a zombie) within 10 s."""
    deadline = time.monotonic() + 60
    while len(list(folder.glob("worker-*"))) < 2:
        assert time.monotonic() < deadline, "the workers never started"
        time.sleep(0.05)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    pids = [int(p.name.split("-")[1]) for p in folder.glob("worker-*")]
    deadline = time.monotonic() + 10
    alive = pids
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [pid for pid in pids if Path(f"/proc/{pid}").exists()
                 and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]]
    assert not alive, f"orphaned workers still running: {alive}"


def test_workers_exit_when_their_parent_is_killed(tmp_path: Path) -> None:
    """A SIGKILLed stage leaves no orphaned pool workers behind."""
    code = textwrap.dedent(f"""
        import os, signal, time
        from lungct.parallel import pool_map
        def work(item):
            with open({str(tmp_path)!r} + f"/worker-{{os.getpid()}}", "w"):
                pass
            time.sleep(60)
        for _ in pool_map(work, list(range(4)), 2, "test"):
            pass
    """)
    assert_workers_exit_with_parent(subprocess.Popen([sys.executable, "-c", code], cwd=REPO),
                                    tmp_path)


def test_framework_start_up_lines_stay_hidden(tmp_path: Path) -> None:
    """Training's error on a missing dataset is one line: no TensorFlow start-up noise."""
    done = subprocess.run([sys.executable, str(REPO / SCRIPTS["train"]), "--dataset",
                           str(tmp_path / "nowhere")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"ERROR dataset folder {tmp_path / 'nowhere'} does not exist; run "
        "prepare_lung_dataset.py first or pass --dataset."]


def test_a_fifo_listed_in_the_manifest_is_refused_not_waited_on(
        pipeline: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Only regular files are opened: a FIFO in place of an image is one sentence, no hang."""
    import training_lung_cnn

    _inputs_of("train", pipeline, tmp_path)
    image = tmp_path / "output_dataset" / contract.read_manifest(
        tmp_path / "output_dataset")["path"].iloc[0]
    image.unlink()
    os.mkfifo(image)
    assert training_lung_cnn.main(_args("train", tmp_path)) == 2
    assert f"image {image} listed in manifest.csv is not a regular file" in (
        capsys.readouterr().err)


@pytest.mark.slow
def test_a_replaced_run_model_is_retrained_not_reused(
        pipeline: dict[str, Path], tmp_path: Path) -> None:
    """runs/<model>/model.keras swapped after training: the next run retrains it."""
    _inputs_of("interpret", pipeline, tmp_path)
    run_model = tmp_path / "runs" / "baseline" / "model.keras"
    run_model.write_bytes(run_model.read_bytes() + b"\0")
    rerun = subprocess.run([sys.executable, str(REPO / SCRIPTS["train"]),
                            *_args("train", tmp_path)], cwd=tmp_path,
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert "model.keras changed since run.json was written: retraining" in rerun.stderr
    _assert_same_outputs("train", pipeline, tmp_path)
