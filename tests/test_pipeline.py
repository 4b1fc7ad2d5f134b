"""The CLIs in order on a tiny synthetic cohort: each stage accepts what the previous wrote.

The session-scoped ``pipeline`` fixture (tests/conftest.py) runs prepare, one epoch of the
baseline and the interpretation once, in-process; these tests read its outputs back through
:mod:`lungct.contract`, the same readers the stages use, and run predict (stage 4) on the raw
DICOM of the test patients: the consistency check.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

import predict_lung_ct
import training_lung_cnn
from lungct import contract
from lungct.errors import UserError


def test_prepare_writes_what_the_contract_reads(pipeline: dict[str, Path]) -> None:
    """manifest.csv and dataset.json pass the contract; every listed PNG reads back."""
    dataset = pipeline["dataset"]
    manifest = contract.read_manifest(dataset)
    info = contract.read_dataset_info(dataset)
    assert info["schema_version"] == contract.SCHEMA_VERSION
    rule = info["label_rule"]
    assert set(rule["nodules_single_reader"]) == set(rule["nodules"])
    assert all(0 <= rule["nodules_single_reader"][k] <= n for k, n in rule["nodules"].items())
    assert rule["clustering"].startswith("marks of different readers linked")
    assert info["series"] == {"series": 12, "with_z_gaps": 0, "z_gaps": 0}
    assert set(manifest["lossy"]) == {"0"}
    assert (manifest["slice_thickness_mm"] > 0).all()
    assert info["n_images"] == len(manifest)
    assert set(manifest["split"]) == set(contract.SPLITS)
    assert set(manifest["label"]) == {0, 1}
    assert (manifest["schema_version"] == str(contract.SCHEMA_VERSION)).all()
    for path in manifest["path"]:
        assert contract.read_png(dataset / path, size_px=info["image_size"]).dtype == "uint8"


def test_training_results_pass_the_contract(pipeline: dict[str, Path]) -> None:
    """training_results.json passes the contract and scores exactly the manifest's test rows."""
    results = contract.read_training_results(pipeline["results"])
    manifest = contract.read_manifest(pipeline["dataset"])
    test_rows = manifest[manifest["split"] == "test"]
    assert results["best_model"] == "baseline"
    assert results["test"]["paths"] == test_rows["path"].tolist()
    assert results["test"]["y_true"] == test_rows["label"].tolist()
    assert results["dataset_manifest_sha256"] == contract.manifest_sha256(pipeline["dataset"])
    assert results["config"]["gradcam_max_images"] == 64
    for name in contract.MODEL_FILES.values():
        assert (pipeline["results"].parent / name).is_file()


def test_report_describes_the_trained_run(pipeline: dict[str, Path]) -> None:
    """report.json scores the test split training recorded, with the recorded threshold."""
    report = json.loads((pipeline["reports"] / "report.json").read_text(encoding="utf-8"))
    results = contract.read_training_results(pipeline["results"])
    assert report["slice_level"]["n"]["total"] == len(results["test"]["paths"])
    assert report["threshold"]["value"] == results["threshold"]["value"]
    assert report["selected_model"] == "baseline"
    assert report["data"]["synthetic"] is True
    assert (pipeline["reports"] / "report.html").is_file()


def test_a_dropped_manifest_column_stops_training_with_the_contracts_sentence(
    pipeline: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Training a dataset whose manifest lost a column exits 2 with the contract's message."""
    broken = tmp_path / "broken_dataset"
    shutil.copytree(pipeline["dataset"], broken, ignore=shutil.ignore_patterns("cache"))
    manifest = pd.read_csv(broken / contract.MANIFEST_FILE, dtype=str, keep_default_na=False)
    manifest.drop(columns="patient_id").to_csv(broken / contract.MANIFEST_FILE, index=False)
    code = training_lung_cnn.main(["--dataset", str(broken), "--out", str(tmp_path / "out"),
                                   "--models", "baseline", "-q"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{broken / contract.MANIFEST_FILE} lacks the columns patient_id" in err
    assert "Traceback" not in err


def test_an_unknown_schema_version_is_refused(pipeline: dict[str, Path], tmp_path: Path) -> None:
    """A training_results.json from another schema version is refused in one sentence."""
    results = json.loads(pipeline["results"].read_text(encoding="utf-8"))
    path = tmp_path / contract.RESULTS_FILE
    path.write_text(json.dumps({**results, "schema_version": 99}), encoding="utf-8")
    with pytest.raises(UserError, match="has schema_version 99 but this lungct reads"):
        contract.read_training_results(path)


def test_predict_on_the_raw_test_scans_reproduces_training(pipeline: dict[str, Path],
                                                           tmp_path: Path) -> None:
    """Consistency check: predict on the test patients' raw DICOM, at the manifest's patch
    centres (a --nodules CSV), gives every test sample the probability training recorded
    (absolute difference <= 1e-4)."""
    results = contract.read_training_results(pipeline["results"])
    manifest = contract.read_manifest(pipeline["dataset"]).set_index("path")
    test = manifest.loc[results["test"]["paths"]].assign(y_prob=results["test"]["y_prob"])
    nodules = tmp_path / "nodules.csv"
    test.rename(columns={"patch_centre_x_mm": "x_mm", "patch_centre_y_mm": "y_mm",
                         "slice_z_mm": "z_mm"})[["series_uid", "x_mm", "y_mm", "z_mm"]].to_csv(
        nodules, index=False, float_format="%.3f")
    out = tmp_path / "predictions"
    patients = [arg for p in sorted(set(test["patient_id"])) for arg in ("--patient-id", p)]
    assert predict_lung_ct.main(["--input", str(pipeline["root"] / "raw_synthetic"), *patients,
                                 "--results", str(pipeline["results"]), "--nodules", str(nodules),
                                 "--out", str(out), "--workers", "1", "--gradcam-top", "0",
                                 "-q"]) == 0
    for row in test.itertuples():
        slices = pd.read_csv(out / row.series_uid / "slices.csv")
        at = slices[(abs(slices["z_mm"] - row.slice_z_mm) < 0.005)
                    & (abs(slices["patch_centre_x_mm"] - row.patch_centre_x_mm) < 0.01)
                    & (abs(slices["patch_centre_y_mm"] - row.patch_centre_y_mm) < 0.01)]
        assert len(at) == 1, row.Index
        assert abs(float(at["probability"].iloc[0]) - row.y_prob) <= 1e-4, row.Index
