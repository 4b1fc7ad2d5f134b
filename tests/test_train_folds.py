"""Tests of lungct.train.folds and of training with --folds K (fold ensembles, calibration)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import training_lung_cnn
from lungct import contract
from lungct.errors import UserError
from lungct.modelio import ensemble_members, load_classifier
from lungct.train import folds
from lungct.train.calibration import sigmoid
from lungct.train.image_cache import SplitData, load_split


def _labels(n_cancer: int, n_clear: int) -> dict[str, int]:
    return {**{f"C{i:02d}": 1 for i in range(n_cancer)}, **{f"N{i:02d}": 0 for i in range(n_clear)}}


def test_every_patient_is_in_exactly_one_fold_stratified_by_label() -> None:
    """7 + 5 patients in 3 folds: each fold holds 2-3 cancer and 1-2 clear patients."""
    labels = _labels(7, 5)
    assignment = folds.assign_folds(labels, 3, seed=4)
    assert sorted(assignment) == sorted(labels)
    for label in (0, 1):
        per_fold = np.bincount([k for p, k in assignment.items() if labels[p] == label],
                               minlength=3)
        assert per_fold.max() - per_fold.min() <= 1 and per_fold.min() >= 1
    assert sorted(np.bincount(list(assignment.values()))) == [4, 4, 4]


def test_fold_assignment_is_deterministic_by_seed() -> None:
    """The same seed gives the same folds whatever the dict order; another seed differs."""
    labels = _labels(10, 10)
    shuffled = dict(reversed(list(labels.items())))
    assert folds.assign_folds(labels, 4, 1) == folds.assign_folds(shuffled, 4, 1)
    assert folds.assign_folds(labels, 4, 1) != folds.assign_folds(labels, 4, 2)


def test_more_folds_than_patients_of_a_label_is_refused() -> None:
    """Three clear patients cannot fill four validation folds."""
    with pytest.raises(UserError, match=r"^--folds 4 needs at least 4 pooled train\+val "
                       r"patients of each label, but 9 have a cancer image and 3 have none; "
                       r"lower --folds\.$"):
        folds.assign_folds(_labels(9, 3), 4, 0)


def _split(name: str, patients: list[str], labels: list[int]) -> SplitData:
    count = len(patients)
    return SplitData(name, tuple(f"{name}/{i}.png" for i in range(count)), tuple(patients),
                     np.array(labels, dtype=np.int8),
                     np.arange(count, dtype=np.uint8).reshape(count, 1, 1, 1) + 10 * len(name))


def test_fold_splits_keep_each_patient_on_one_side() -> None:
    """A patient's images all validate in its fold; the folds' validation rows tile the pool."""
    train = _split("train", ["A", "A", "B", "C", "C", "D"], [1, 0, 0, 1, 1, 0])
    val = _split("val", ["E", "F", "F"], [0, 1, 0])
    plan = folds.plan_folds(train, val, 2, seed=0)
    assert plan.pooled.paths == train.paths + val.paths
    assert folds.patient_labels(plan.pooled) == {"A": 1, "B": 0, "C": 1, "D": 0, "E": 0, "F": 1}
    rows = np.concatenate([plan.validation_indices(k) for k in range(2)])
    assert sorted(rows.tolist()) == list(range(9))
    for fold in range(2):
        fold_train, fold_val = plan.split(fold)
        assert set(fold_val.patient_ids) == set(plan.patients(fold))
        assert not set(fold_train.patient_ids) & set(fold_val.patient_ids)
        assert set(fold_val.labels.tolist()) == {0, 1}
        assert np.array_equal(fold_val.images[:, 0, 0, 0],
                              plan.pooled.images[plan.validation_indices(fold), 0, 0, 0])


# --------------------------------------------------------------------------- end to end
def _train_args(dataset: Path, out: Path, *extra: str) -> list[str]:
    return ["--dataset", str(dataset), "--out", str(out), "--models", "baseline",
            "--preset", "quick", "--epochs", "1", "--batch-size", "8", "--seed", "5", *extra]


@pytest.fixture(scope="module")
def folds_run(pipeline: dict[str, Path],
              tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """The shared 12-patient pipeline dataset trained with --folds 2: (dataset, out, results)."""
    dataset, out = pipeline["dataset"], tmp_path_factory.mktemp("folds") / "out"
    assert training_lung_cnn.main(_train_args(dataset, out, "--folds", "2", "-q")) == 0
    results = json.loads((out / contract.RESULTS_FILE).read_text(encoding="utf-8"))
    return dataset, out, results


def test_folds_pool_train_and_validation_and_leave_test_untouched(folds_run) -> None:
    """OOF validation covers the train and val images; test is the manifest's test split."""
    dataset, _, results = folds_run
    manifest = contract.read_manifest(dataset)
    pooled = manifest[manifest["split"] != "test"]
    test = manifest[manifest["split"] == "test"]
    assert results["config"]["folds"] == 2
    assert sorted(results["validation"]["paths"]) == sorted(pooled["path"])
    assert results["test"]["paths"] == list(test["path"])
    cross_validation = results["cross_validation"]
    assert cross_validation["folds"] == 2 and cross_validation["selected"] == "baseline"
    assert cross_validation["stratified_by"] == "patient label"
    assert sorted(cross_validation["fold_of_patient"]) == sorted(set(pooled["patient_id"]))
    assert set(cross_validation["fold_of_patient"].values()) == {0, 1}
    assert not set(cross_validation["fold_of_patient"]) & set(test["patient_id"])


