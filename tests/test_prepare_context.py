"""2.5D context (--context-mm) and patch centres in patient coordinates.

A tiny series of real DICOM slices 1.25 mm apart with known HU per slice; D = 2.0 mm is not a
multiple of the spacing, so the context planes are interpolations computed here by hand.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import write_ct_slice

import prepare_lung_dataset
from lungct import contract
from lungct.prepare import dicom
from lungct.prepare.candidates import Candidate, MaskCrop
from lungct.prepare.config import PrepareConfig
from lungct.prepare.context import HuCache, context_hu, context_reason
from lungct.prepare.dicom_files import UnusableFileError
from lungct.prepare.render import (
    NO_SERIES_REASON,
    RenderSettings,
    patch_centre_px,
    read_hu,
    render,
)
from lungct.prepare.series import Series, assemble_series
from lungct.synthetic.cohort import generate_cohort

STEP_MM = 1.25
D_MM = 2.0
SIZE_PX = 48
SPACING_MM = 2.0
CENTER_HU, WIDTH_HU = -600.0, 1500.0
SLICE_VIEW = RenderSettings(SIZE_PX, CENTER_HU, WIDTH_HU, "slice", 40.0, D_MM)
PATCH_VIEW = RenderSettings(20, CENTER_HU, WIDTH_HU, "patch", 40.0, D_MM)  # 40 mm = 20 px


def slice_hu(index: int) -> np.ndarray:
    """HU of slice ``index``: its own level, a +700 HU block and a ramp (so crops differ)."""
    hu = np.full((SIZE_PX, SIZE_PX), -900.0 + 32.0 * index)
    hu[18:28, 14:26] += 700.0
    hu += np.arange(SIZE_PX)[None, :] * 3.0 + np.arange(SIZE_PX)[:, None]
    return hu


def by_hand(hu: np.ndarray) -> np.ndarray:
    """The DICOM linear VOI window (PS3.3 C.11.2.1.2.1), written out."""
    scaled = ((hu - (CENTER_HU - 0.5)) / (WIDTH_HU - 1) + 0.5) * 255.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def write_series(folder: Path, indices: list[int]) -> Series:
    """Slices ``indices`` (z = index x 1.25 mm) of one series, assembled as prepare does."""
    for index in indices:
        write_ct_slice(folder / f"{index:03d}.dcm", slice_hu(index), index * STEP_MM,
                       instance_number=index + 1, pixel_spacing_mm=SPACING_MM)
    headers = [dicom.read_header(path) for path in sorted(folder.glob("*.dcm"))]
    (series,), dropped = assemble_series(headers)
    assert not dropped
    return series


def candidate(series: Series, index: int, **extra) -> Candidate:
    """The no_finding sample of slice ``index`` (position in the series), as prepare builds it."""
    header = series.slices[index]
    return Candidate(header.path, header.path.name, header.patient_id, 0, "no_finding",
                     series_uid=series.series_uid, slice_z_mm=header.z_mm,
                     pixel_spacing_mm=header.pixel_spacing_mm,
                     **{"header": header, "stack": series.stack, **extra})


@pytest.fixture
def series(tmp_path: Path) -> Series:
    """Eight slices, z = 0 ... 8.75 mm."""
    return write_series(tmp_path / "series", list(range(8)))


def test_slice_view_channels_are_the_interpolated_planes(series):
    """R, B = the windowed linear interpolations at z -/+ 2 mm; G = today's single slice."""
    rendered = render(candidate(series, 3), SLICE_VIEW)  # z = 3.75 mm
    assert rendered.image.shape == (SIZE_PX, SIZE_PX, 3) and rendered.image.dtype == np.uint8
    below = 0.6 * slice_hu(1) + 0.4 * slice_hu(2)  # 1.75 mm: 0.4 of the way 1.25 -> 2.5
    above = 0.4 * slice_hu(4) + 0.6 * slice_hu(5)  # 5.75 mm: 0.6 of the way 5.0 -> 6.25
    np.testing.assert_array_equal(rendered.image[..., 0], by_hand(below))
    np.testing.assert_array_equal(rendered.image[..., 2], by_hand(above))
    single = render(candidate(series, 3), dataclasses.replace(SLICE_VIEW, context_mm=0.0))
    np.testing.assert_array_equal(rendered.image[..., 1], single.image)
    np.testing.assert_array_equal(single.image, by_hand(slice_hu(3)))
    assert rendered.patch_centre_xy_mm is None and single.patch_centre_xy_mm is None


