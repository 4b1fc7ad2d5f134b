"""Stage 4 (predict) against hostile or stale inputs: unsafe series keys, a series whose
outputs fail to write, results that do not match the model, recipes out of range, nodules
CSVs that name the wrong patient, spreadsheet formulas in header text, bounded rendering and
distinct DICOM UIDs per setting."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
from conftest import write_ct_slice

import predict_lung_ct
import prepare_lung_dataset
import training_lung_cnn
from lungct.errors import UserError
from lungct.fileio import spreadsheet_safe
from lungct.predict import nodules_csv, series_results, stage
from lungct.predict.config import PredictConfig
from lungct.predict.dicom_out import write_secondary_capture
from lungct.predict.nodules_csv import NoduleCentre, check_rows, read_nodules
from lungct.predict.outputs import write_csv
from lungct.predict.recipe import read_recipe
from lungct.predict.scoring import check_temperature
from lungct.prepare.render import lung_field


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A slice-view dataset of 8 synthetic patients (32 px) and a 1-epoch baseline."""
    root = tmp_path_factory.mktemp("safety")
    dataset = root / "output_dataset"
    assert prepare_lung_dataset.main([
        "--source", "synthetic", "--synthetic-patients", "8", "--synthetic-size", "64",
        "--view", "slice", "--image-size", "32", "--target-count", "80",
        "--split", "0.5,0.25,0.25", "--work-dir", str(root), "--output", str(dataset),
        "--workers", "1", "-q"]) == 0
    assert training_lung_cnn.main([
        "--dataset", str(dataset), "--out", str(root), "--models", "baseline",
        "--preset", "quick", "--epochs", "1", "--batch-size", "8", "-q"]) == 0
    results = root / "training_results.json"
    patient = sorted(json.loads(results.read_text())["test"]["patient_ids"])[0]
    return {"root": root, "dataset": dataset, "results": results,
            "scan": root / "raw_synthetic" / patient}


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _args(trained: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["--input", str(trained["scan"]), "--results", str(trained["results"]), "--out",
            str(out), "--workers", "1", "--gradcam-top", "1", "-q", *extra]


def _model_path(trained: dict[str, Path]) -> Path:
    results = json.loads(trained["results"].read_text())
    return trained["root"] / results["models"][results["best_model"]]["model_path"]


# ----------------------------------------------------------------------------- 1. series keys
@pytest.mark.parametrize("uid", ["../../etc", "/abs/path", "1.2/3", "a\\b", ".hidden", "",
                                 "..", "1.2.3/.."])
def test_an_unsafe_series_uid_gets_no_folder(uid: str) -> None:
    """A UID that is no plain folder name under --out is refused, never joined to a path."""
    assert stage.series_key(SimpleNamespace(series_uid=uid), None) is None


def test_a_dicom_series_uid_is_its_folder_name() -> None:
    assert stage.series_key(SimpleNamespace(series_uid="1.2.840.99"), None) == "1.2.840.99"


# ------------------------------------------------------------- 2 + 5. a failing finish, re-runs
def test_a_series_whose_outputs_fail_is_recorded_and_its_old_results_removed(
        trained: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Any error while writing a series' outputs is that series' failure: errors.csv and
    summary.csv are written, exit 1; with --overwrite its previous series.json (and stale
    overlays) are gone, so the half-written series is never reused as complete."""
    out = tmp_path / "predictions"
    assert predict_lung_ct.main(_args(trained, out)) == 0
    (row,) = _rows(out / "summary.csv")
    folder = out / row["series_uid"]
    assert (folder / "series.json").is_file()
    (folder / "probability_map").mkdir()
    (folder / "probability_map" / "z+0001.00.png").write_bytes(b"stale")

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("no space left\non device")

    monkeypatch.setattr(series_results, "_gradcam", broken)
    assert predict_lung_ct.main(_args(trained, out, "--overwrite")) == 1
    (error,) = _rows(out / "errors.csv")
    reason = "writing the results failed (RuntimeError: no space left on device)"
    assert error["reason"] == reason and error["series_uid"] == row["series_uid"]
    (failed,) = _rows(out / "summary.csv")
    assert failed["status"] == f"failed: {reason}" and failed["places"] == "every_slice"
    assert not (folder / "series.json").exists()
    assert not (folder / "probability_map").exists() and not (folder / "gradcam").exists()
    monkeypatch.undo()
    assert predict_lung_ct.main(_args(trained, out)) == 0  # not reused: scored again
    assert [r["status"] for r in _rows(out / "summary.csv")] == ["scored"]


def test_keyboard_interrupt_is_not_a_series_failure(trained: dict[str, Path], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(series_results, "_gradcam", interrupted)
    with pytest.raises(KeyboardInterrupt):
        stage.run(PredictConfig(inputs=(trained["scan"],),
                                results_path=trained["results"],
                                out_dir=tmp_path / "p", workers=1, gradcam_top=1))


# --------------------------------------------------------------------- 3. results and model
def test_a_model_file_of_another_run_is_refused(trained: dict[str, Path], tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    """Without --model the model must be the file the results' files_sha256 lists."""
    root = tmp_path / "run"
    shutil.copytree(trained["root"], root, ignore=shutil.ignore_patterns(
        "raw_synthetic", "output_dataset"))
    model = root / _model_path(trained).relative_to(trained["root"])
    model.write_bytes(model.read_bytes() + b"\0")
    code = predict_lung_ct.main(["--input", str(trained["scan"]), "--results",
                                 str(root / "training_results.json"), "--out",
                                 str(tmp_path / "p"), "--workers", "1"])
    assert code == 2
    assert f"{model} changed after {root / 'training_results.json'} was written" in (
        capsys.readouterr().err)


def _results_with(trained: dict[str, Path], tmp_path: Path, **changes: object) -> Path:
    results = json.loads(trained["results"].read_text())
    for key, value in changes.items():
        if key.startswith("ds_"):
            results["dataset"][key.removeprefix("ds_")] = value
        else:
            results[key] = value
    path = tmp_path / "training_results.json"
    path.write_text(json.dumps(results))
    return path


def test_with_model_the_calibration_temperature_is_kept(trained: dict[str, Path],
                                                        tmp_path: Path) -> None:
    """--model: the recipe carries the results' T to check; without calibration, none."""
    calibrated = _results_with(trained, tmp_path, calibration={"temperature": 2.0})
    assert read_recipe(calibrated, _model_path(trained)).temperature == 2.0
    results = json.loads(trained["results"].read_text())
    results.pop("calibration", None)
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps(results))
    assert read_recipe(plain, _model_path(trained)).temperature is None


def test_the_calibrated_model_passed_as_model_is_scored(trained: dict[str, Path],
                                                        tmp_path: Path) -> None:
    """The saved model applies the results' T in its temperature layer: --model accepts it."""
    assert json.loads(trained["results"].read_text())["calibration"]["temperature"] != 1.0
    out = tmp_path / "p"
    assert predict_lung_ct.main(_args(trained, out, "--model", str(_model_path(trained)))) == 0
    assert [r["status"] for r in _rows(out / "summary.csv")] == ["scored"]


def _model_with_scale(scale: float | None) -> SimpleNamespace:
    layers = [SimpleNamespace(name="logit")]
    if scale is not None:
        layers.append(SimpleNamespace(name="temperature", scale=scale))
    return SimpleNamespace(layers=layers,
                           get_layer=lambda name: next(x for x in layers if x.name == name))


def test_a_model_of_another_temperature_is_refused() -> None:
    check_temperature(_model_with_scale(0.5), 2.0, "m.keras")
    check_temperature(_model_with_scale(0.5 * (1 + 1e-8)), 2.0, "m.keras")
    check_temperature(_model_with_scale(None), 1.0, "m.keras")
    with pytest.raises(UserError, match=r"^--model m\.keras applies temperature 1, but the "
                       r"training results' threshold was chosen at calibration temperature "
                       r"2: pass the calibrated model these results name$"):
        check_temperature(_model_with_scale(1.0), 2.0, "m.keras")


# ----------------------------------------------------------------------------- 4. recipe
@pytest.mark.parametrize(("changes", "message"), [
    ({"ds_patch_mm": 600.0, "ds_view": "patch"},
     "dataset.patch_mm must be 1-500 mm, got 600"),
    ({"ds_window": {"center_hu": -600, "width_hu": 1e9}},
     "window -600/1e+09 HU are not a rendering prepare makes"),
    ({"ds_channels": 3, "ds_context_mm": 80.0,
      "ds_channel_order": ["z-D", "z", "z+D"]},
     "dataset.context_mm of at most 50 mm, got 80"),
    ({"ds_channels": 2}, "channels must be one of [1, 3], got 2"),
    ({"ds_channels": "3"}, "channels must be one of [1, 3], got '3'"),
    ({"ds_label_rule": "fleischner"}, "dataset.label_rule must be a JSON object, got str"),
])
def test_an_out_of_range_recipe_is_one_sentence(trained: dict[str, Path], tmp_path: Path,
                                                changes: dict, message: str) -> None:
    broken = _results_with(trained, tmp_path, **changes)
    with pytest.raises(UserError) as error:
        read_recipe(broken, _model_path(trained))
    assert message in str(error.value)


def test_thickness_comes_only_from_the_manifest_trained_on(trained: dict[str, Path],
                                                          tmp_path: Path) -> None:
    """The trained slice-thickness range is read only from the manifest whose SHA-256 the
    results record; another dataset in that folder gives None."""
    assert read_recipe(trained["results"], None).slice_thickness_mm is not None
    other = _results_with(trained, tmp_path, dataset_manifest_sha256="0" * 64)
    assert read_recipe(other, _model_path(trained)).slice_thickness_mm is None


# ----------------------------------------------------------------- 6. bounded rendering
class _CountingPool:
    """Futures already done; records how many were submitted."""

    def __init__(self) -> None:
        self.submitted = 0

    def submit(self, function: object, job: object) -> Future:
        self.submitted += 1
        future: Future = Future()
        future.set_result(job)
        return future


def test_at_most_two_jobs_per_worker_are_in_flight() -> None:
    pool = _CountingPool()
    rendered = stage._rendered(list(range(20)), pool, workers=3)
    assert pool.submitted == 6  # submitted before the model loads
    for consumed, result in enumerate(rendered, start=1):
        assert result == consumed - 1
        assert pool.submitted <= consumed + 6
    assert pool.submitted == 20


# ----------------------------------------------------------------------------- 7. lung field
def test_lung_field_is_the_air_inside_the_body() -> None:
    """Body = largest component above -500 HU with its holes filled; lung = below -500 HU
    inside it; the air outside the body is not lung."""
    hu = np.full((40, 40), -1000.0, np.float32)
    hu[5:35, 5:35] = 40.0  # soft tissue
    hu[10:30, 10:20] = -850.0  # aerated lung
    hu[12:14, 12:14] = -450.0  # a vessel: not lung
    lung = lung_field(hu)
    expected = np.zeros((40, 40), bool)
    expected[10:30, 10:20] = True
    expected[12:14, 12:14] = False
    assert np.array_equal(lung, expected)
    assert not lung_field(np.full((8, 8), -1000.0)).any()


# ----------------------------------------------------------------------------- 8. --nodules
def test_a_nodules_csv_larger_than_the_bound_is_refused(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "nodules.csv"
    path.write_text("series_uid,x_mm,y_mm,z_mm\n1.2.3,0,0,0\n")
    monkeypatch.setattr(nodules_csv, "MAX_BYTES", 10)
    with pytest.raises(UserError, match=r"^--nodules .* has 38 bytes, more than the 10 a list "
                                        r"of nodule centres needs$"):
        read_nodules(path)


def _centre(row: int, series_uid: str, patient_id: str) -> NoduleCentre:
    return NoduleCentre(row, series_uid, patient_id, 0.0, 0.0, 0.0)


def test_nodules_rows_are_checked_against_the_headers(caplog: pytest.LogCaptureFixture) -> None:
    series = [SimpleNamespace(series_uid="1.2.3", patient_id="P1")]
    with caplog.at_level(logging.WARNING, "lungct.predict.nodules_csv"):
        check_rows([_centre(2, "1.2.3", "P1"), _centre(3, "", "P1"),
                    *(_centre(4 + i, f"9.{i}", "") for i in range(6)), _centre(10, "", "P2")],
                   series)
    assert caplog.messages == ["--nodules rows 4, 5, 6, 7, 8 and 2 more name no series of the "
                               "input: not used"]
    with pytest.raises(UserError, match=r"^--nodules row 2: series 1\.2\.3 belongs to patient "
                                        r"'P1' in its \(0010,0020\) Patient ID, not 'P9'$"):
        check_rows([_centre(2, "1.2.3", "P9")], series)


# ----------------------------------------------------------------------------- 9. CSV cells
def test_header_text_never_becomes_a_spreadsheet_formula(tmp_path: Path) -> None:
    assert [spreadsheet_safe(v) for v in ("=HYPERLINK(1)", "+1+1", "-2+3", "@SUM(A1)",
                                          "-12.50", "+3", "1e-3", "LIDC", 0.5)] == [
        "'=HYPERLINK(1)", "'+1+1", "'-2+3", "'@SUM(A1)", "-12.50", "+3", "1e-3", "LIDC", 0.5]
    write_csv(tmp_path / "t.csv", ("patient_id", "z_mm"), [{"patient_id": "=cmd|' /C calc'!A0",
                                                           "z_mm": "-7.50"}])
    assert _rows(tmp_path / "t.csv") == [{"patient_id": "'=cmd|' /C calc'!A0", "z_mm": "-7.50"}]


# ----------------------------------------------------------------------------- 10. DICOM UIDs
def test_other_settings_give_other_dicom_uids(tmp_path: Path) -> None:
    source = write_ct_slice(tmp_path / "ct.dcm", np.zeros((16, 16)), 0.0)
    overlay = np.zeros((16, 16, 3), np.uint8)

    def uids(settings_hash: str, name: str) -> tuple[str, str]:
        (path,) = write_secondary_capture([overlay], [source], tmp_path / name, "1.2.3.4.5",
                                          settings_hash)
        written = pydicom.dcmread(path)
        return written.SeriesInstanceUID, written.SOPInstanceUID

    first, again, other = uids("a" * 64, "1"), uids("a" * 64, "2"), uids("b" * 64, "3")
    assert first == again
    assert other[0] != first[0] and other[1] != first[1]
