"""Stage 4 with a slice-view model: every slice of every series scored, and the consistency
check (predict on the raw DICOM of the test patients reproduces every test slice's recorded
probability)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from conftest import write_ct_slice
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import RLELossless

import predict_lung_ct
import prepare_lung_dataset
import training_lung_cnn


def _trained(root: Path, *prepare_args: str) -> dict[str, Path]:
    """A slice-view dataset of 8 synthetic patients (32 px) and a 1-epoch baseline."""
    dataset = root / "output_dataset"
    assert prepare_lung_dataset.main([
        "--source", "synthetic", "--synthetic-patients", "8", "--synthetic-size", "64",
        "--view", "slice", "--image-size", "32", "--target-count", "80",
        "--split", "0.5,0.25,0.25", "--work-dir", str(root), "--output", str(dataset),
        "--workers", "1", "-q", *prepare_args]) == 0
    assert training_lung_cnn.main([
        "--dataset", str(dataset), "--out", str(root), "--models", "baseline",
        "--preset", "quick", "--epochs", "1", "--batch-size", "8", "-q"]) == 0
    return {"root": root, "dataset": dataset, "results": root / "training_results.json"}


@pytest.fixture(scope="module")
def slice_model(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One channel per image."""
    return _trained(tmp_path_factory.mktemp("slice_model"))


@pytest.fixture(scope="module")
def context_model(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """2.5D: three channels, the planes at z - 2.5 mm, z, z + 2.5 mm."""
    return _trained(tmp_path_factory.mktemp("context_model"), "--context-mm", "2.5")


@pytest.mark.parametrize("model", ["slice_model", "context_model"])
def test_every_test_slice_reproduces_training(model: str, request: pytest.FixtureRequest,
                                              tmp_path: Path) -> None:
    """Each test slice: |predict - training| <= 1e-4; every slice of the series is scored
    (with 2.5D context, all but the two end slices, whose context lies outside the series).

    The patients are chosen with --patient-id from the whole raw cohort."""
    trained = request.getfixturevalue(model)
    results = json.loads(trained["results"].read_text())
    channels = results["dataset"]["channels"]
    assert channels == (3 if model == "context_model" else 1)
    manifest = pd.read_csv(trained["dataset"] / "manifest.csv", dtype=str,
                           keep_default_na=False).set_index("path")
    patients = sorted(set(results["test"]["patient_ids"]))
    out = tmp_path / "predictions"
    args = ["--input", str(trained["root"] / "raw_synthetic"),
            *(arg for p in patients for arg in ("--patient-id", p))]
    assert predict_lung_ct.main([*args, "--results", str(trained["results"]),
                                 "--out", str(out), "--workers", "2", "--gradcam-top", "1",
                                 "--batch-size", "16", "-q"]) == 0
    checked = 0
    for path, probability in zip(results["test"]["paths"], results["test"]["y_prob"],
                                 strict=True):
        row = manifest.loc[path]
        with (out / row.series_uid / "slices.csv").open(newline="") as handle:
            slices = list(csv.DictReader(handle))
        scored = [s for s in slices if s["z_mm"] == row.slice_z_mm]
        assert len(scored) == 1 and scored[0]["place"] == "every_slice"
        assert abs(float(scored[0]["probability"]) - probability) <= 1e-4, path
        checked += 1
    assert checked == len(results["test"]["paths"]) > 0
    with (out / "summary.csv").open(newline="") as handle:
        summary = list(csv.DictReader(handle))
    assert {r["patient_id"] for r in summary} == set(patients)
    ends = 2 if channels == 3 else 0
    for row in summary:
        n_dicom = len(list((trained["root"] / "raw_synthetic" / row["patient_id"]).rglob(
            "*.dcm")))
        assert int(row["n_scored"]) == n_dicom - ends
        record = json.loads((out / row["series_uid"] / "series.json").read_text())
        assert sorted(record["input_files_skipped"].values()) == [
            "2.5D context z + 2.5 mm outside the series",
            "2.5D context z - 2.5 mm outside the series"][:ends]
        assert len(list((out / row["series_uid"] / "gradcam").glob("*.png"))) == 1


def _undecodable_series(folder: Path, n_slices: int = 3) -> str:
    """CT slices whose headers pass indexing but whose RLE pixel data decode short."""
    hu = np.random.default_rng(0).normal(-500, 300, (64, 64))  # one reason for every slice
    for index in range(n_slices):
        path = write_ct_slice(folder / f"{index}.dcm", hu,
                              2.5 * index, series_uid="1.2.3.999", patient_id="BROKEN-1",
                              instance_number=index + 1)
        ds = pydicom.dcmread(path)
        ds.compress(RLELossless)
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
        ds.PixelData = encapsulate([frame[:64] + b"\x7f" * (len(frame) - 64)])
        ds.save_as(path)
    return "1.2.3.999"


def test_a_failing_series_exits_1_and_the_others_are_scored(slice_model: dict,
                                                            tmp_path: Path) -> None:
    """A series none of whose slices decode: errors.csv says why, exit 1, the rest scored."""
    bad_uid = _undecodable_series(tmp_path / "broken")
    patient = sorted(json.loads(slice_model["results"].read_text())["test"]["patient_ids"])[0]
    out = tmp_path / "predictions"
    code = predict_lung_ct.main(["--input", str(tmp_path / "broken"), "--input",
                                 str(slice_model["root"] / "raw_synthetic" / patient),
                                 "--results", str(slice_model["results"]), "--out", str(out),
                                 "--workers", "1", "--gradcam-top", "0", "-q"])
    assert code == 1
    with (out / "errors.csv").open(newline="") as handle:
        (error,) = list(csv.DictReader(handle))
    assert error["series_uid"] == bad_uid and error["patient_id"] == "BROKEN-1"
    assert error["reason"] == "no image could be drawn: RLE segment decodes to 4042 of 4096 bytes"
    with (out / "summary.csv").open(newline="") as handle:
        status = {r["patient_id"]: r["status"] for r in csv.DictReader(handle)}
    assert status == {patient: "scored", "BROKEN-1": f"failed: {error['reason']}"}
