"""Tests of lungct.interpret.report, lungct.interpret.figures and lungct.interpret.weakness."""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from interpret_fixtures import make_baseline_model, make_dataset, write_results

from lungct.interpret.report import (
    FIGURE_FILES,
    SYNTHETIC_BANNER,
    limitations,
    render_html,
    to_jsonable,
)
from lungct.interpret.stage import InterpretConfig, run
from lungct.interpret.weakness import analyse_weaknesses


@pytest.fixture(scope="module")
def local_run(tmp_path_factory) -> tuple[dict, Path]:
    """Report of a fabricated run whose dataset is recorded as local (not synthetic)."""
    root = tmp_path_factory.mktemp("local")
    dataset = make_dataset(root, source="local:/data/lidc", seed=2)
    results = write_results(root, dataset, make_baseline_model(32, seed=2))
    out = root / "reports"
    report = run(InterpretConfig(results_path=results, out_dir=out, bootstrap_resamples=200))
    return report, out


def test_html_is_self_contained(local_run):
    """report.html embeds its figures and loads nothing from elsewhere."""
    html = (local_run[1] / "report.html").read_text()
    sources = re.findall(r'src="([^"]*)"', html)
    assert len(sources) == len(FIGURE_FILES)
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert "http://" not in html and "https://" not in html


def test_html_opens_with_headline_and_provenance(local_run):
    """The headline table and the provenance box come before the detailed sections."""
    html = (local_run[1] / "report.html").read_text()
    headline = html.index("<h2>Headline")
    assert headline < html.index("Data provenance") < html.index("Metrics per level")
    assert "local:/data/lidc" in html and "Research use only" in html


def test_synthetic_banner_only_for_synthetic_data(local_run):
    """No SYNTHETIC banner for a local dataset; the banner when the source is synthetic."""
    report, out = local_run
    assert SYNTHETIC_BANNER not in (out / "report.html").read_text()
    synthetic = {**report, "data": {**report["data"], "synthetic": True}}
    paths = {key: out / name for key, name in FIGURE_FILES.items()}
    assert render_html(synthetic, paths).count(SYNTHETIC_BANNER) == 1


def test_figures_are_real_images(local_run):
    """Every figure decodes as a PNG larger than a thumbnail."""
    for name in FIGURE_FILES.values():
        image = cv2.imread(str(local_run[1] / name))
        assert image is not None and min(image.shape[:2]) > 200, name


