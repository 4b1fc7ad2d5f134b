#!/usr/bin/env python3
"""Predict-stage throughput: slices/s end to end against the model's own predict throughput.

A synthetic cohort of ``--patients`` CT series (``--slice-size`` px slices, 52 per series) is
prepared twice, as a slice-view dataset (``--image-size`` px) and a patch-view one (64 px
patches), and the baseline CNN is trained one epoch on each (only to have a model: accuracy
does not matter here). Then, each measurement in a fresh interpreter (so that the framework is
imported once, after the render pool started, as in a real run):

- ``model``: the same images already in memory (every slice of every series, rendered by
  predict's own code first), scored by the loaded model's compiled predict in the run's batch
  size: images/s, median of ``--repeats``.
- ``e2e``: ``predict_lung_ct`` on the raw DICOM of the cohort (index, render in
  ``--workers`` processes, score, write every output) with ``--gradcam-top 0``, with the
  default ``--gradcam-top 8``, and with ``--gradcam-top 8 --dicom-out``; slices/s counted
  after the model is loaded and its predict compiled (the stage reports that start-up time,
  which is given separately, with the interpreter's import of lungct's predict stage).
- ``window``: the patch model's sliding window on ``--window-series`` series without their
  XML readings (windows/s and slices/s, same accounting).

Prints JSON (and writes it to ``--out``).

    python benchmarks/bench_predict.py --out benchmarks/out/predict.json
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

LOG = logging.getLogger("bench_predict")
REPO = Path(__file__).resolve().parents[1]


def _cli(script: str, *args: str) -> None:
    """Run one of the stage scripts in a fresh interpreter; stop the benchmark if it fails."""
    command = [sys.executable, str(REPO / script), *args, "-q"]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")


def _prepare_and_train(work: Path, view: str, image_size: int, patients: int,
                       slice_size: int) -> Path:
    """A dataset of the cohort in ``view`` and a one-epoch baseline; its training results."""
    results = work / view / "training_results.json"
    if results.is_file():
        return results
    _cli("prepare_lung_dataset.py", "--source", "synthetic", "--synthetic-patients",
         str(patients), "--synthetic-size", str(slice_size), "--view", view, "--image-size",
         str(image_size), "--target-count", "200", "--work-dir", str(work), "--output",
         str(work / f"dataset_{view}"))
    _cli("training_lung_cnn.py", "--dataset", str(work / f"dataset_{view}"), "--out",
         str(work / view), "--models", "baseline", "--preset", "quick", "--epochs", "1")
    return results


def _child(spec: dict) -> dict:
    """One measurement in this (fresh) interpreter; see the module docstring."""
    from lungct.predict.config import PredictConfig
    from lungct.predict.stage import run

    if spec["mode"] == "model":
        return _model_throughput(spec)
    config = PredictConfig(inputs=tuple(Path(p) for p in spec["inputs"]),
                           results_path=Path(spec["results"]), out_dir=Path(spec["out"]),
                           gradcam_top=spec["gradcam_top"], dicom_out=spec["dicom_out"],
                           batch_size=spec["batch_size"], workers=spec["workers"],
                           overwrite=True)
    start = time.perf_counter()
    counts = run(config)
    wall_s = time.perf_counter() - start
    with (Path(spec["out"]) / "summary.csv").open(newline="") as handle:
        summary = list(csv.DictReader(handle))
    scored = sum(int(row["n_scored"]) for row in summary)
    slices = scored  # slice view: one image per slice
    if spec["mode"] == "window":
        slices = sum(int(np.load(Path(spec["out"]) / row["series_uid"] /
                                 "probability_map.npy").shape[0]) for row in summary)
    steady_s = wall_s - counts["model_startup_s"]
    return {"series": len(summary), "slices": slices, "images": scored,
            "images_per_slice": round(scored / slices, 1), "failed": counts["failed"],
            "wall_s": round(wall_s, 2), "model_startup_s": round(counts["model_startup_s"], 2),
            "after_startup_s": round(steady_s, 2),
            "slices_per_s": round(slices / steady_s, 1),
            "images_per_s": round(scored / steady_s, 1)}


def _model_throughput(spec: dict) -> dict:
    """The model's own predict on the run's images, already rendered and in memory."""
    from lungct.predict.discovery import start_discovery
    from lungct.predict.places import choose_places
    from lungct.predict.recipe import read_recipe
    from lungct.predict.rendering import SeriesJob, render_series

    recipe = read_recipe(Path(spec["results"]), None)
    found = start_discovery([Path(p) for p in spec["inputs"]], {})()
    start = time.perf_counter()
    images = []
    for series in found.series:
        source, candidates, _ = choose_places(series, recipe.settings.view, None,
                                              recipe.label_rule, None)
        images.append(render_series(SeriesJob(series, source, tuple(candidates),
                                              recipe.settings)).images)
    render_s = time.perf_counter() - start
    stacked = np.concatenate(images)
    start = time.perf_counter()
    from lungct.predict.scoring import Scorer

    scorer = Scorer(recipe, spec["batch_size"])
    startup_s = time.perf_counter() - start
    scorer.predict(stacked[: spec["batch_size"]])  # warm
    times = []
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        scorer.predict(stacked)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"images": len(stacked), "image_shape": list(stacked.shape[1:]),
            "render_1_process_images_per_s": round(len(stacked) / render_s, 1),
            "model_startup_s": round(startup_s, 2), "predict_s_median": round(median, 3),
            "predict_s_runs": [round(t, 3) for t in times],
            "images_per_s": round(len(stacked) / median, 1)}


def _measure(spec: dict) -> dict:
    """Run :func:`_child` in a fresh interpreter; its JSON, plus its interpreter's wall time."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                            capture_output=True, text=True, check=False, cwd=REPO)
    if result.returncode != 0:
        raise SystemExit(f"measurement {spec['mode']} failed:\n{result.stderr[-3000:]}")
    record = json.loads(result.stdout.strip().splitlines()[-1])
    record["process_wall_s"] = round(time.perf_counter() - start, 2)
    LOG.info("%s: %s", spec["mode"], record)
    return record