def test_patch_view_crops_every_plane_at_the_same_place(series):
    """The patch view cuts the three planes and the mask at the one centre."""
    mask = np.zeros((SIZE_PX, SIZE_PX), bool)
    mask[20:25, 16:22] = True
    sample = candidate(series, 4, centre_xy_px=(20.3, 22.6), mask=MaskCrop.from_mask(mask))
    rendered = render(sample, PATCH_VIEW)  # z = 5 mm: 3 -> 7 mm
    rows, columns = slice(13, 33), slice(10, 30)  # left = round(20.3 - 10), top = round(12.6)
    below = 0.6 * slice_hu(2) + 0.4 * slice_hu(3)
    above = 0.4 * slice_hu(5) + 0.6 * slice_hu(6)
    np.testing.assert_array_equal(rendered.image[..., 0], by_hand(below[rows, columns]))
    np.testing.assert_array_equal(rendered.image[..., 1], by_hand(slice_hu(4)[rows, columns]))
    np.testing.assert_array_equal(rendered.image[..., 2], by_hand(above[rows, columns]))
    np.testing.assert_array_equal(rendered.mask, mask[rows, columns].astype(np.uint8) * 255)
    single = render(sample, dataclasses.replace(PATCH_VIEW, context_mm=0.0))
    np.testing.assert_array_equal(rendered.image[..., 1], single.image)
    np.testing.assert_array_equal(rendered.mask, single.mask)
    # the centre: column 10 + 10, row 13 + 10 from (0020,0032) (-100, -100) at 2 mm per px
    assert rendered.patch_centre_xy_mm == (-60.0, -54.0) == single.patch_centre_xy_mm


def test_a_plane_on_a_slice_is_that_slice(series):
    """D a multiple of the spacing: the neighbour slices themselves, not a blend."""
    rendered = render(candidate(series, 3), dataclasses.replace(SLICE_VIEW, context_mm=2.5))
    np.testing.assert_array_equal(rendered.image[..., 0], by_hand(slice_hu(1)))
    np.testing.assert_array_equal(rendered.image[..., 2], by_hand(slice_hu(5)))
    np.testing.assert_array_equal(context_hu(series.stack, 3.75, -2.5, read_hu),
                                  slice_hu(1).astype(np.float32))


@pytest.mark.parametrize(("index", "reason"), [
    (1, "2.5D context z - 2 mm outside the series"),  # 1.25 - 2 < 0
    (7, "2.5D context z + 2 mm outside the series"),  # 8.75 + 2 > 8.75
])
def test_context_outside_the_series_is_skipped(series, index, reason):
    """A plane beyond the first or last slice cannot be drawn: the sample is skipped, with
    the reason context_reason gives from the geometry alone (before any decoding)."""
    with pytest.raises(UnusableFileError, match=f"^{re.escape(reason)}$"):
        render(candidate(series, index), SLICE_VIEW)
    assert context_reason(series.stack, candidate(series, index).slice_z_mm, D_MM) == reason
    assert context_reason(series.stack, candidate(series, 2).slice_z_mm, D_MM) is None


def test_context_across_a_gap_is_skipped(tmp_path):
    """A plane between slices further apart than the gap rule allows is not interpolated."""
    gapped = write_series(tmp_path / "gap", [0, 1, 2, 3, *range(5, 11)])  # no 5.0 mm slice
    assert gapped.z_gaps == 1 and gapped.stack.max_step_mm == 1.875  # 1.5 x 1.25 mm
    with pytest.raises(UnusableFileError,
                       match=r"^2\.5D context z \+ 2 mm across a gap in the series$"):
        render(candidate(gapped, 3), SLICE_VIEW)  # 3.75 + 2 = 5.75 mm, in 3.75 ... 6.25
    with pytest.raises(UnusableFileError,
                       match=r"^2\.5D context z - 2 mm across a gap in the series$"):
        render(candidate(gapped, 4), SLICE_VIEW)  # 6.25 - 2 = 4.25 mm, in 3.75 ... 6.25
    assert [context_reason(gapped.stack, z_mm, D_MM) for z_mm in (3.75, 6.25, 8.75)] == [
        "2.5D context z + 2 mm across a gap in the series",
        "2.5D context z - 2 mm across a gap in the series", None]
    beside = render(candidate(gapped, 6), SLICE_VIEW)  # 8.75 mm: 6.75 and 10.75 mm are fine
    np.testing.assert_array_equal(beside.image[..., 0],
                                  by_hand(0.6 * slice_hu(5) + 0.4 * slice_hu(6)))


