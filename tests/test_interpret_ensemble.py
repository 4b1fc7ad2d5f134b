"""The interpretation stage on a cross-validated, calibrated fold ensemble of 3-channel (2.5D)
images, and the model card (lungct.interpret.model_card)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from interpret_fixtures import SIDE_PLANE_SCALE, ensemble_model, make_dataset, write_results

from lungct import contract
from lungct.fingerprint import file_sha256
from lungct.interpret.model_card import MODEL_CARD_FILE, failure_groups
from lungct.interpret.report import OUTPUT_FILES
from lungct.interpret.stage import InterpretConfig, run
from lungct.interpret.weakness import analyse_weaknesses

TEMPERATURE = 1.7


@pytest.fixture(scope="module")
def ensemble_run(tmp_path_factory) -> tuple[dict, Path, Path]:
    """Report, report folder and dataset of a 2-fold ensemble with T = 1.7 on RGB images."""
    root = tmp_path_factory.mktemp("ensemble")
    dataset = make_dataset(root, channels=3, seed=5)
    results = write_results(root, dataset, ensemble_model(32, channels=3,
                                                          temperature=TEMPERATURE),
                            temperature=TEMPERATURE, folds=2)
    out = root / "reports"
    report = run(InterpretConfig(results_path=results, out_dir=out, bootstrap_resamples=100))
    return report, out, dataset


def test_gradcam_explains_every_member(ensemble_run):
    """The layer names each member's; the randomisation check runs per member and pools;
    the probabilities of the Grad-CAM pass (temperature applied) match the recorded ones."""
    gradcam = ensemble_run[0]["gradcam"]
    assert gradcam["layer"] == "fold0/last_conv, fold1/last_conv"
    assert gradcam["ensemble_members"] == ["fold0", "fold1"]
    check = gradcam["randomization_check"]
    assert set(check["members"]) == {"fold0", "fold1"}
    assert check["members"]["fold0"]["reinitialised_layers"] == ["block2_conv", "block2_bn",
                                                                 "logit"]
    assert check["n_images"] == 2 * check["members"]["fold1"]["n_images"]
    assert "fold1/logit" in check["reinitialised_layers"]
    assert gradcam["probability_max_abs_difference"] < 1e-4


def test_overlays_show_the_centre_plane_in_grey(ensemble_run):
    """The left half of an overlay is the image's G plane (z) enlarged, grey, not a side
    plane (z-D, z+D are the centre times SIDE_PLANE_SCALE in the fixture)."""
    report, out, dataset = ensemble_run
    manifest = contract.read_manifest(dataset)
    path = manifest[(manifest["split"] == "test") & (manifest["label"] == 1)]["path"].iloc[0]
    overlay = cv2.cvtColor(cv2.imread(str(out / "gradcam" / (path.replace("/", "__")))),
                           cv2.COLOR_BGR2RGB)
    image = contract.read_png(dataset / path, channels=3)
    left = overlay[:, :overlay.shape[0]]
    centre = cv2.resize(image[..., 1], left.shape[:2], interpolation=cv2.INTER_NEAREST)
    for channel in range(3):
        np.testing.assert_array_equal(left[..., channel], centre)
    assert not np.array_equal(image[..., 0], image[..., 1])
    assert image[..., 0].max() == round(image[..., 1].max() * SIDE_PLANE_SCALE)


def test_calibration_before_and_after(ensemble_run):
    """Brier, log loss and ECE before and after T, each with a CI and a reference ECE."""
    calibration = ensemble_run[0]["calibration"]
    assert calibration["temperature"] == TEMPERATURE
    assert calibration["val_log_loss_before"] == 0.7
    for phase in ("before", "after"):
        for metric in ("brier", "log_loss", "ece"):
            block = calibration[phase][metric]
            assert block["ci_low"] <= block["value"] <= block["ci_high"]
        assert calibration[phase]["ece_reference"]["n"] == \
            ensemble_run[0]["slice_level"]["n"]["total"]
    assert calibration["after"]["ece"] == calibration["ece"]
    assert calibration["before"]["log_loss"]["value"] != calibration["after"]["log_loss"]["value"]


def test_cross_validation_section(ensemble_run):
    """report.json and report.html carry the folds, and say the test metrics are the
    ensemble's."""
    report, out, _ = ensemble_run
    block = report["cross_validation"]
    assert block["folds"] == 2 and block["models"]["baseline"]["fold_val_auc"] == [0.6, 0.65]
    html = (out / "report.html").read_text()
    assert "Cross-validation (2 folds, stratified by patient label)" in html
    assert "are those of the 2-member baseline ensemble" in html
    assert "before temperature scaling" in html and "<h2>Model card</h2>" in html


