"""Resumable training (lungct.train.checkpoint, loop.EpochCheckpoint) and TensorBoard logs.

The kill tests run the training CLI as a real process that SIGKILLs itself at a kill point
(lungct.faults): ``train:epoch_saved`` right after an epoch's checkpoint, ``train:run_saved``
after run.json, while the final checkpoint is still there to compare every state with.
Baseline model only: a transfer model's graph trace alone costs about 50 s here; the transfer
phases are checked in-process on a stand-in backbone.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from test_train_image_cache import write_tiny_dataset

from lungct import backend
from lungct.errors import UserError
from lungct.faults import KILL_VARIABLE
from lungct.train import loop as trainloop
from lungct.train import models
from lungct.train import stage as train
from lungct.train.checkpoint import (
    TrainingState,
    assign_values,
    read_checkpoint,
    write_checkpoint,
)
from lungct.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 3


def _train(dataset: Path, out: Path, kill_at: str, keras_backend: str
           ) -> subprocess.CompletedProcess:
    """The training CLI on the baseline, killed at ``kill_at``."""
    env = {**os.environ, KILL_VARIABLE: kill_at, "TF_CPP_MIN_LOG_LEVEL": "3",
           "KERAS_BACKEND": keras_backend}
    args = ["--dataset", str(dataset), "--out", str(out), "--models", "baseline",
            "--preset", "quick", "--epochs", str(EPOCHS), "--batch-size", "8", "--seed", "7",
            "-q"]
    completed = subprocess.run([sys.executable, str(REPO / "training_lung_cnn.py"), *args],
                               cwd=out.parent, env=env, capture_output=True, text=True,
                               timeout=300, check=False)
    assert completed.returncode == -signal.SIGKILL, completed.stderr[-3000:]
    return completed


def _history(run_dir: Path) -> list[dict]:
    """history.csv without the wall-clock column."""
    with (run_dir / "history.csv").open(newline="", encoding="utf-8") as handle:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(handle)]


def _final_state(run_dir: Path) -> TrainingState:
    fingerprint = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))["fingerprint"]
    state = read_checkpoint(run_dir / trainloop.CHECKPOINT_FILE, fingerprint)
    assert state is not None
    return state


def _kill_and_resume(root: Path, keras_backend: str) -> dict[str, Path]:
    """An uninterrupted run and one killed after its first epoch, then resumed; both stop
    after run.json, before the final checkpoint is removed."""
    dataset = write_tiny_dataset(root / "output_dataset")
    reference, resumed = root / "reference", root / "resumed"
    for out in (reference, resumed):
        out.mkdir()
    _train(dataset, reference, "train:run_saved", keras_backend)
    _train(dataset, resumed, "train:epoch_saved", keras_backend)
    interrupted = _history(resumed / "runs/baseline")
    state = read_checkpoint(resumed / "runs/baseline" / trainloop.CHECKPOINT_FILE,
                            _final_state(reference / "runs/baseline").fingerprint)
    assert [row["epoch"] for row in interrupted] == ["1"]
    assert state is not None and (state.phase, state.phase_epochs_done) == ("scratch", 1)
    _train(dataset, resumed, "train:run_saved", keras_backend)
    return {"reference": reference / "runs/baseline", "resumed": resumed / "runs/baseline"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The kill-and-resume runs on TensorFlow (the backend of the test suite)."""
    return _kill_and_resume(tmp_path_factory.mktemp("resume"), "tensorflow")


def test_a_killed_run_resumes_to_the_uninterrupted_history(runs: dict[str, Path]) -> None:
    """Every epoch once, with the losses and AUCs of the uninterrupted run, bit for bit."""
    _assert_same_history(runs)


def test_a_killed_run_resumes_to_the_uninterrupted_weights(runs: dict[str, Path]) -> None:
    """TensorFlow/CPU: the saved model, and every variable, optimizer slot and seed state of
    the last epoch, equal the uninterrupted run's exactly."""
    _assert_same_state(runs)


@pytest.mark.slow
def test_a_killed_jax_run_resumes_to_the_uninterrupted_run(tmp_path: Path) -> None:
    """JAX/CPU (jit-compiled steps): the same guarantee, bit for bit (make test-slow)."""
    runs = _kill_and_resume(tmp_path, "jax")
    _assert_same_history(runs)
    _assert_same_state(runs)
    assert not (runs["reference"] / "logs").exists()


