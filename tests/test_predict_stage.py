"""Stage 4 end to end on the shared synthetic pipeline: the consistency check with the LIDC XML
candidates (predict on the raw DICOM of the test patients reproduces training's test
probabilities; with a --nodules CSV it is in tests/test_pipeline.py), the outputs,
--dicom-out, reuse and the exit codes."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

import predict_lung_ct
from lungct.predict.config import PredictConfig

TOLERANCE = 1e-4


def _test_inputs(pipeline: dict) -> list[str]:
    results = json.loads(pipeline["results"].read_text())
    patients = sorted(set(results["test"]["patient_ids"]))
    args = []
    for patient in patients:
        args += ["--input", str(pipeline["root"] / "raw_synthetic" / patient)]
    return args


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _test_samples(pipeline: dict) -> pd.DataFrame:
    results = json.loads(pipeline["results"].read_text())
    manifest = pd.read_csv(pipeline["dataset"] / "manifest.csv", dtype=str,
                           keep_default_na=False).set_index("path")
    frame = manifest.loc[results["test"]["paths"]].copy()
    frame["y_prob"] = results["test"]["y_prob"]
    return frame


@pytest.fixture(scope="module")
def xml_run(pipeline: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """predict on the test patients' raw DICOM + XML, with --dicom-out, once."""
    out = tmp_path_factory.mktemp("predict") / "predictions"
    assert predict_lung_ct.main([*_test_inputs(pipeline), "--results", str(pipeline["results"]),
                                 "--out", str(out), "--workers", "1", "--gradcam-top", "2",
                                 "--dicom-out", "-q"]) == 0
    return out


def test_xml_candidates_reproduce_training_probabilities(pipeline: dict, xml_run: Path) -> None:
    """Every nodule-bearing test sample: the same probability as training recorded."""
    samples = _test_samples(pipeline)
    nodule_bearing = samples[samples["negative_kind"] != "no_finding"]
    assert len(nodule_bearing) > 5
    for row in nodule_bearing.itertuples():
        scored = [r for r in _rows(xml_run / row.series_uid / "slices.csv")
                  if r["z_mm"] == row.slice_z_mm]
        assert len(scored) == 1, row.Index
        assert abs(float(scored[0]["probability"]) - row.y_prob) <= TOLERANCE, row.Index
        assert scored[0]["place"] == "lidc_xml"
        # the drawn patch's centre, by prepare's rule: the manifest's value, to the digit
        assert (scored[0]["patch_centre_x_mm"], scored[0]["patch_centre_y_mm"]) == (
            row.patch_centre_x_mm, row.patch_centre_y_mm), row.Index


def test_summary_and_series_record(pipeline: dict, xml_run: Path) -> None:
    """summary.csv has a row per series with its maximum; series.json names the model."""
    summary = _rows(xml_run / "summary.csv")
    results = json.loads(pipeline["results"].read_text())
    assert {r["patient_id"] for r in summary} == set(results["test"]["patient_ids"])
    for row in summary:
        slices = _rows(xml_run / row["series_uid"] / "slices.csv")
        top = max(float(s["probability"]) for s in slices)
        assert float(row["max_probability"]) == pytest.approx(top, abs=1e-6)
        assert row["called_cancer"] == ("yes" if top >= results["threshold"]["value"] else "no")
        assert row["status"] == "scored" and int(row["n_scored"]) == len(slices)
        record = json.loads((xml_run / row["series_uid"] / "series.json").read_text())
        assert record["model"]["threshold"]["value"] == results["threshold"]["value"]
        assert record["research_use_only"].startswith("RESEARCH USE ONLY")
        assert len(list((xml_run / row["series_uid"] / "gradcam").glob("*.png"))) == 2
    assert len(_rows(xml_run / "studies.csv")) == len(summary)
    assert _rows(xml_run / "errors.csv") == []


def test_dicom_out_reads_back_in_the_source_study(xml_run: Path) -> None:
    """Secondary Capture in the source study, new series, references to the CT slices."""
    for row in _rows(xml_run / "summary.csv"):
        files = sorted((xml_run / row["series_uid"] / "dicom").glob("*.dcm"))
        assert len(files) == 2
        ct_uids = {r["sop_instance_uid"] for r in _rows(xml_run / row["series_uid"] /
                                                         "slices.csv")}
        for file in files:
            ds = pydicom.dcmread(file)
            assert ds.StudyInstanceUID == row["study_uid"]
            assert ds.PatientID == row["patient_id"]
            assert ds.SeriesInstanceUID not in (row["series_uid"], "")
            assert ds.ContentQualification == "RESEARCH" and ds.BurnedInAnnotation == "YES"
            assert "RESEARCH USE ONLY" in ds.SeriesDescription
            assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID in ct_uids
            assert ds.pixel_array.shape == (256, 256, 3)