def test_fold_aucs_and_out_of_fold_auc_are_recorded(folds_run) -> None:
    """Two fold AUCs, their mean and sample std, and the OOF AUC that selection used."""
    _, _, results = folds_run
    entry = results["cross_validation"]["models"]["baseline"]
    aucs = entry["fold_val_auc"]
    assert len(aucs) == 2 and all(0.0 <= value <= 1.0 for value in aucs)
    assert entry["mean"] == pytest.approx(np.mean(aucs))
    assert entry["std"] == pytest.approx(abs(aucs[0] - aucs[1]) / np.sqrt(2))
    assert entry["oof_val_auc"] == results["models"]["baseline"]["val_auc"]
    model = results["models"]["baseline"]
    assert len(model["history"]) == len(model["n_train_images"]) == 2
    assert sum(model["n_train_images"]) == len(results["validation"]["paths"])


def test_calibration_and_threshold_use_the_pooled_calibrated_predictions(folds_run) -> None:
    """T is fitted on OOF logits; y_prob = sigmoid(logit / T) beside the uncalibrated one."""
    _, _, results = folds_run
    calibration = results["calibration"]
    temperature = calibration["temperature"]
    assert calibration["fitted_on"] == "pooled out-of-fold validation logits"
    assert calibration["n"] == len(results["validation"]["paths"])
    assert calibration["val_log_loss_after"] <= calibration["val_log_loss_before"]
    for key in ("validation", "test"):
        block = results[key]
        logits = np.log(np.asarray(block["y_prob_uncalibrated"], np.float64)
                        / (1 - np.asarray(block["y_prob_uncalibrated"], np.float64)))
        assert np.allclose(block["y_prob"], sigmoid(logits, temperature), atol=1e-5)
    threshold = results["threshold"]
    assert threshold["rule"] == "youden_j_on_calibrated_pooled_out_of_fold_validation"
    assert threshold["value"] in results["validation"]["y_prob"]


def test_selected_model_is_the_calibrated_fold_ensemble(folds_run) -> None:
    """The saved files are the 2-member ensemble with T; they reproduce the test y_prob."""
    dataset, out, results = folds_run
    model_entry = results["models"]["baseline"]
    assert model_entry["model_path"] == contract.MODEL_FILES["keras"]
    assert model_entry["grad_cam_layer"] == ["fold0/last_conv", "fold1/last_conv"]
    assert set(results["files_sha256"]) == {
        "lung_cancer_cnn_enhanced.h5", "lung_cancer_cnn_enhanced.keras",
        "runs/baseline/fold0/model.keras", "runs/baseline/fold1/model.keras",
        "runs/baseline/ensemble.keras"}
    manifest = contract.read_manifest(dataset)
    images = load_split(dataset, manifest, "test").images
    for relative, key in ((contract.MODEL_FILES["h5"], "y_prob"),
                          ("runs/baseline/ensemble.keras", "y_prob_uncalibrated")):
        model = load_classifier(out / relative, 32, "a test")
        assert [member.name for member in ensemble_members(model)] == ["fold0", "fold1"]
        assert np.allclose(model.predict(images, verbose=0)[:, 0], results["test"][key],
                           atol=1e-6)
    temperature_layer = load_classifier(out / contract.MODEL_FILES["keras"], 32,
                                        "a test").get_layer("temperature")
    assert temperature_layer.scale == pytest.approx(1 / results["calibration"]["temperature"])


def test_rerun_reuses_every_fold(folds_run, capsys: pytest.CaptureFixture[str]) -> None:
    """The same command again reuses runs/baseline/fold0 and fold1 and records the same."""
    dataset, out, results = folds_run
    capsys.readouterr()
    assert training_lung_cnn.main(_train_args(dataset, out, "--folds", "2")) == 0
    logged = capsys.readouterr().err
    assert "baseline fold 1/2: reusing" in logged
    assert "baseline fold 2/2: reusing" in logged
    again = json.loads((out / contract.RESULTS_FILE).read_text(encoding="utf-8"))
    assert again["test"] == results["test"]
    assert again["cross_validation"] == results["cross_validation"]


@pytest.mark.parametrize(("folds_flag", "message"), [
    ("0", "argument --folds: expected a positive integer, got 0"),
    ("two", "argument --folds: expected a positive integer, got 'two'"),
    ("21", "--folds must be an integer from 1 to 20, got 21."),
    ("4", "--folds 4 needs at least 4 pooled train+val patients of each label"),
])
def test_bad_folds_exit_2_with_one_sentence(folds_run, tmp_path: Path, folds_flag: str,
                                            message: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """--folds outside 1..20, or above the clear patients (3 here), exits 2 before training."""
    dataset, _, _ = folds_run
    try:
        code = training_lung_cnn.main(_train_args(dataset, tmp_path, "--folds", folds_flag))
    except SystemExit as stopped:
        code = stopped.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
