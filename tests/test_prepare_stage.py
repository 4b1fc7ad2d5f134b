"""The prepare stage end to end: CLI on a small synthetic cohort, re-runs, bad input."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from pydicom.data import get_testdata_file

import prepare_lung_dataset
from lungct.contract import MANIFEST_COLUMNS
from lungct.synthetic.cohort import generate_cohort

SMALL = ["--synthetic-patients", "8", "--synthetic-size", "96", "--workers", "2"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """A small synthetic LIDC-format cohort, generated once for this module."""
    work = tmp_path_factory.mktemp("work")
    generate_cohort(work / "raw_synthetic", n_patients=8, image_size_px=96, seed=42)
    return work


@pytest.fixture
def work(cohort: Path, tmp_path: Path) -> Path:
    """A working folder that already holds the module's synthetic cohort."""
    shutil.copytree(cohort / "raw_synthetic", tmp_path / "raw_synthetic")
    return tmp_path


def _prepare(work: Path, *extra: str) -> int:
    return prepare_lung_dataset.main(
        ["--work-dir", str(work), "--output", str(work / "out"), "-q", *extra]
    )


def _manifest(out: Path) -> list[dict]:
    with open(out / "manifest.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _synthetic_patch(work: Path, *extra: str) -> int:
    return _prepare(work, "--source", "synthetic", *SMALL, "--view", "patch",
                    "--image-size", "32", "--target-count", "80", *extra)


def test_synthetic_patch_dataset_contract(work):
    """The synthetic cohort becomes a dataset honouring the on-disk contract."""
    assert _synthetic_patch(work) == 0
    out = work / "out"
    rows = _manifest(out)
    assert tuple(rows[0].keys()) == MANIFEST_COLUMNS
    assert {r["label"] for r in rows} == {"0", "1"}
    patients_by_split = {s: {r["patient_id"] for r in rows if r["split"] == s}
                         for s in ("train", "val", "test")}
    assert not patients_by_split["train"] & patients_by_split["val"]
    assert not patients_by_split["train"] & patients_by_split["test"]
    assert not patients_by_split["val"] & patients_by_split["test"]
    for row in rows:
        image = cv2.imread(str(out / row["path"]), cv2.IMREAD_UNCHANGED)
        assert image.shape == (32, 32) and image.dtype == np.uint8
        assert row["path"].startswith(row["class_name"] + "/")
        if row["label"] == "1":
            mask = cv2.imread(str(out / row["mask_path"]), cv2.IMREAD_UNCHANGED)
            assert mask.shape == (32, 32) and set(np.unique(mask)) <= {0, 255}
            assert mask.any(), row
            assert row["negative_kind"] == "" and float(row["malignancy"]) >= 4
        else:
            assert row["negative_kind"] in ("benign_nodule", "no_finding")
            if row["negative_kind"] == "benign_nodule":
                assert float(row["malignancy"]) <= 2 and row["mask_path"]
            else:
                assert row["mask_path"] == "" and row["nodule_id"] == ""
        assert float(row["mm_per_px"]) == pytest.approx(2.0, rel=0.05)  # 64 mm / 32 px
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["source"] == "synthetic" and dataset["synthetic"] is True
    assert dataset["label_rule"]["cancer_at_least"] == 4
    assert sum(dataset["label_rule"]["nodules"].values()) > 0
    assert dataset["split_level"] == "patient"
    assert dataset["n_images"] == len(rows)
    assert dataset["counts"]["train"]["patients"] == len(patients_by_split["train"])
    with open(out / "skipped.csv", newline="") as handle:
        skipped = list(csv.DictReader(handle))
    assert {r["file"] for r in skipped}.isdisjoint({r["source_file"] for r in rows})
    assert dataset["files_skipped"]["total"] == len(skipped)


def test_rerun_reuses_and_is_byte_identical(work):
    """Same settings: nothing rewritten; --overwrite rebuilds the same bytes."""
    assert _synthetic_patch(work) == 0
    out = work / "out"
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    mtimes = {p: p.stat().st_mtime_ns for p in before}
    assert _synthetic_patch(work) == 0
    assert {p: p.stat().st_mtime_ns for p in before} == mtimes
    assert _synthetic_patch(work, "--overwrite") == 0
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before


def test_other_settings_need_overwrite(work, capsys):
    """A different configuration stops with the pinned sentence."""
    assert _synthetic_patch(work) == 0
    assert _synthetic_patch(work, "--negative-margin-mm", "12") == 2
    assert "made with other settings; use --overwrite" in capsys.readouterr().err


def test_interrupted_run_is_redone(work):
    """A leftover .partial folder from a killed run does not change the result."""
    assert _synthetic_patch(work) == 0
    reference = (work / "out" / "manifest.csv").read_bytes()
    shutil.rmtree(work / "out")
    partial = work / "out.partial"
    (partial / "cancer").mkdir(parents=True)
    (partial / ".lungct-partial").touch()  # what a killed run leaves
    (partial / "cancer" / "half.png").write_bytes(b"\x89PNG")
    assert _synthetic_patch(work) == 0
    assert (work / "out" / "manifest.csv").read_bytes() == reference
    assert not partial.exists()


def test_a_partial_folder_lungct_did_not_make_is_left_alone(work, capsys):
    """An unmarked <output>.partial is someone else's: refused, not deleted."""
    partial = work / "out.partial"
    partial.mkdir()
    (partial / "notes.txt").write_text("mine")
    assert _synthetic_patch(work) == 2
    assert "out.partial exists and was not made by lungct" in capsys.readouterr().err
    assert (partial / "notes.txt").read_text() == "mine"


def test_missing_image_makes_the_dataset_stale(work):
    """Reuse checks the files: a dataset with a deleted image is rebuilt, not reused."""
    assert _synthetic_patch(work) == 0
    out = work / "out"
    reference = (out / "manifest.csv").read_bytes()
    first = sorted(out.glob("cancer/*.png"))[0]
    first.unlink()
    assert _synthetic_patch(work) == 0
    assert first.is_file() and (out / "manifest.csv").read_bytes() == reference


def test_output_inside_the_input_is_refused(tmp_path, capsys):
    """--output inside --input would be read as input next time: refused in one sentence."""
    source = tmp_path / "in"
    (source / "cancer").mkdir(parents=True)
    code = prepare_lung_dataset.main(["--input", str(source), "--output", str(source / "ds"),
                                      "--work-dir", str(tmp_path), "-q"])
    assert code == 2
    assert "is inside the input" in capsys.readouterr().err
    assert not (source / "ds").exists()


def test_pseudonymise_hides_patient_ids(work):
    """No LIDC patient id or series UID survives in any output file."""
    assert _synthetic_patch(work, "--pseudonymise") == 0
    out = work / "out"
    text = "".join(p.read_text() for p in out.glob("*.csv"))
    names = " ".join(str(p.relative_to(out)) for p in out.rglob("*.png"))
    assert "LIDC-IDRI" not in text and "LIDC-IDRI" not in names
    assert all(r["patient_id"].startswith("P") for r in _manifest(out))
    assert (work / ".lungct_salt").exists()


def test_local_input_with_bad_files(work):
    """Bad files are skipped with pinned reasons; the good data still makes a dataset."""
    local = work / "raw_synthetic"
    (local / "notes.txt").write_text("not an image")
    shutil.copy(get_testdata_file("MR_small.dcm", download=False), local / "mr.dcm")
    ct = Path(get_testdata_file("CT_small.dcm", download=False))
    (local / "cut.dcm").write_bytes(ct.read_bytes()[:-5000])
    shutil.copy(ct, local / "lonely_ct.dcm")  # a CT series with no readings
    (local / "cr.xml").write_text('<IdriReadMessage xmlns="http://www.nih.gov/idri"/>')
    assert _prepare(work, "--source", "local", "--input", str(local), "--view", "patch",
                    "--image-size", "32", "--target-count", "40") == 0
    with open(work / "out" / "skipped.csv", newline="") as handle:
        reasons = {r["file"]: r["reason"] for r in csv.DictReader(handle)}
    assert reasons["notes.txt"] == "not DICOM"
    assert reasons["mr.dcm"] == "not a CT image ((0008,0060) Modality MR)"
    assert reasons["cut.dcm"] == "truncated pixel data"
    assert reasons["lonely_ct.dcm"] == "no readings for series"
    assert reasons["cr.xml"].startswith("radiograph readings")
    dataset = json.loads((work / "out" / "dataset.json").read_text())
    assert dataset["source"] == f"local:{local}"


def test_class_folders_of_png(tmp_path):
    """Class-named folders label images; patient ids come from --patient-regex."""
    rng = np.random.default_rng(0)
    for patient in range(8):
        for label in ("cancer", "benign"):
            for index in range(3):
                folder = tmp_path / "in" / label / f"LIDC-IDRI-{patient:04d}"
                folder.mkdir(parents=True, exist_ok=True)
                image = rng.integers(0, 255, (20, 20), dtype=np.uint8)
                cv2.imwrite(str(folder / f"{index}.png"), image)
    (tmp_path / "in" / "cancer" / "masks").mkdir()
    cv2.imwrite(str(tmp_path / "in" / "cancer" / "masks" / "m.png"), np.zeros((4, 4), np.uint8))
    assert _prepare(tmp_path, "--input", str(tmp_path / "in"), "--image-size", "16",
                    "--target-count", "40") == 0
    rows = _manifest(tmp_path / "out")
    assert len(rows) == 40
    assert {r["patient_id"] for r in rows} == {f"LIDC-IDRI-{p:04d}" for p in range(8)}
    dataset = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert dataset["label_source"] == "class_folders"
    assert dataset["files_skipped"]["by_reason"] == {
        "mask image, never a sample": 1, "not selected by balancing": 8}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--source", "local"], "--source local needs --input"),
        (["--input", "/no/such/folder"], "does not exist"),
        (["--window", "1,0", "--source", "synthetic"], "invalid argument: window width"),
        (["--split", "0.5,0.5,0.5", "--source", "synthetic"], "summing to 1"),
    ],
)
def test_user_errors_are_one_sentence(tmp_path, capsys, args, message):
    """Bad arguments end with exit 2 and one sentence, never a traceback."""
    assert _prepare(tmp_path, *args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_no_labels_is_a_clear_error(tmp_path, capsys):
    """Images in folders that name no class: no guess, a clear error."""
    folder = tmp_path / "in" / "LIDC-IDRI-0001" / "nodule-1" / "images"
    folder.mkdir(parents=True)
    cv2.imwrite(str(folder / "slice-0.png"), np.zeros((4, 4), np.uint8))
    assert _prepare(tmp_path, "--input", str(tmp_path / "in")) == 2
    err = capsys.readouterr().err
    assert "no usable labels" in err and "nodule indices, not classes" in err


def test_zip_archive_input_with_an_unsafe_entry(work):
    """A zip of the cohort extracts to extracted/<name>/; a '..' entry is refused and listed."""
    import zipfile

    archive = work / "cohort.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        for path in sorted((work / "raw_synthetic").rglob("*")):
            if path.is_file():
                bundle.write(path, path.relative_to(work / "raw_synthetic").as_posix())
        bundle.writestr("../evil.txt", "outside")
    assert _prepare(work, "--input", str(archive), "--view", "patch", "--image-size", "32",
                    "--target-count", "40") == 0
    assert (work / "extracted" / "cohort").is_dir()
    assert not (work / "evil.txt").exists() and not (work / "extracted" / "evil.txt").exists()
    with open(work / "out" / "skipped.csv", newline="") as handle:
        reasons = {r["file"]: r["reason"] for r in csv.DictReader(handle)}
    assert reasons["../evil.txt"].startswith("unsafe archive entry")
    rows = _manifest(work / "out")
    assert rows and json.loads((work / "out" / "dataset.json").read_text())["source"] == (
        f"local:{archive}")


def test_bad_synthetic_size_is_one_sentence(tmp_path, capsys):
    """An out-of-range synthetic cohort size is a user error, not a traceback."""
    assert _prepare(tmp_path, "--source", "synthetic", "--synthetic-patients", "5000") == 2
    err = capsys.readouterr().err
    assert "invalid synthetic cohort setting: n_patients must be" in err
    assert "Traceback" not in err