def test_report_json_has_no_nan(local_run):
    """report.json is strict JSON: undefined values are null, never NaN."""
    text = (local_run[1] / "report.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text)["data"]["synthetic"] is False


def test_limitations_are_computed_from_the_report(local_run):
    """Limitations quote this run's counts and interval widths."""
    report = local_run[0]
    notes = limitations(report)
    patients = report["patient_level"]["n"]["total"]
    assert notes[0].startswith(f"The test split holds {patients} patients")
    auc = report["patient_level"]["auc"]
    if auc["ci_low"] is not None:
        assert any(f"{auc['ci_high'] - auc['ci_low']:.2f} wide" in n for n in notes)


def test_to_jsonable_converts_numpy_and_nan():
    """NumPy scalars and arrays become plain values; NaN and infinity become None."""
    value = to_jsonable({"a": np.float32(0.5), "b": np.array([1, 2]), "c": float("nan"),
                         "d": (np.int64(3), np.inf), 4: Path("x")})
    assert value == {"a": 0.5, "b": [1, 2], "c": None, "d": [3, None], "4": "x"}


@pytest.fixture
def scored_frame() -> pd.DataFrame:
    """Eight test slices: two missed cancers (small), one false-positive benign nodule."""
    return pd.DataFrame({
        "path": [f"s{i}.png" for i in range(8)],
        "y_true": [1, 1, 1, 1, 0, 0, 0, 0],
        "y_prob": [0.9, 0.8, 0.2, 0.1, 0.7, 0.3, 0.1, 0.2],
        "patient_id": ["A", "A", "B", "B", "C", "C", "D", "D"],
        "negative_kind": ["", "", "", "", "benign_nodule", "benign_nodule", "no_finding",
                          "no_finding"],
        "diameter_mm": [15.0, 12.0, 4.0, 5.0, 8.0, 9.0, np.nan, np.nan],
        "malignancy": [5.0, 5.0, 4.0, 4.0, 2.0, 1.0, np.nan, np.nan],
        "n_readers": [4.0, 4.0, 1.0, 1.0, 2.0, 2.0, np.nan, np.nan],
    })


def test_weakness_counts_errors_by_class_and_kind(scored_frame):
    """Error rates per class and per negative kind are counted at the threshold."""
    weak = analyse_weaknesses(scored_frame, 0.5)
    assert weak["error_rates"]["cancer (false-negative rate)"] == {"n": 4, "errors": 2,
                                                                   "rate": 0.5}
    assert weak["error_rates"]["benign_nodule (false-positive rate)"]["errors"] == 1
    assert weak["error_rates"]["no_finding (false-positive rate)"]["errors"] == 0


def test_weakness_breaks_false_negatives_down_by_diameter(scored_frame):
    """Missed cancers fall in the <6 mm bin; the finding names it with its counts."""
    weak = analyse_weaknesses(scored_frame, 0.5)
    table = {row["group"]: row for row in weak["false_negatives_by"]["diameter_mm"]}
    assert table["<6 mm"]["errors"] == 2 and table["10-20 mm"]["errors"] == 0
    assert ("Highest false-negative rate by diameter_mm: <6 mm, 2 of 2 (100%); lowest: "
            "10-20 mm, 0 of 2 (0%).") in weak["findings"]


def test_weakness_lists_patients_and_failures(scored_frame):
    """Patient B carries two thirds of the errors; the most confident miss comes first."""
    weak = analyse_weaknesses(scored_frame, 0.5)
    top = weak["patients_with_most_errors"][0]
    assert top["patient_id"] == "B" and top["share_of_errors"] == pytest.approx(2 / 3)
    assert weak["failure_cases"][0] == {"path": "s3.png", "kind": "false_negative",
                                        "y_prob": 0.1}


def test_weakness_rejects_bad_threshold(scored_frame):
    """A threshold outside [0, 1] is a ValueError naming it."""
    with pytest.raises(ValueError, match=r"threshold must lie in \[0, 1\], got 2"):
        analyse_weaknesses(scored_frame, 2)


def test_weakness_groups_errors_by_scanner() -> None:
    """Errors are broken down by manufacturer, kernel and slice thickness when recorded."""
    frame = pd.DataFrame({
        "path": [f"s{i}.png" for i in range(4)], "patient_id": ["A", "A", "B", "B"],
        "y_true": [1, 1, 1, 0], "y_prob": [0.9, 0.1, 0.2, 0.8],
        "negative_kind": ["", "", "", "no_finding"], "diameter_mm": [np.nan] * 4,
        "malignancy": [np.nan] * 4, "n_readers": [np.nan] * 4,
        "manufacturer": ["GE", "GE", "SIEMENS", "SIEMENS"],
        "convolution_kernel": ["STANDARD", "STANDARD", "B30f", "B30f"],
        "slice_thickness_mm": [1.25, 1.25, 2.5, 2.5]})
    weak = analyse_weaknesses(frame, 0.5)
    by_maker = {row["group"]: (row["errors"], row["n"])
                for row in weak["false_negatives_by"]["manufacturer"]}
    assert by_maker == {"GE": (1, 2), "SIEMENS": (1, 1)}
    assert [r["group"] for r in weak["false_negatives_by"]["slice_thickness_mm"]] == [
        "1.25", "2.5"]
    assert weak["false_positives_by"]["convolution_kernel"] == [
        {"group": "B30f", "n": 1, "errors": 1, "rate": 1.0}]