def test_rerun_reuses_and_overwrite_rescores(pipeline: dict, xml_run: Path,
                                             tmp_path: Path) -> None:
    """Same model and settings: every series reused; --overwrite scores them again."""
    out = tmp_path / "predictions"
    shutil.copytree(xml_run, out)
    args = [*_test_inputs(pipeline), "--results", str(pipeline["results"]), "--out", str(out),
            "--workers", "1", "--gradcam-top", "2", "--dicom-out", "-q"]
    assert predict_lung_ct.main(args) == 0
    assert {r["status"] for r in _rows(out / "summary.csv")} == {"reused"}
    assert predict_lung_ct.main([*args, "--overwrite"]) == 0
    assert {r["status"] for r in _rows(out / "summary.csv")} == {"scored"}


def test_sliding_window_writes_a_probability_map(pipeline: dict, tmp_path: Path) -> None:
    """A patch model without XML or --nodules: the sliding window, said so in its record."""
    patient = sorted(set(json.loads(pipeline["results"].read_text())["test"]["patient_ids"]))[0]
    source = tmp_path / "scan"
    shutil.copytree(pipeline["root"] / "raw_synthetic" / patient, source,
                    ignore=shutil.ignore_patterns("*.xml"))
    out = tmp_path / "predictions"
    assert predict_lung_ct.main(["--input", str(source), "--results", str(pipeline["results"]),
                                 "--out", str(out), "--workers", "1", "--gradcam-top", "1",
                                 "-q"]) == 0
    (row,) = _rows(out / "summary.csv")
    assert row["places"] == "sliding_window" and int(row["n_scored"]) > 0
    record = json.loads((out / row["series_uid"] / "series.json").read_text())
    assert "not a validated detector" in record["places_note"]
    grid = np.load(out / row["series_uid"] / "probability_map.npy")
    assert np.isfinite(grid).sum() == int(row["n_scored"])
    assert float(np.nanmax(grid)) == pytest.approx(float(row["max_probability"]), abs=1e-6)


@pytest.mark.parametrize(("extra", "message"), [
    (["--dicom-out", "--pseudonymise"], "cannot be combined with --pseudonymise"),
    (["--batch-size", "0"], "expected a positive integer"),
])
def test_user_errors_exit_2(pipeline: dict, tmp_path: Path, extra: list[str], message: str,
                            capsys: pytest.CaptureFixture) -> None:
    """Bad flags: one sentence, exit 2, nothing written."""
    code = (predict_lung_ct.main([*_test_inputs(pipeline), "--results", str(pipeline["results"]),
                                  "--out", str(tmp_path / "p"), *extra])
            if "--batch-size" not in extra else None)
    if code is None:
        with pytest.raises(SystemExit) as exit_info:
            predict_lung_ct.main(["--input", "x", *extra])
        code = exit_info.value.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_results_without_a_rendering_exit_2(pipeline: dict, tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    """Training results that do not name the rendering: one sentence, exit 2."""
    results = json.loads(pipeline["results"].read_text())
    results["dataset"] = {}
    broken = tmp_path / "training_results.json"
    broken.write_text(json.dumps(results))
    assert predict_lung_ct.main(["--input", str(pipeline["root"] / "raw_synthetic"),
                                 "--results", str(broken), "--out", str(tmp_path / "p")]) == 2
    assert "records no dataset rendering" in capsys.readouterr().err


def test_a_3_channel_dataset_without_context_exits_2(pipeline: dict, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    """A 2.5D rendering must say its context distance: one sentence, exit 2."""
    results = json.loads(pipeline["results"].read_text())
    results["dataset"] |= {"channels": 3, "context_mm": 0, "channel_order": ["z-D", "z", "z+D"]}
    broken = tmp_path / "training_results.json"
    broken.write_text(json.dumps(results))
    assert predict_lung_ct.main(["--input", str(pipeline["root"] / "raw_synthetic"),
                                 "--results", str(broken), "--out", str(tmp_path / "p")]) == 2
    assert ("a 3-channel (2.5D) dataset needs a positive dataset.context_mm of at most 50 mm, "
            "got 0") in capsys.readouterr().err


def test_an_unknown_patient_id_exits_2(pipeline: dict, tmp_path: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    """--patient-id naming no series of the input: one sentence, exit 2, nothing scored."""
    out = tmp_path / "p"
    assert predict_lung_ct.main(["--input", str(pipeline["root"] / "raw_synthetic"),
                                 "--patient-id", "LIDC-IDRI-0000", "--results",
                                 str(pipeline["results"]), "--out", str(out), "--workers",
                                 "1"]) == 2
    assert ("--patient-id LIDC-IDRI-0000: no CT series of this patient in the input"
            in capsys.readouterr().err)
    assert not (out / "summary.csv").exists()


@pytest.mark.parametrize("patient_ids", [("",), (" ",), ("P" * 65,)])
def test_config_refuses_a_blank_or_overlong_patient_id(patient_ids: tuple[str, ...]) -> None:
    """(0010,0020) Patient ID is LO: 1-64 characters, not blank."""
    with pytest.raises(ValueError, match="--patient-id must be a non-empty id of at most 64 "
                                         "characters"):
        PredictConfig(inputs=(Path("scans"),), patient_ids=patient_ids)