def test_models_are_compared_when_the_selected_one_is_an_ensemble(ensemble_run):
    """The paired AUC difference against the other model is computed at every level."""
    other = ensemble_run[0]["models"]["vgg16"]
    assert set(other["auc_difference_vs_selected"]) == {"slice_level", "nodule_level",
                                                        "patient_level"}


def test_model_card_is_written_from_the_report(ensemble_run):
    """model_card.json is part of the output set; its numbers are the report's."""
    report, out, _ = ensemble_run
    assert MODEL_CARD_FILE in OUTPUT_FILES
    card = json.loads((out / MODEL_CARD_FILE).read_text())
    assert card["model"]["kind"] == "ensemble of 2 cross-validation members (mean logit)"
    assert card["model"]["input"]["channel_order"] == ["z-D", "z", "z+D"]
    assert card["metrics"]["patient_level"]["auc"] == report["patient_level"]["auc"]
    assert card["calibration"]["after"]["ece"] == report["calibration"]["ece"]
    assert card["training"]["folds"] == 2 and card["inputs_sha256"] == report["inputs_sha256"]
    assert "research" in card["intended_use"]["primary_use"]
    assert report["files_sha256"][MODEL_CARD_FILE] == file_sha256(out / MODEL_CARD_FILE)


def test_a_changed_output_file_is_recomputed(ensemble_run, tmp_path):
    """Reuse needs every output file as report.json recorded it: an edited model card makes
    the next run recompute."""
    _, out, _ = ensemble_run
    results = out.parent / "training_results.json"
    config = InterpretConfig(results_path=results, out_dir=out, bootstrap_resamples=100)
    before = (out / "report.json").stat().st_mtime_ns
    run(config)
    assert (out / "report.json").stat().st_mtime_ns == before
    (out / MODEL_CARD_FILE).write_text("{}")
    run(config)
    assert (out / "report.json").stat().st_mtime_ns != before
    assert json.loads((out / MODEL_CARD_FILE).read_text())["model"]["name"] == "baseline"


def test_failure_groups_are_above_the_class_rate():
    """Groups of at least 3 slices whose error rate exceeds their class's, highest first."""
    frame = pd.DataFrame({
        "path": [f"s{i}.png" for i in range(10)], "patient_id": list("AABBCCDDEE"),
        "y_true": [1] * 6 + [0] * 4,
        "y_prob": [0.1, 0.2, 0.3, 0.9, 0.9, 0.9, 0.1, 0.1, 0.1, 0.9],
        "negative_kind": [""] * 6 + ["no_finding"] * 4,
        "diameter_mm": [4.0, 5.0, 4.5, 15.0, 15.0, 15.0, np.nan, np.nan, np.nan, np.nan],
        "malignancy": [4.0] * 6 + [np.nan] * 4, "n_readers": [2.0] * 6 + [np.nan] * 4})
    groups = failure_groups(analyse_weaknesses(frame, 0.5))
    assert groups == [{"kind": "missed cancers", "factor": "diameter_mm", "group": "<6 mm",
                       "n": 3, "errors": 3, "rate": 1.0, "overall_rate": 0.5}]