def test_context_needs_the_series(series, tmp_path):
    """A DICOM file without its series, or an image file, cannot have context."""
    alone = dataclasses.replace(candidate(series, 3), stack=None)
    with pytest.raises(UnusableFileError, match=f"^{re.escape(NO_SERIES_REASON)}$"):
        render(alone, SLICE_VIEW)
    image = tmp_path / "a.png"
    image.write_bytes(contract.encode_png(np.zeros((8, 8), np.uint8)))
    with pytest.raises(UnusableFileError, match=f"^{re.escape(NO_SERIES_REASON)}$"):
        render(Candidate(image, "a.png", "P1", 0, ""), SLICE_VIEW)


def test_samples_of_a_series_decode_each_slice_once(series):
    """One HuCache for neighbouring samples: every slice is decoded once."""
    decoded: list[Path] = []

    def counting_read(path: Path) -> tuple[np.ndarray, bool]:
        decoded.append(path)
        return read_hu(path)

    cache = HuCache(counting_read)
    for index in (2, 3, 4):
        render(candidate(series, index), SLICE_VIEW, cache)
    assert sorted(p.name for p in decoded) == [f"{i:03d}.dcm" for i in range(7)]
    assert not cache.read(series.slices[3].path)[0].flags.writeable
    with pytest.raises(ValueError, match="cache capacity must be >= 1 slice, got 0"):
        HuCache(read_hu, 0)


GEOMETRIES = {
    "axial": {},
    "flipped_and_tilted": {  # rows run -x, columns -y, plane tilted 3 degrees about y
        "position_mm": (171.3, 23.9, 3.75),
        "orientation": (-np.cos(np.radians(3)), 0.0, np.sin(np.radians(3)), 0.0, -1.0, 0.0),
        "row_spacing_mm": 0.703125, "column_spacing_mm": 0.703125},
}


@pytest.mark.parametrize("patch_mm", [40.0, 42.0])  # sides of 20 and 21 px
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_patch_centre_round_trip(series, patch_mm, geometry):
    """Centre -> manifest x, y (3 decimals) -> pixel_of_patient_xy -> the same crop."""
    settings = dataclasses.replace(PATCH_VIEW, patch_mm=patch_mm, context_mm=0.0)
    side_px = int(round(patch_mm / SPACING_MM))
    header = dataclasses.replace(series.slices[3], **GEOMETRIES[geometry])
    rng = np.random.default_rng(7)
    centres = [(10.5, 11.5), (12.0, 13.0), (20.5, 20.5), (21.5, 9.0), (16.49, 30.51),
               *map(tuple, rng.uniform(5, 43, (40, 2)))]
    cache = HuCache(read_hu)
    for centre in centres:
        first = render(candidate(series, 3, centre_xy_px=centre, header=header), settings, cache)
        x_mm, y_mm = (float(f"{value:.3f}") for value in first.patch_centre_xy_mm)
        row, column = header.pixel_of_patient_xy(x_mm, y_mm)
        assert patch_centre_px((column, row), side_px) == patch_centre_px(centre, side_px)
        again = render(candidate(series, 3, centre_xy_px=(column, row), header=header),
                       settings, cache)
        np.testing.assert_array_equal(again.image, first.image)
        assert again.patch_centre_xy_mm == pytest.approx(first.patch_centre_xy_mm, abs=1e-9)


def test_patch_centre_is_the_crop_origin_plus_half_the_side():
    """(row, column) of the centre: first pixel of the crop + side / 2, whatever the rounding."""
    assert patch_centre_px((20.3, 22.6), 20) == (23.0, 20.0)
    assert patch_centre_px((20.0, 20.0), 21) == (20.5, 20.5)  # 9.5 rounds to 10 (half to even)
    assert patch_centre_px((21.0, 21.0), 21) == (20.5, 20.5)  # 10.5 rounds to 10 as well


