#!/usr/bin/env python3
"""Model quality on the benchmark cohort: the selected model against the no-pixel baseline.

For every seed, 2.5D context (``--context-mm``) and number of cross-validation folds
(``--folds``) this runs the three stages as a user does (``prepare_lung_dataset.py``,
``training_lung_cnn.py``, ``interpretation.py``, each in its own process) on the synthetic
benchmark cohort and reads from ``report.json``:

- the selected model's nodule- and slice-level test AUC on the nodule-bearing test slices,
  and the paired difference against the diameter-only logistic regression, with its
  patient-bootstrap 95% CI (``metadata_baseline``);
- Brier score, log loss and ECE on test before and after temperature scaling, each with its
  CI, and the ECE a perfectly calibrated model would show at that sample size;
- wall time per stage, and the machine's 1-minute load average when the configuration ends
  (wall times measured beside other work are not comparable).

Each configuration is appended to ``--out`` as soon as it finishes, and configurations already
there are skipped, so an interrupted grid continues where it stopped. A dataset is prepared
once per (seed, context) and shared by the fold settings.

    python benchmarks/bench_models.py --seeds 1,2,3 --context-mm 0,2.5,3.0 --folds 1,5 \
        --out benchmarks/out/models_grid.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

LOG = logging.getLogger("bench_models")
REPO = Path(__file__).resolve().parents[1]


def _csv(kind: type, text: str) -> list:
    return [kind(item) for item in text.split(",") if item.strip()]


def _run(command: list[str], log_file: Path) -> float:
    """Run one stage in its own process, its output to ``log_file``; return its wall time."""
    started = time.perf_counter()
    with log_file.open("w") as log:
        result = subprocess.run([sys.executable, *command], cwd=REPO, stdout=log,
                                stderr=subprocess.STDOUT, check=False)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{command[0]} exited {result.returncode}; see {log_file}")
    return round(seconds, 1)


def _value(block: Any) -> dict | None:
    """``{value, ci_low, ci_high}`` of a report metric, or None where the report has none."""
    if not isinstance(block, dict) or block.get("value") is None:
        return None
    return {key: block.get(key) for key in ("value", "ci_low", "ci_high")}


def _calibration(report: dict) -> dict:
    calibration = report.get("calibration", {})
    picked = {phase: {metric: _value(calibration.get(phase, {}).get(metric))
                      for metric in ("brier", "log_loss", "ece")}
              for phase in ("before", "after")}
    picked["ece_reference"] = calibration.get("ece_reference")
    picked["temperature"] = calibration.get("temperature")
    return picked


def summarise_report(report: dict) -> dict:
    """The figures the models issue asks for, from one report.json."""
    baseline = report["metadata_baseline"]
    levels = {}
    for level in ("slice_level", "nodule_level"):
        levels[level] = {
            "cnn_auc": _value(baseline.get(f"cnn_auc_same_samples_{level}")),
            "baseline_auc": _value(baseline.get(level, {}).get("auc")),
            "difference": _value(baseline.get(f"auc_difference_cnn_minus_baseline_{level}")),
        }
    return {
        "selected_model": next((name for name, entry in report.get("models", {}).items()
                                if entry.get("selected")), None),
        "n_test_patients": report["data"]["splits"]["test"]["patients"],
        "n_nodule_test_slices": baseline.get("n_test_slices"),
        "levels": levels,
        "calibration": _calibration(report),
    }


def run_configuration(work: Path, seed: int, context_mm: float, folds: int,
                      args: argparse.Namespace) -> dict:
    """Prepare (once per seed and context), train and interpret one configuration.

    Each seed's synthetic cohort lives in its own work folder: the cohort depends on the
    seed, and a regenerated cohort (new file times) would not let prepare reuse a dataset."""
    seed_work = work / f"seed{seed}"
    dataset = seed_work / f"dataset_context{context_mm:g}"
    run_dir = work / f"run_seed{seed}_context{context_mm:g}_folds{folds}"
    run_dir.mkdir(parents=True, exist_ok=True)
    seconds = {"prepare": _run([
        "prepare_lung_dataset.py", "--source", "synthetic",
        "--synthetic-patients", str(args.patients), "--view", "patch",
        "--image-size", str(args.image_size), "--target-count", str(args.target_count),
        "--seed", str(seed), "--context-mm", f"{context_mm:g}", "--work-dir", str(seed_work),
        "--output", str(dataset), "-q"], run_dir / "prepare.log")}
    seconds["train"] = _run([
        "training_lung_cnn.py", "--dataset", str(dataset), "--out", str(run_dir),
        "--preset", "quick", "--seed", str(seed), "--folds", str(folds), "-q"],
        run_dir / "train.log")
    seconds["interpret"] = _run([
        "interpretation.py", "--results", str(run_dir / "training_results.json"),
        "--out", str(run_dir / "reports"), "-q"], run_dir / "interpret.log")
    report = json.loads((run_dir / "reports" / "report.json").read_text(encoding="utf-8"))
    return {"seed": seed, "context_mm": context_mm, "folds": folds,
            "seconds": seconds, "load_average_1min_at_end": round(os.getloadavg()[0], 2),
            **summarise_report(report)}


def _ci(block: dict | None) -> str:
    if block is None:
        return "n/a"
    return f"{block['value']:.3f} [{block['ci_low']:.3f}, {block['ci_high']:.3f}]"


def markdown_table(record: dict) -> str:
    """One row per configuration: the figures the models issue asks for."""
    lines = ["| seed | context mm | folds | nodule AUC | nodule: CNN - diameter | "
             "slice: CNN - diameter | Brier before -> after | log loss before -> after | "
             "ECE after (reference) | T | wall s (prep/train/interp) |",
             "| " + " | ".join(["---"] * 11) + " |"]
    for row in sorted(record["rows"], key=lambda r: (r["folds"], r["context_mm"], r["seed"])):
        levels, cal = row["levels"], row["calibration"]
        reference = (cal.get("ece_reference") or {}).get("mean")
        lines.append(
            f"| {row['seed']} | {row['context_mm']:g} | {row['folds']} | "
            f"{_ci(levels['nodule_level']['cnn_auc'])} | "
            f"{_ci(levels['nodule_level']['difference'])} | "
            f"{_ci(levels['slice_level']['difference'])} | "
            f"{cal['before']['brier']['value']:.3f} -> {cal['after']['brier']['value']:.3f} | "
            f"{cal['before']['log_loss']['value']:.3f} -> "
            f"{cal['after']['log_loss']['value']:.3f} | "
            f"{cal['after']['ece']['value']:.3f} ({reference:.3f}) | "
            f"{cal['temperature']:.2f} | "
            f"{row['seconds']['prepare']:.0f}/{row['seconds']['train']:.0f}/"
            f"{row['seconds']['interpret']:.0f} |")
    return "\n".join(lines)


def _key(row: dict) -> tuple:
    return row["seed"], float(row["context_mm"]), row["folds"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=lambda t: _csv(int, t), default=[1, 2, 3])
    parser.add_argument("--context-mm", type=lambda t: _csv(float, t), default=[0.0, 2.5, 3.0])
    parser.add_argument("--folds", type=lambda t: _csv(int, t), default=[1, 5])
    parser.add_argument("--patients", type=int, default=160)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--target-count", type=int, default=1000)
    parser.add_argument("--work", type=Path, default=Path("benchmarks/out/models_grid"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/models_grid.json"))
    parser.add_argument("--table", action="store_true",
                        help="print the Markdown table of --out and stop")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.table:
        sys.stdout.write(markdown_table(json.loads(args.out.read_text())) + "\n")
        return 0
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    record = json.loads(args.out.read_text()) if args.out.is_file() else {
        "benchmark": "models_grid",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "settings": {"patients": args.patients, "image_size": args.image_size,
                     "target_count": args.target_count, "view": "patch", "preset": "quick"},
        "rows": [],
    }
    done = {_key(row) for row in record["rows"]}
    for seed in args.seeds:
        for context_mm in args.context_mm:
            for folds in args.folds:
                if (seed, context_mm, folds) in done:
                    continue
                LOG.info("seed %d, context %g mm, %d fold(s)", seed, context_mm, folds)
                row = run_configuration(work, seed, context_mm, folds, args)
                LOG.info("%s", json.dumps(row["levels"]["nodule_level"]))
                record["rows"].append(row)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