def _assert_same_history(runs: dict[str, Path]) -> None:
    history = _history(runs["resumed"])
    assert [row["epoch"] for row in history] == ["1", "2", "3"]
    assert history == _history(runs["reference"])
    records = [json.loads((runs[key] / "run.json").read_text(encoding="utf-8"))["history"]
               for key in ("reference", "resumed")]
    for record in records:
        record.pop("seconds")
    assert records[0] == records[1]


def _assert_same_state(runs: dict[str, Path]) -> None:
    saved = [keras.models.load_model(runs[key] / "model.keras").get_weights()
             for key in ("reference", "resumed")]
    assert all(np.array_equal(a, b) for a, b in zip(*saved, strict=True))
    reference, resumed = _final_state(runs["reference"]), _final_state(runs["resumed"])
    assert (resumed.epochs_done, resumed.phase_finished) == (EPOCHS, True)
    for group in ("model_variables", "optimizer_variables", "best_weights"):
        pairs = zip(getattr(reference, group), getattr(resumed, group), strict=True)
        assert all(np.array_equal(a, b) for a, b in pairs), group
    assert resumed.images_trained == reference.images_trained == EPOCHS * 24
    assert resumed.early_stopping == reference.early_stopping
    assert resumed.reduce_lr == reference.reduce_lr


def test_tensorboard_logs_go_to_runs_model_logs(runs: dict[str, Path]) -> None:
    """On TensorFlow, the Keras TensorBoard callback writes event files for both splits."""
    for split in ("train", "validation"):
        assert list((runs["reference"] / "logs" / split).glob("events.out.tfevents.*")), split


def _state(fingerprint: str = "abc", best_weights: list[np.ndarray] | None = None
           ) -> TrainingState:
    return TrainingState(
        fingerprint=fingerprint, phase="frozen", phase_epochs_done=2, phase_finished=False,
        rows=[{"epoch": 1, "phase": "frozen", "val_auc": 0.5},
              {"epoch": 2, "phase": "frozen", "val_auc": 0.75}],
        images_trained=64, train_seconds=3.5, best_val_auc=-np.inf,
        early_stopping={"wait": 1, "best": 0.75, "best_epoch": 1, "stopped_epoch": 0},
        reduce_lr={"wait": 0, "best": None, "cooldown_counter": 0},
        model_variables=[np.arange(6, dtype=np.float32).reshape(2, 3),
                         np.array([7, 12], dtype=np.uint32)],
        optimizer_variables=[np.array(4, dtype=np.int64), np.array(1e-3, dtype=np.float32)],
        best_weights=best_weights,
    )


def test_a_checkpoint_reads_back_what_was_written(tmp_path: Path) -> None:
    """Arrays keep dtype, shape and order; -inf, None and the history survive."""
    path = tmp_path / "checkpoint.npz"
    written = _state(best_weights=[np.ones((2, 2), dtype=np.float32)])
    write_checkpoint(path, written)
    state = read_checkpoint(path, "abc")
    assert state is not None
    assert (state.phase, state.phase_epochs_done, state.epochs_done) == ("frozen", 2, 2)
    assert state.best_val_auc == -np.inf and state.reduce_lr["best"] is None
    assert state.rows == written.rows and state.early_stopping == written.early_stopping
    for group in ("model_variables", "optimizer_variables", "best_weights"):
        for ours, theirs in zip(getattr(state, group), getattr(written, group), strict=True):
            assert ours.dtype == theirs.dtype and np.array_equal(ours, theirs)
    assert state.earlier_phases == set()
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.npz"]


def test_no_best_weights_read_back_as_none(tmp_path: Path) -> None:
    """A checkpoint written before any best epoch has no best weights."""
    write_checkpoint(tmp_path / "checkpoint.npz", _state())
    state = read_checkpoint(tmp_path / "checkpoint.npz", "abc")
    assert state is not None and state.best_weights is None


