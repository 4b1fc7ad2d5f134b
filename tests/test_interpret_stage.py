"""Tests of interpretation.py and lungct.interpret.stage on a tiny fabricated stage-2 run."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pandas as pd
import pytest
from interpret_fixtures import fabricate_run, make_baseline_model, make_dataset, write_results

from interpretation import main
from lungct.interpret.report import OUTPUT_FILES
from lungct.interpret.stage import InterpretConfig, gradcam_max, run
from lungct.sampling import stratified_draw

DESIGN_KEYS = {"slice_level", "nodule_level", "patient_level", "models", "calibration",
               "gradcam", "metadata_baseline", "weaknesses", "data"}
LEVEL_METRICS = {"auc", "average_precision", "sensitivity", "specificity", "ppv", "npv",
                 "accuracy", "f1"}


@pytest.fixture(autouse=True)
def restore_logging():
    """main() binds the root logger to the captured stderr; put the handlers back after."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="module")
def fabricated(tmp_path_factory) -> Path:
    """Folder with output_dataset/, runs/baseline/model.keras and training_results.json."""
    root = tmp_path_factory.mktemp("stage2")
    fabricate_run(root)
    return root


@pytest.fixture(scope="module")
def cli_run(fabricated) -> tuple[int, Path]:
    """Exit code and report folder of one CLI run (bootstrap 200)."""
    out = fabricated / "reports"
    code = main(["--results", str(fabricated / "training_results.json"), "--out", str(out),
                 "--bootstrap", "200", "-q"])
    return code, out


def modified_results(fabricated: Path, tmp_path: Path, change) -> Path:
    """A copy of training_results.json, with its runs/, edited by ``change``."""
    results = json.loads((fabricated / "training_results.json").read_text())
    shutil.copytree(fabricated / "runs", tmp_path / "runs", dirs_exist_ok=True)
    change(results)
    path = tmp_path / "training_results.json"
    path.write_text(json.dumps(results))
    return path


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = main([*args, "--out", str(Path(args[1]).parent / "reports"), "--bootstrap", "50"])
    return code, capsys.readouterr().err


def test_cli_writes_every_output(cli_run):
    """Exit 0; figures, overlays, report.html and report.json exist."""
    code, out = cli_run
    assert code == 0
    assert all((out / name).is_file() for name in OUTPUT_FILES)
    assert len(list((out / "gradcam").glob("*.png"))) >= 4


def test_report_json_has_design_keys(cli_run):
    """report.json carries the keys of docs/formats.md and each level's metric blocks."""
    report = json.loads((cli_run[1] / "report.json").read_text())
    assert set(report) >= DESIGN_KEYS
    for level in ("slice_level", "nodule_level", "patient_level"):
        assert set(report[level]) >= LEVEL_METRICS
        assert {"threshold", "confusion_matrix", "n"} <= set(report[level])
    assert {"wilson_low", "wilson_high"} <= set(report["patient_level"]["sensitivity"])
    assert {"brier", "ece"} <= set(report["calibration"])
    assert {"method", "layer", "n_images", "pointing_game", "energy_in_roi",
            "randomization_check"} <= set(report["gradcam"])


def test_report_values_follow_the_inputs(cli_run, fabricated):
    """Threshold, model marks, Grad-CAM counts and provenance come from the inputs."""
    report = json.loads((cli_run[1] / "report.json").read_text())
    results = json.loads((fabricated / "training_results.json").read_text())
    manifest = pd.read_csv(fabricated / "output_dataset/manifest.csv", keep_default_na=False)
    test = manifest[manifest["split"] == "test"]
    assert report["slice_level"]["threshold"] == results["threshold"]["value"]
    assert report["slice_level"]["n"]["total"] == len(test)
    assert report["models"]["baseline"]["selected"] is True
    assert report["models"]["vgg16"]["selected"] is False
    assert "patient_level" in report["models"]["vgg16"]["auc_difference_vs_selected"]
    assert report["gradcam"]["n_images"] == int((test["mask_path"] != "").sum())
    assert report["gradcam"]["layer"] == "last_conv"
    assert report["gradcam"]["probability_max_abs_difference"] < 1e-4
    assert report["data"]["synthetic"] is True
    assert report["metadata_baseline"]["auc"]["value"] is not None


def test_rerun_with_same_inputs_is_a_no_op(cli_run, fabricated, capsys):
    """A second run with the same inputs leaves report.json untouched."""
    out = cli_run[1]
    before = (out / "report.json").stat().st_mtime_ns
    code = main(["--results", str(fabricated / "training_results.json"), "--out", str(out),
                 "--bootstrap", "200"])
    assert code == 0 and (out / "report.json").stat().st_mtime_ns == before
    assert "up to date" in capsys.readouterr().err


def test_missing_results_is_one_clear_sentence(tmp_path, capsys):
    """A missing training_results.json exits 2 with a sentence, no traceback."""
    code, err = run_cli(["--results", str(tmp_path / "training_results.json")], capsys)
    assert code == 2
    assert "training_results.json not found: run training_lung_cnn.py first" in err
    assert "Traceback" not in err


