"""predict draws exactly prepare's pixels: every sample of a prepared dataset, re-drawn from
the raw DICOM by predict's discovery, places and rendering, equals the dataset's PNG, for
one-channel and 2.5D (3-channel, ``--context-mm``) datasets, slice and patch views, with the
LIDC XML candidates and with a ``--nodules`` CSV of the manifest's patch centres."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import prepare_lung_dataset
from lungct import contract
from lungct.predict.discovery import start_discovery
from lungct.predict.nodules_csv import read_nodules
from lungct.predict.places import choose_places
from lungct.predict.rendering import SeriesJob, render_series
from lungct.prepare.lidc import LabelRule
from lungct.prepare.render import RenderSettings, render

SLICE_3CH, PATCH_3CH, PATCH_1CH = ("slice", 2.5), ("patch", 2.5), ("patch", 0.0)
_IDS = {SLICE_3CH: "slice-3ch", PATCH_3CH: "patch-3ch", PATCH_1CH: "patch-1ch"}
every_dataset = pytest.mark.parametrize("prepared", list(_IDS), ids=list(_IDS.values()),
                                        indirect=True)
patch_datasets = pytest.mark.parametrize("prepared", [PATCH_3CH, PATCH_1CH],
                                         ids=["patch-3ch", "patch-1ch"], indirect=True)


@pytest.fixture(scope="module")
def prepared(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny prepared synthetic dataset (6 patients, 32 px) and its raw DICOM, indexed."""
    view, context_mm = request.param
    root = tmp_path_factory.mktemp(f"{view}_{context_mm:g}")
    dataset = root / "output_dataset"
    assert prepare_lung_dataset.main([
        "--source", "synthetic", "--synthetic-patients", "6", "--synthetic-size", "64",
        "--view", view, "--image-size", "32", "--target-count", "60",
        "--context-mm", str(context_mm), "--split", "0.5,0.25,0.25", "--work-dir", str(root),
        "--output", str(dataset), "--workers", "1", "-q"]) == 0
    info = contract.read_dataset_info(dataset)
    settings = RenderSettings(info["image_size"], info["window"]["center_hu"],
                              info["window"]["width_hu"], info["view"],
                              info.get("patch_mm") or 64.0, info.get("context_mm") or 0.0)
    rule = LabelRule(**{k: v for k, v in info["label_rule"].items()
                        if k in LabelRule().to_dict()})
    manifest = pd.read_csv(dataset / contract.MANIFEST_FILE, dtype=str, keep_default_na=False)
    found = start_discovery([root / "raw_synthetic"], {})()
    return {"dataset": dataset, "settings": settings, "rule": rule, "manifest": manifest,
            "found": found, "channels": contract.dataset_channels(info), "root": root}


def _drawn(prepared: dict, nodules: list | None) -> dict[tuple[str, str], list]:
    """predict's images per (series UID, z as the manifest writes it), with their centres."""
    drawn: dict[tuple[str, str], list] = {}
    found = prepared["found"]
    for series in found.series:
        source, candidates, _ = choose_places(series, prepared["settings"].view,
                                              found.readings.get(series.series_uid),
                                              prepared["rule"], nodules)
        result = render_series(SeriesJob(series, source, tuple(candidates),
                                         prepared["settings"]))
        # only the end slices of a 2.5D series: their context plane lies outside it
        assert all(reason.startswith("2.5D context z ") and reason.endswith(" outside the "
                                                                            "series")
                   for reason in result.failed.values())
        assert len(result.failed) <= (2 if prepared["channels"] == 3 else 0)
        for candidate, image in zip(result.candidates, result.images, strict=True):
            drawn.setdefault((series.series_uid, f"{candidate.slice_z_mm:.2f}"), []).append(
                (candidate, image))
    return drawn


def _expected(prepared: dict, row: pd.Series) -> np.ndarray:
    image = contract.read_png(prepared["dataset"] / row["path"], size_px=32,
                              channels=prepared["channels"])
    return image if image.ndim == 3 else image[..., None]


@every_dataset
def test_xml_or_every_slice_places_draw_prepares_pixels(prepared: dict) -> None:
    """Slice view: every sample's slice; patch view: every nodule-bearing sample (XML)."""
    drawn = _drawn(prepared, None)
    rows = prepared["manifest"]
    if prepared["settings"].view == "patch":
        rows = rows[rows["negative_kind"] != "no_finding"]
    assert len(rows) > 10
    for _, row in rows.iterrows():
        (candidate, image), = drawn[(row["series_uid"], row["slice_z_mm"])]
        assert image.shape[-1] == prepared["channels"]
        assert np.array_equal(image, _expected(prepared, row)), row["path"]


@patch_datasets
def test_nodules_csv_of_the_manifest_centres_draws_prepares_pixels(prepared: dict,
                                                                   tmp_path: Path) -> None:
    """Patch view: every sample, placed by its manifest centre in patient coordinates."""
    rows = prepared["manifest"]
    csv_path = tmp_path / "nodules.csv"
    rows.rename(columns={"patch_centre_x_mm": "x_mm", "patch_centre_y_mm": "y_mm",
                         "slice_z_mm": "z_mm"})[["series_uid", "x_mm", "y_mm", "z_mm"]].to_csv(
        csv_path, index=False)
    drawn = _drawn(prepared, read_nodules(csv_path))
    for number, (_, row) in enumerate(rows.iterrows(), start=2):
        (image,) = [i for c, i in drawn[(row["series_uid"], row["slice_z_mm"])]
                    if c.nodule_id == f"row{number}"]
        assert np.array_equal(image, _expected(prepared, row)), row["path"]


@patch_datasets
def test_the_sliding_window_decodes_each_slice_once(prepared: dict,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Windows are cropped from one decoded slice (and its context planes), not re-read."""
    import lungct.predict.rendering as rendering

    reads: list[Path] = []
    original = rendering.read_hu
    monkeypatch.setattr(rendering, "read_hu", lambda path: reads.append(path) or original(path))
    series = prepared["found"].series[0]
    result = render_series(SeriesJob(series, "sliding_window", (), prepared["settings"]))
    assert len(result.images) > len(series.slices)
    assert len(reads) == len(set(reads)) == len(series.slices)
    for candidate, image in list(zip(result.candidates, result.images, strict=True))[::25]:
        alone = render(candidate, prepared["settings"]).image
        assert np.array_equal(image, alone if alone.ndim == 3 else alone[..., None])