def _without_xml(raw: Path, patients: list[str], target: Path) -> list[str]:
    """Copies of some patients' DICOM without their XML readings (the sliding window)."""
    if target.exists():
        shutil.rmtree(target)
    for patient in patients:
        shutil.copytree(raw / patient, target / patient, ignore=shutil.ignore_patterns("*.xml"))
    return [str(target)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=20, help="synthetic series to score")
    parser.add_argument("--slice-size", type=int, default=256, help="CT slice side in pixels")
    parser.add_argument("--image-size", type=int, default=224, help="slice-view model input")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--window-series", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("benchmarks/out/bench_predict_work"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/predict.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    work = args.work.resolve()
    slice_results = _prepare_and_train(work, "slice", args.image_size, args.patients,
                                       args.slice_size)
    patch_results = _prepare_and_train(work, "patch", 64, args.patients, args.slice_size)
    raw = work / "raw_synthetic"
    patients = sorted(p.name for p in raw.iterdir() if p.is_dir())[: args.patients]
    inputs = [str(raw / p) for p in patients]
    common = {"results": str(slice_results), "inputs": inputs, "batch_size": args.batch_size,
              "workers": args.workers, "repeats": args.repeats, "dicom_out": False,
              "gradcam_top": 0}
    model = _measure({**common, "mode": "model"})
    e2e = _measure({**common, "mode": "e2e", "out": str(work / "pred_plain")})
    gradcam = _measure({**common, "mode": "e2e", "gradcam_top": 8,
                        "out": str(work / "pred_gradcam")})
    dicom = _measure({**common, "mode": "e2e", "gradcam_top": 8, "dicom_out": True,
                      "out": str(work / "pred_dicom")})
    window = _measure({**common, "mode": "window", "results": str(patch_results),
                       "inputs": _without_xml(raw, patients[: args.window_series],
                                              work / "no_xml"),
                       "out": str(work / "pred_window")})
    overlays = 8 * dicom["series"]
    record = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "load_average": os.getloadavg()},
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cohort": {"series": args.patients, "slice_px": args.slice_size,
                   "model_input_px": args.image_size, "batch_size": args.batch_size,
                   "workers": args.workers},
        "model_only": model, "end_to_end": e2e, "end_to_end_gradcam_top8": gradcam,
        "end_to_end_gradcam_top8_dicom_out": dicom, "sliding_window": window,
        "end_to_end_vs_model": round(e2e["images_per_s"] / model["images_per_s"], 3),
        "gradcam_top8_vs_model": round(gradcam["images_per_s"] / model["images_per_s"], 3),
        "dicom_out_extra_s": round(dicom["after_startup_s"] - gradcam["after_startup_s"], 2),
        "dicom_out_extra_ms_per_overlay": round(
            1000 * (dicom["after_startup_s"] - gradcam["after_startup_s"]) / overlays, 1),
    }
    text = json.dumps(record, indent=2)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
