"""lungct.prepare.candidates: class folders, the labels CSV and the escape of file names."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from lungct.errors import UserError
from lungct.prepare.candidates import (
    Candidate,
    class_from_path,
    csv_candidates,
    display_path,
    folder_candidates,
    relative_display_path,
)


@pytest.mark.parametrize(
    ("path", "label"),
    [
        ("cancer/a.png", 1),
        ("Malignant/x/a.png", 1),
        ("non_cancer/a.png", 0),
        ("non-cancer/a.png", 0),
        ("benign/a.png", 0),
        ("normal cases/a.png", 0),
        ("lung_cancer_images/a.png", 1),
        ("LIDC-IDRI-0001/nodule-1/images/a.png", None),
        ("benign/cancer/a.png", 1),
    ],
)
def test_class_from_path(path, label):
    """The nearest class-named folder wins; negations never read as cancer."""
    assert class_from_path(path) == label


def _touch(root: Path, *names: str) -> list[Path]:
    paths = []
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        paths.append(path)
    return paths


def test_folder_candidates_skip_masks_and_unlabelled(tmp_path):
    """Mask images and files outside class folders get pinned reasons."""
    files = _touch(tmp_path, "cancer/LIDC-IDRI-0001/a.png", "cancer/LIDC-IDRI-0001/mask/a.png",
                   "misc/LIDC-IDRI-0002/b.png")
    found, reasons = folder_candidates(tmp_path, files, lambda p: "LIDC-IDRI-0001")
    assert [c.source_file for c in found] == ["cancer/LIDC-IDRI-0001/a.png"]
    assert reasons == {files[1]: "mask image, never a sample",
                       files[2]: "no class-named folder in its path"}


def test_folder_candidates_need_a_patient(tmp_path):
    """Without a patient id the split would leak patients: a clear error."""
    files = _touch(tmp_path, "benign/x.png")
    with pytest.raises(UserError, match="no patient id for benign/x.png"):
        folder_candidates(tmp_path, files, lambda p: None)


def test_csv_candidates(tmp_path):
    """Listed files become candidates; unlisted ones are skipped; class names parse."""
    files = _touch(tmp_path, "a.png", "b.png", "c.png")
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label,patient_id\na.png,1,P1\nb.png,benign,P2\n")
    found, reasons = csv_candidates(labels, tmp_path, files)
    assert [(c.source_file, c.label, c.patient_id) for c in found] == [
        ("a.png", 1, "P1"), ("b.png", 0, "P2")]
    assert reasons == {files[2]: "not listed in --labels"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("path,label\na.png,1\n", "lacks the column\\(s\\) patient_id"),
        ("path,label,patient_id\na.png,maybe,P1\n", "row 2: label 'maybe' is neither"),
        ("path,label,patient_id\na.png,1,\n", "row 2: empty patient_id"),
    ],
)
def test_csv_candidates_errors(tmp_path, text, message):
    """Bad label files stop with one sentence naming the problem."""
    labels = tmp_path / "labels.csv"
    labels.write_text(text)
    with pytest.raises(UserError, match=message):
        csv_candidates(labels, tmp_path, [])


def test_keys_of_image_files_are_unique(tmp_path):
    """Files that differ only in suffix or folder get different output names."""
    files = _touch(tmp_path, "cancer/P1/a.png", "cancer/P1/a.jpg", "cancer/P1_a.png")
    found, _ = folder_candidates(tmp_path, files, lambda p: "P1")
    keys = [c.key for c in found]
    assert len(set(keys)) == 3
    assert all(key.startswith("cancer_P1_a-") for key in keys)


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        (b"cancer/a.png", "cancer/a.png"),
        (b"bad\xff.dcm", "bad\\xff.dcm"),
        (b"d\xc3\xa9j\xc3\xa0/\xfe\xfe.png", "d\u00e9j\u00e0/\\xfe\\xfe.png"),
        (b"back\\slash.dcm", "back\\slash.dcm"),
        (b"\xe9t\xe9.dcm", "\\xe9t\\xe9.dcm"),  # Latin-1 bytes are not UTF-8
    ],
)
def test_display_path_escapes_undecodable_bytes(raw, shown):
    """Each byte that is not valid UTF-8 is written \\xNN; valid names are unchanged."""
    assert display_path(os.fsdecode(raw)) == shown
    assert display_path(shown) == shown  # idempotent on what it writes
    shown.encode("utf-8")  # always writable as UTF-8


def _touch_bytes(root: Path, name: bytes) -> Path:
    folder = os.fsencode(root)
    os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
    with open(os.path.join(folder, name), "wb") as handle:
        handle.write(b"x")
    return Path(os.fsdecode(os.path.join(folder, name)))


def test_undecodable_names_in_folder_and_csv_candidates(tmp_path):
    """A file named with undecodable bytes is kept: its source_file is the escaped text, its
    key is computed, and a labels CSV names it by that text."""
    files = [_touch_bytes(tmp_path, b"cancer/P1/bad\xff.png"),
             _touch_bytes(tmp_path, b"misc/odd\xfe.png")]
    found, reasons = folder_candidates(tmp_path, files, lambda p: "P1")
    assert [c.source_file for c in found] == ["cancer/P1/bad\\xff.png"]
    assert found[0].key.startswith("cancer_P1_bad_xff-")
    assert reasons == {files[1]: "no class-named folder in its path"}
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label,patient_id\ncancer/P1/bad\\xff.png,1,P1\n", encoding="utf-8")
    listed, unlisted = csv_candidates(labels, tmp_path, files)
    assert [(c.source_file, c.label) for c in listed] == [("cancer/P1/bad\\xff.png", 1)]
    assert unlisted == {files[1]: "not listed in --labels"}


def test_relative_display_path(tmp_path):
    """The relative path of a file under the root, POSIX separators, escaped."""
    path = Path(os.fsdecode(os.fsencode(tmp_path) + b"/a/b\xff.dcm"))
    assert relative_display_path(path, tmp_path) == "a/b\\xff.dcm"


@pytest.mark.parametrize("patient", ["../../../etc/passwd", "a/b", "..", "x\x00y", "P" * 300,
                                     "C:\\x", "name with spaces", "\u00e9\u00e8"])
def test_hostile_patient_id_stays_one_safe_file_name(tmp_path, patient):
    """A free-text (0010,0020) Patient ID never leaves the class folder or breaks the name:
    unsafe or long ids keep their safe characters (64 at most) plus 8 hex of their SHA-256."""
    candidate = Candidate(tmp_path / "a.dcm", "a.dcm", patient, 1, "", series_uid="1.2.840.99",
                          slice_z_mm=-12.5, nodule_id="N01")
    key = candidate.key
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,64}-[0-9a-f]{8}_1\.2\.840\.99_z-00012\.50_N01", key)
    dataset = tmp_path / "dataset"
    image = (dataset / "cancer" / f"{key}.png").resolve()
    assert image.parent == (dataset / "cancer").resolve()
    other = Candidate(tmp_path / "a.dcm", "a.dcm", patient + "/", 1, "", series_uid="1.2.840.99",
                      slice_z_mm=-12.5, nodule_id="N01")
    assert other.key != key


def test_safe_patient_id_is_kept_as_is(tmp_path):
    """LIDC and hospital ids made of A-Z a-z 0-9 _ - (up to 64) name files unchanged."""
    candidate = Candidate(tmp_path / "a.dcm", "a.dcm", "LIDC-IDRI-0001", 1, "",
                          series_uid="1.3.6.1.4.1.14519.5.2.1.6279", slice_z_mm=2.0)
    assert candidate.key == "LIDC-IDRI-0001_9.5.2.1.6279_z+00002.00"
