"""Two-process data-parallel training (JAX, one CPU device per process, localhost coordinator)
against one process training the same global batches.

The three training runs are real ``training_lung_cnn.py`` processes; the module fixture
starts them once (about a minute on 2 cores), so the file is marked slow and runs in
``make test-distributed`` (called by CI). The failure paths (a process that fails or is killed)
end the job within seconds, with one sentence where lungct can say it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import keras
import numpy as np
import pytest
from test_train_image_cache import write_tiny_dataset

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PROCESS_TIMEOUT_S = 280
TRAIN_ARGS = ("--models", "baseline", "--epochs", "2", "--batch-size", "8", "--seed", "3", "-q")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _environment(**extra: str) -> dict[str, str]:
    """A clean JAX/CPU environment: no inherited job, SLURM or device-count settings."""
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("KERAS_DISTRIBUTION_", "SLURM_", "XLA_FLAGS"))}
    env.update(KERAS_BACKEND="jax", JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=str(REPO), **extra)
    return env


def _train_command(dataset: Path, out: Path, distribute: str) -> list[str]:
    return [sys.executable, str(REPO / "training_lung_cnn.py"), "--dataset", str(dataset),
            "--out", str(out), "--distribute", distribute, *TRAIN_ARGS]


def _run_all(commands: list[tuple[list[str], dict[str, str]]],
             cwd: Path = REPO) -> list[tuple[int, str, str]]:
    """Start every command at once, wait for all (killing all on a timeout or an error);
    return (exit code, stdout, stderr) of each. Output goes to files, never to a pipe that a
    process could block on while the other waits for it."""
    with contextlib.ExitStack() as stack:
        files = [(stack.enter_context(tempfile.TemporaryFile("w+")),
                  stack.enter_context(tempfile.TemporaryFile("w+"))) for _ in commands]
        processes = [subprocess.Popen(command, env=env, cwd=cwd, stdout=out, stderr=err)
                     for (command, env), (out, err) in zip(commands, files, strict=True)]
        try:
            for process in processes:
                process.wait(timeout=PROCESS_TIMEOUT_S)
        finally:
            for process in processes:
                if process.poll() is None:
                    process.kill()
                    process.wait()
        results = []
        for process, (out, err) in zip(processes, files, strict=True):
            out.seek(0)
            err.seek(0)
            results.append((process.returncode, out.read(), err.read()))
        return results


def _job_environments(**extra: str) -> list[dict[str, str]]:
    """The environments of the two processes of a localhost job on a free port."""
    address = f"localhost:{_free_port()}"
    return [_environment(KERAS_DISTRIBUTION_JOB_ADDRESSES=address,
                         KERAS_DISTRIBUTION_NUM_PROCESSES="2",
                         KERAS_DISTRIBUTION_PROCESS_ID=str(index), **extra)
            for index in (0, 1)]


def _weights(out: Path) -> list[np.ndarray]:
    return keras.saving.load_model(out / "runs/baseline/model.keras", compile=False).get_weights()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The same training on 2 processes and on 1: their output folders and exit codes."""
    root = tmp_path_factory.mktemp("multiprocess")
    dataset = write_tiny_dataset(root / "output_dataset")
    job = [(_train_command(dataset, root / "job", "data-parallel"), env)
           for env in _job_environments()]
    # The job first: its process 0 builds the image cache while process 1 waits.
    finished = _run_all(job)
    finished += _run_all([(_train_command(dataset, root / "single", "none"), _environment())])
    return {"dataset": dataset, "single": root / "single", "job": root / "job",
            "exits": [code for code, _, _ in finished],
            "stderr": [stderr[-3000:] for _, _, stderr in finished]}


def test_every_process_exits_zero(runs: dict) -> None:
    """Both processes of the job and the single run finish with exit code 0."""
    assert runs["exits"] == [0, 0, 0], runs["stderr"]