def test_moved_dataset_is_reported(fabricated, tmp_path, capsys):
    """A dataset folder that moved names the recorded path and --dataset."""
    path = modified_results(fabricated, tmp_path,
                            lambda r: r["config"].update(dataset_dir="moved_away"))
    code, err = run_cli(["--results", str(path)], capsys)
    assert code == 2 and "moved or deleted?): pass --dataset DIR" in err


def test_missing_model_is_reported(fabricated, tmp_path, capsys):
    """A selected model file that is absent exits 2 naming the model."""
    path = modified_results(fabricated, tmp_path, lambda r: r["models"]["baseline"].update(
        model_path="runs/none/model.keras"))
    code, err = run_cli(["--results", str(path)], capsys)
    assert code == 2 and "the selected model 'baseline' was not found" in err


def test_model_that_does_not_match_results(fabricated, tmp_path, capsys):
    """A model whose input size differs from the recorded image_size is refused."""
    path = modified_results(fabricated, tmp_path, lambda r: r["config"].update(image_size=64))
    code, err = run_cli(["--results", str(path)], capsys)
    assert code == 2 and "the model does not match the dataset" in err


def test_labels_that_disagree_with_manifest(fabricated, tmp_path, capsys):
    """Test labels that differ from manifest.csv mean the dataset changed."""
    def flip(results: dict) -> None:
        results["test"]["y_true"][0] = 1 - results["test"]["y_true"][0]

    code, err = run_cli(["--results", str(modified_results(fabricated, tmp_path, flip))], capsys)
    assert code == 2 and "disagree with manifest.csv" in err


def test_unknown_layer_lists_conv_layers(fabricated, tmp_path, capsys):
    """--gradcam-layer with a wrong name exits 2 listing the convolutional layers."""
    path = modified_results(fabricated, tmp_path, lambda r: None)
    code, err = run_cli(["--results", str(path), "--gradcam-layer", "block9"], capsys)
    assert code == 2 and "layer 'block9' is not in model" in err and "block4_conv" in err


def test_help_exits_zero(capsys):
    """--help prints the flags and exits 0."""
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0 and "--gradcam-max" in capsys.readouterr().out


def test_bad_gradcam_max_is_an_argument_error(capsys):
    """--gradcam-max 0 is rejected by the parser."""
    with pytest.raises(SystemExit) as done:
        main(["--gradcam-max", "0"])
    assert done.value.code == 2 and "positive integer or 'all'" in capsys.readouterr().err


def test_gradcam_max_defaults_to_the_recorded_cap():
    """The cap training recorded applies (64 quick, 0 = all); explicit values win."""
    quick, full = {"config": {"gradcam_max_images": 64}}, {"config": {"gradcam_max_images": 0}}
    assert gradcam_max(InterpretConfig(), quick) == 64
    assert gradcam_max(InterpretConfig(), full) is None
    assert gradcam_max(InterpretConfig(gradcam_max="all"), quick) \
        is None
    assert gradcam_max(InterpretConfig(gradcam_max=5), quick) == 5


def test_config_rejects_zero_resamples():
    """The config validates on construction and names the bad value."""
    with pytest.raises(ValueError, match="bootstrap_resamples must be >= 1, got 0"):
        InterpretConfig(bootstrap_resamples=0)


def test_stratified_draw_keeps_class_shares():
    """A capped draw keeps each class's share, is seeded and sorted."""
    labels = [0] * 30 + [1] * 10
    drawn = stratified_draw(pd.Series(labels).to_numpy(), 8, seed=3)
    assert len(drawn) == 8 and sum(labels[i] for i in drawn) == 2
    assert list(drawn) == sorted(drawn)
    assert list(drawn) == list(stratified_draw(pd.Series(labels).to_numpy(), 8, seed=3))


def test_one_class_test_split_reports_undefined_metrics(tmp_path):
    """A test split without cancer runs to the end: AUC null with its reason, no positives
    to localise, every output written."""
    dataset = make_dataset(tmp_path, seed=4)
    manifest = pd.read_csv(dataset / "manifest.csv", dtype=str, keep_default_na=False)
    manifest.loc[(manifest["split"] == "test") & (manifest["label"] == "1"), "split"] = "train"
    manifest.loc[(manifest["split"] == "test") & (manifest["negative_kind"] == "no_finding")
                 & manifest["patient_id"].isin(
                     manifest.loc[manifest["label"] == "1", "patient_id"]), "split"] = "train"
    manifest.to_csv(dataset / "manifest.csv", index=False)
    results = write_results(tmp_path, dataset, make_baseline_model(32, seed=4))
    report = run(InterpretConfig(results_path=results, out_dir=tmp_path / "reports",
                                 bootstrap_resamples=50))
    assert report["slice_level"]["auc"]["value"] is None
    assert "only class non_cancer" in report["slice_level"]["auc"]["reason"]
    assert report["patient_level"]["sensitivity"]["reason"] == "no positive units"
    assert report["gradcam"]["pointing_game"] == {"hits": 0, "total": 0, "rate": None,
                                                  "chance_rate": None}
    assert all((tmp_path / "reports" / name).is_file() for name in OUTPUT_FILES)