# ----------------------------------------------------------------------------- configuration
def test_context_enters_the_reuse_hash():
    """--context-mm is one of the settings that decide the output."""
    assert PrepareConfig(context_mm=2.0).hashed_settings()["context_mm"] == 2.0
    assert PrepareConfig(context_mm=2.0).hashed_settings() != PrepareConfig().hashed_settings()


@pytest.mark.parametrize("value", [-0.5, 50.5, float("nan"), float("inf"), "2"])
def test_config_refuses_a_bad_context(value):
    """Only a finite number from 0 to 50 mm."""
    with pytest.raises(ValueError, match=r"^--context-mm must be a number from 0 to 50 mm, got "):
        PrepareConfig(context_mm=value)


@pytest.mark.parametrize(("value", "message"), [
    ("60", "invalid argument: --context-mm must be a number from 0 to 50 mm, got 60.0"),
    ("-1", "invalid argument: --context-mm must be a number from 0 to 50 mm, got -1.0"),
    ("nan", "argument --context-mm: expected a finite number, got 'nan'"),
])
def test_cli_refuses_a_bad_context(tmp_path, capsys, value, message):
    """One sentence and exit 2, before any work."""
    try:
        code = prepare_lung_dataset.main(["--source", "synthetic", "--work-dir", str(tmp_path),
                                          "--output", str(tmp_path / "out"),
                                          "--context-mm", value])
    except SystemExit as exit_:  # argparse's own refusal
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "raw_synthetic").exists()


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """The six-patient synthetic cohort, generated once for this module."""
    work = tmp_path_factory.mktemp("context")
    generate_cohort(work / "raw_synthetic", n_patients=6, image_size_px=64, seed=42)
    return work / "raw_synthetic"


def prepare(work: Path, cohort: Path, output: str, *extra: str) -> int:
    if not (work / "raw_synthetic").exists():
        shutil.copytree(cohort, work / "raw_synthetic")
    return prepare_lung_dataset.main([
        "--source", "synthetic", "--synthetic-patients", "6", "--synthetic-size", "64",
        "--image-size", "32", "--work-dir", str(work), "--output", str(work / output),
        "--workers", "2", "-q", *extra])


def manifest_rows(dataset: Path) -> list[dict]:
    with open(dataset / contract.MANIFEST_FILE, newline="") as handle:
        return list(csv.DictReader(handle))


def test_end_to_end_slice_view_with_context(tmp_path, cohort, capsys):
    """--context-mm 2.5: RGB PNGs whose G channel is the single-slice dataset's image."""
    assert prepare(tmp_path, cohort, "ctx", "--context-mm", "2.5") == 0
    assert prepare(tmp_path, cohort, "flat") == 0
    info = contract.read_dataset_info(tmp_path / "ctx")
    assert (info["channels"], info["channel_order"], info["context_mm"]) == (
        3, ["z-D", "z", "z+D"], 2.5)
    flat_info = contract.read_dataset_info(tmp_path / "flat")
    assert (flat_info["channels"], flat_info["channel_order"], flat_info["context_mm"]) == (
        1, ["z"], 0.0)
    assert info["input_hash"] != flat_info["input_hash"]
    rows, flat = manifest_rows(tmp_path / "ctx"), manifest_rows(tmp_path / "flat")
    flat_by_path = {row["path"]: row for row in flat}
    shared = [row for row in rows if row["path"] in flat_by_path]
    assert len(rows) > 20 and len(shared) > 20
    for row in rows:
        image = contract.read_png(tmp_path / "ctx" / row["path"], size_px=32, channels=3)
        assert image.shape == (32, 32, 3)
        assert row["patch_centre_x_mm"] == row["patch_centre_y_mm"] == ""
        if row["path"] in flat_by_path:
            single = contract.read_png(tmp_path / "flat" / row["path"], size_px=32)
            np.testing.assert_array_equal(image[..., 1], single)
            assert not np.array_equal(image[..., 0], single)  # a real neighbour plane
        if row["mask_path"] and row["path"] in flat_by_path:
            mask = contract.read_png(tmp_path / "ctx" / row["mask_path"], size_px=32)
            np.testing.assert_array_equal(mask, contract.read_png(
                tmp_path / "flat" / flat_by_path[row["path"]]["mask_path"], size_px=32))
    reasons = info["files_skipped"]["by_reason"]
    assert set(reasons) >= {"2.5D context z - 2.5 mm outside the series",
                            "2.5D context z + 2.5 mm outside the series"}
    assert prepare(tmp_path, cohort, "ctx", "--context-mm", "2.5") == 0  # reused
    assert prepare(tmp_path, cohort, "ctx", "--context-mm", "1.5") == 2
    assert "was made with other settings; use --overwrite" in capsys.readouterr().err