def test_two_processes_train_the_weights_of_one(runs: dict) -> None:
    """After 6 steps, the job's weights equal the single process's within float32 rounding."""
    single, job = _weights(runs["single"]), _weights(runs["job"])
    assert [w.shape for w in single] == [w.shape for w in job]
    difference = max(float(np.max(np.abs(a - b))) for a, b in zip(single, job, strict=True))
    assert difference < 1e-4
    assert max(float(np.max(np.abs(w))) for w in single) > 0.1


def test_two_processes_predict_what_one_predicts(runs: dict) -> None:
    """Process 0's validation and test probabilities match the single run's, every image."""
    single, job = (json.loads((runs[key] / "training_results.json").read_text(encoding="utf-8"))
                   for key in ("single", "job"))
    for block in ("validation", "test"):
        assert single[block]["paths"] == job[block]["paths"]
        assert np.allclose(single[block]["y_prob"], job[block]["y_prob"], atol=1e-4)
    assert len(job["environment"]["devices"]) == 2
    assert job["config"]["distribute"] == "data-parallel"


def test_only_process_zero_writes(runs: dict) -> None:
    """The job's output holds one set of files and no checkpoint; the cache was built once."""
    job = runs["job"]
    written = sorted(str(path.relative_to(job)) for path in job.rglob("*") if path.is_file())
    assert written == [
        "lung_cancer_cnn_enhanced.h5",
        "lung_cancer_cnn_enhanced.keras",
        "runs/baseline/history.csv",
        "runs/baseline/model.keras",
        "runs/baseline/run.json",
        "training_results.json",
        "training_results.json.lock",
    ]
    assert len(list((runs["dataset"] / "cache").glob("*.npy"))) == 3


# Each process: under the 2-process DataParallel, predict 13 rows in global batches of 4 (the
# last one padded) and compare every gathered row with a local copy of the model.
PREDICT_SHARDED = """
import json
import keras
import numpy as np
from lungct.train.batches import predict_batches
from lungct.train.distribute import distribution_scope
from lungct.train.job import join_processes

def build():
    keras.utils.set_random_seed(0)
    image = keras.Input((8, 8, 1), dtype="uint8")
    x = keras.layers.Rescaling(1 / 255)(image)
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(image, keras.layers.Dense(1)(x))

join_processes("data-parallel")
images = np.random.default_rng(0).integers(0, 256, (13, 8, 8, 1)).astype(np.uint8)
with distribution_scope("data-parallel", 4):
    model = build()
    gathered = predict_batches(model, images, 4)
    weights = model.get_weights()
local = build()
local.set_weights(weights)
expected = np.asarray(local.predict(images, batch_size=4, verbose=0))
print(json.dumps({"shape": list(gathered.shape),
                  "difference": float(np.max(np.abs(gathered - expected)))}))
"""


def test_predictions_under_the_job_are_gathered_on_every_process(tmp_path: Path) -> None:
    """predict_batches inside the 2-process distribution returns all 13 rows to both."""
    finished = _run_all([([sys.executable, "-c", PREDICT_SHARDED], env)
                         for env in _job_environments()], cwd=tmp_path)
    for code, stdout, stderr in finished:
        assert code == 0, stderr[-3000:]
        result = json.loads(stdout.strip().splitlines()[-1])
        assert result["shape"] == [13, 1]
        assert result["difference"] < 1e-5


# --- Failure paths: one process stops, the others end with one sentence, never hang. ---------

#: s; a failed job ends well within this (start-up and JAX's import included), far below
#: JAX's 100 s heartbeat timeout and 300 s shutdown wait that a regression would show.
FAILED_JOB_S = 60


def _errors(stderr: str) -> list[str]:
    """The ERROR lines of a stage's stderr (JAX/XLA start-up lines are not lungct's)."""
    return [line for line in stderr.splitlines() if line.startswith("ERROR ")]


@pytest.fixture(scope="module")
def tiny_dataset(runs: dict) -> Path:
    return runs["dataset"]