def test_a_stale_or_broken_checkpoint_starts_over(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Another fingerprint, a truncated file or none at all: None, and a warning for the two."""
    path = tmp_path / "checkpoint.npz"
    assert read_checkpoint(path, "abc") is None
    write_checkpoint(path, _state())
    with caplog.at_level(logging.WARNING):
        assert read_checkpoint(path, "another run") is None
    assert "is stale (another configuration or dataset)" in caplog.text
    path.write_bytes(path.read_bytes()[:100])
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert read_checkpoint(path, "abc") is None
    assert "is unreadable" in caplog.text


def test_tensorboard_needs_tensorflow_and_the_tensorboard_package(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Without the tensorboard package: no logs, and a warning naming the package."""
    assert backend.tensorboard_available() is True
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with caplog.at_level(logging.WARNING):
        assert backend.tensorboard_available() is False
    assert "the tensorboard package is not installed (pip install tensorboard)" in caplog.text


def test_a_checkpoint_of_another_model_shape_is_a_user_error(tmp_path: Path) -> None:
    """Values that do not fit the variables are refused with one sentence."""
    variables = [keras.Variable(np.zeros((2, 3), dtype=np.float32))]
    with pytest.raises(UserError, match=r"checkpoint.npz does not fit the model being trained "
                       r"\(written by another lungct version\?\); delete it or run with "
                       r"--overwrite\."):
        assign_values(variables, [np.zeros((3, 2), dtype=np.float32)],
                      tmp_path / "checkpoint.npz", "model")


class _InterruptedError(Exception):
    """Stands in for a kill: raised at the n-th epoch_saved kill point."""


def _stand_in_backbone(include_top, weights, input_shape, name):
    """A tiny keras.applications-like backbone (conv, BatchNorm, conv)."""
    del include_top, weights
    image = keras.Input(input_shape)
    x = keras.layers.Conv2D(4, 3, name="conv1")(image)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.Activation("relu", name="relu1")(x)
    x = keras.layers.Conv2D(8, 3, name="conv2")(x)
    return keras.Model(image, keras.layers.Activation("relu", name="top_relu")(x), name=name)


@pytest.mark.parametrize("interrupt_after_epoch", [1, 2])
def test_a_transfer_run_resumes_in_its_phase(
    interrupt_after_epoch: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Interrupted after the frozen phase or inside fine-tuning: the resumed run skips what had
    ended and ends with the uninterrupted run's history and weights."""
    spec = models.BackboneSpec(_stand_in_backbone, "stand_in.h5", "https://invalid", "top_relu")
    monkeypatch.setitem(models.BACKBONES, "resnet50", spec)
    dataset = write_tiny_dataset(tmp_path / "output_dataset", {"train": 8, "val": 4, "test": 4})

    def config(out: str) -> TrainConfig:
        return TrainConfig(dataset_dir=dataset, out_dir=tmp_path / out, models=("resnet50",),
                           weights="none", frozen_epochs=1, fine_tune_epochs=2,
                           fine_tune_layers=2, batch_size=8, seed=5, progress="none")

    reference = train.run(config("reference"))["models"]["resnet50"]
    saved = {"count": 0}

    def interrupt(stage: str, step: str) -> None:
        saved["count"] += 1
        if saved["count"] == interrupt_after_epoch:
            raise _InterruptedError

    with monkeypatch.context() as patch:
        patch.setattr(trainloop, "kill_point", interrupt)
        with pytest.raises(_InterruptedError):
            train.run(config("resumed"))
    with caplog.at_level(logging.INFO):
        resumed = train.run(config("resumed"))["models"]["resnet50"]
    assert f"resuming {'frozen' if interrupt_after_epoch == 1 else 'fine_tune'} after epoch "\
           f"{interrupt_after_epoch}" in caplog.text
    assert ("resnet50 frozen: finished before the interruption" in caplog.text) is (
        interrupt_after_epoch == 2)
    for history in (reference["history"], resumed["history"]):
        history.pop("seconds")
    assert resumed["history"] == reference["history"]
    assert resumed["history"]["phase"] == ["frozen", "fine_tune", "fine_tune"]
    assert resumed["fine_tuned_layers"] == reference["fine_tuned_layers"] == ["conv2"]
    weights = [keras.models.load_model(tmp_path / out / "runs/resnet50/model.keras").get_weights()
               for out in ("reference", "resumed")]
    assert all(np.array_equal(a, b) for a, b in zip(*weights, strict=True))
    assert not (tmp_path / "resumed/runs/resnet50" / trainloop.CHECKPOINT_FILE).exists()