def test_context_is_checked_before_balancing(tmp_path, cohort):
    """Samples without context planes are dropped before the split and balancing, so every
    split gets exactly the samples per class that balancing asked for (none lost after it)
    and the context skips reduce what was available instead."""
    assert prepare(tmp_path, cohort, "ctx", "--context-mm", "7.5", "--target-count", "40") == 0
    assert prepare(tmp_path, cohort, "flat", "--target-count", "40") == 0
    info = contract.read_dataset_info(tmp_path / "ctx")
    flat = contract.read_dataset_info(tmp_path / "flat")
    for split, counts in info["counts"].items():
        for class_name in ("cancer", "non_cancer"):
            assert counts[class_name] == counts["requested"][class_name] > 0, (split, class_name)
    assert sum(sum(c["available"].values()) for c in info["counts"].values()) == sum(
        sum(c["available"].values()) for c in flat["counts"].values()) - 20
    reasons = info["files_skipped"]["by_reason"]
    assert (reasons["2.5D context z - 7.5 mm outside the series"],
            reasons["2.5D context z + 7.5 mm outside the series"]) == (12, 8)
    rows = manifest_rows(tmp_path / "ctx")
    assert len(rows) == 40 and not any("context" in reason for reason in
                                       _skipped_reasons_of(tmp_path / "ctx", rows))


def _skipped_reasons_of(dataset: Path, rows: list[dict]) -> list[str]:
    """The skip reasons recorded for the manifest's own source files (none expected)."""
    sources = {row["source_file"] for row in rows}
    with open(dataset / contract.SKIPPED_FILE, newline="") as handle:
        return [row["reason"] for row in csv.DictReader(handle) if row["file"] in sources]


def test_end_to_end_patch_view_records_patch_centres(tmp_path, cohort):
    """Patch view: every row has the patient x, y of its patch centre, which maps back to
    the crop's first pixel + side / 2 on its slice."""
    assert prepare(tmp_path, cohort, "out", "--view", "patch", "--context-mm", "2.5") == 0
    dataset = tmp_path / "out"
    info = json.loads((dataset / contract.DATASET_FILE).read_text())
    side_px = None
    for row in manifest_rows(dataset):
        contract.read_png(dataset / row["path"], size_px=32, channels=3)
        header = dicom.read_header(tmp_path / "raw_synthetic" / row["source_file"])
        side_px = int(round(info["patch_mm"] / header.pixel_spacing_mm))
        assert row["patch_centre_x_mm"].count(".") == 1
        assert len(row["patch_centre_x_mm"].split(".")[1]) == 3
        row_px, column_px = header.pixel_of_patient_xy(float(row["patch_centre_x_mm"]),
                                                       float(row["patch_centre_y_mm"]))
        for value in (row_px, column_px):
            assert (value - side_px / 2) == pytest.approx(round(value - side_px / 2), abs=1e-3)
    assert side_px is not None


def test_context_with_class_folders_is_one_sentence(tmp_path, capsys):
    """Image files have no neighbours in z: --context-mm is refused with one sentence."""
    for patient in range(4):
        for label in ("cancer", "benign"):
            folder = tmp_path / "in" / label / f"LIDC-IDRI-{patient:04d}"
            folder.mkdir(parents=True)
            (folder / "0.png").write_bytes(contract.encode_png(np.zeros((8, 8), np.uint8)))
    code = prepare_lung_dataset.main(["--input", str(tmp_path / "in"), "--work-dir",
                                      str(tmp_path), "--output", str(tmp_path / "out"),
                                      "--context-mm", "2", "--target-count", "8", "-q"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("--context-mm needs CT series labelled by LIDC XML readings, but the "
                        "labels here come from class folders (single images): leave "
                        "--context-mm at 0.")
    assert len(err.splitlines()) == 1