def test_process_zero_failing_before_the_cache_barrier_stops_the_worker(
        tiny_dataset: Path, tmp_path: Path) -> None:
    """Process 0 cannot write its output; the worker, waiting at the cache barrier, stops
    with process 0's reason instead of waiting for ever, and both exit 2."""
    out = tmp_path / "a_file"
    out.write_text("not a folder")
    started = time.monotonic()
    finished = _run_all([(_train_command(tiny_dataset, out, "data-parallel"), env)
                         for env in _job_environments()])
    assert time.monotonic() - started < FAILED_JOB_S
    assert [code for code, _, _ in finished] == [2, 2], [e[-2000:] for _, _, e in finished]
    reason = f"output folder {out} is not writable (File exists)."
    assert _errors(finished[0][2]) == [f"ERROR {reason}"]
    assert _errors(finished[1][2]) == [f"ERROR process 0 of the job stopped: {reason}"]
    assert not any("Traceback" in stderr for _, _, stderr in finished)


def test_a_failing_worker_stops_process_zero(tiny_dataset: Path, tmp_path: Path) -> None:
    """The worker finds no dataset; process 0, waiting for it to agree on the first run,
    stops with the worker's reason, and nothing is written."""
    job, missing = tmp_path / "job", tmp_path / "missing_dataset"
    commands = [(_train_command(tiny_dataset if index == 0 else missing, job, "data-parallel"),
                 env) for index, env in enumerate(_job_environments())]
    started = time.monotonic()
    finished = _run_all(commands)
    assert time.monotonic() - started < FAILED_JOB_S
    assert [code for code, _, _ in finished] == [2, 2], [e[-2000:] for _, _, e in finished]
    (worker_error,) = _errors(finished[1][2])
    assert str(missing) in worker_error
    assert _errors(finished[0][2]) == [
        f"ERROR process 1 of the job stopped: {worker_error.removeprefix('ERROR ')}"]
    assert not (job / "training_results.json").exists()


@pytest.mark.parametrize("killed", [1, 0])
def test_a_process_killed_mid_training_ends_the_other(tiny_dataset: Path, tmp_path: Path,
                                                      killed: int) -> None:
    """``kill -9`` of one process after the first epoch's checkpoint: the other stops within
    seconds. A killed worker leaves process 0 with one sentence (the broken all-reduce); a
    killed process 0 takes JAX's coordination service with it, and JAX aborts the worker
    (SIGABRT, its own "another task died" message)."""
    job = tmp_path / "job"
    command = [*_train_command(tiny_dataset, job, "data-parallel"), "--epochs", "500",
               "--patience", "500"]
    with contextlib.ExitStack() as stack:
        errs = [stack.enter_context(tempfile.TemporaryFile("w+")) for _ in range(2)]
        processes = [subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=err)
                     for env, err in zip(_job_environments(), errs, strict=True)]
        try:
            checkpoint = job / "runs" / "baseline" / "checkpoint.npz"
            deadline = time.monotonic() + PROCESS_TIMEOUT_S
            while not checkpoint.exists() and time.monotonic() < deadline:
                time.sleep(0.2)
            assert checkpoint.exists(), "no epoch finished"
            processes[killed].kill()
            survivor = processes[1 - killed]
            survivor.wait(timeout=FAILED_JOB_S)  # TimeoutExpired: the hang this test rules out
        finally:
            for process in processes:
                if process.poll() is None:
                    process.kill()
                process.wait()
        errs[1 - killed].seek(0)
        stderr = errs[1 - killed].read()
    if killed == 1:
        assert survivor.returncode == 2, stderr[-2000:]
        (error,) = _errors(stderr)
        assert error.startswith("ERROR a collective operation across the job's processes "
                                "failed (")
        assert error.endswith("another process has stopped: its log says why.")
        assert "Traceback" not in stderr
    else:
        assert survivor.returncode == -signal.SIGABRT, stderr[-2000:]
        assert "another task died" in stderr
