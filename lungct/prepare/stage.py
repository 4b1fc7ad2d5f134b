"""Stage 1: raw CT data -> balanced, patient-split PNG dataset (output_dataset/).

The stage reads top to bottom: resolve the source, list its files, reuse or rebuild, find
the label source, build candidates, split patients, balance, render, write. Outputs are built
in ``<output>.partial/`` and renamed into place at the end, so an interrupted run leaves no
half-written dataset and a re-run starts clean.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import platform
import re
import shutil
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lungct import __version__
from lungct.prepare import dicom, lidc, sources
from lungct.prepare.split import SPLITS, Selection, balance, split_patients
from lungct.errors import UserError
from lungct.fileio import atomic_write_bytes, atomic_write_json
from lungct.prepare.label_sources import find_candidates
from lungct.parallel import pool_map
from lungct.prepare.pseudonym import pseudonymise
from lungct.prepare.render import RenderSettings, encode_png, render
from lungct.prepare.candidates import (
    Candidate,
)

__all__ = ["PrepareConfig", "MANIFEST_COLUMNS", "run"]

LOG = logging.getLogger(__name__)

MANIFEST_COLUMNS = (
    "path", "label", "class_name", "split", "patient_id", "series_uid", "slice_z_mm",
    "nodule_id", "malignancy", "n_readers", "diameter_mm", "negative_kind", "mm_per_px",
    "mask_path", "source_file",
)
CLASS_NAMES = ("non_cancer", "cancer")


@dataclass(frozen=True)
class PrepareConfig:
    """Every setting of the prepare stage; validated on construction."""

    source: str = "auto"
    input_path: Path | None = None
    kaggle_dataset: str = sources.DEFAULT_KAGGLE_DATASET
    max_patients: int | None = None
    labels_csv: Path | None = None
    patient_regex: str = r"LIDC-IDRI-\d{4}"
    output_dir: Path = Path("output_dataset")
    work_dir: Path = Path(".")
    image_size_px: int = 224
    window: str = "lung"
    view: str = "slice"
    patch_mm: float = 64.0
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    target_count: int = 3000
    max_per_patient: int = 20
    negative_margin_mm: float = 10.0
    label_rule: lidc.LabelRule = field(default_factory=lidc.LabelRule)
    seed: int = 42
    synthetic_patients: int = 0  # 0 = the synthetic module's default
    synthetic_size_px: int = 0  # 0 = the synthetic module's default
    pseudonymise: bool = False
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.source not in sources.SOURCES:
            raise ValueError(f"source must be one of {sources.SOURCES}, got {self.source!r}")
        if self.view not in ("slice", "patch"):
            raise ValueError(f"view must be slice or patch, got {self.view!r}")
        if not 8 <= self.image_size_px <= 2048:
            raise ValueError(f"image size must be 8-2048 px, got {self.image_size_px}")
        if self.patch_mm <= 0:
            raise ValueError(f"patch size must be > 0 mm, got {self.patch_mm:g}")
        if self.negative_margin_mm < 0:
            raise ValueError(f"negative margin must be >= 0 mm, got {self.negative_margin_mm:g}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.max_patients is not None and self.max_patients < 1:
            raise ValueError(f"max patients must be >= 1, got {self.max_patients}")
        dicom.parse_window(self.window)
        re.compile(self.patient_regex)
        split_patients({}, self.split_fractions, 0)
        if self.target_count < 2 or self.max_per_patient < 1:
            raise ValueError(
                f"target count must be >= 2 and max per patient >= 1, got "
                f"{self.target_count} and {self.max_per_patient}"
            )

    def hashed_settings(self) -> dict:
        """The settings that decide the output (not paths, workers or overwrite)."""
        settings = asdict(self)
        for key in ("input_path", "output_dir", "work_dir", "workers", "overwrite", "labels_csv"):
            settings.pop(key)
        settings["label_rule"] = self.label_rule.to_dict()
        return settings


# ----------------------------------------------------------------------------- file listing
def _list_files(root: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Every regular file under ``root`` (sorted); symbolic links are not followed."""
    files: list[Path] = []
    links: list[tuple[Path, str]] = []
    for folder, subfolders, names in os.walk(root):
        subfolders.sort()
        for name in sorted(names):
            path = Path(folder, name)
            if path.is_symlink():
                links.append((path, "symbolic link, not followed"))
            elif not name.endswith(sources.MARKER_SUFFIX) and path.is_file():
                files.append(path)
    return files, links


def _input_hash(config: PrepareConfig, root: Path, files: list[Path], description: str) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps(config.hashed_settings(), sort_keys=True, default=str).encode())
    digest.update(description.encode())
    if config.labels_csv is not None:
        digest.update(Path(config.labels_csv).read_bytes())
    for path in files:
        digest.update(f"{path.relative_to(root).as_posix()}\0{path.stat().st_size}\n".encode())
    return digest.hexdigest()


# ----------------------------------------------------------------------------- writing
def _render_and_write(job: tuple[str, Candidate, RenderSettings, Path]) -> dict | str:
    split, candidate, settings, staging = job
    try:
        rendered = render(candidate, settings)
    except dicom.UnusableFileError as skip:
        return str(skip)
    class_name = CLASS_NAMES[candidate.label]
    image_rel = f"{class_name}/{candidate.key}.png"
    atomic_write_bytes(staging / image_rel, encode_png(rendered.image))
    mask_rel = ""
    if rendered.mask is not None:
        mask_rel = f"masks/{candidate.key}.png"
        atomic_write_bytes(staging / mask_rel, encode_png(rendered.mask))
    fmt = lambda value, spec: "" if value is None else format(value, spec)  # noqa: E731
    return {
        "path": image_rel, "label": candidate.label, "class_name": class_name, "split": split,
        "patient_id": candidate.patient_id, "series_uid": candidate.series_uid,
        "slice_z_mm": fmt(candidate.slice_z_mm, ".2f"), "nodule_id": candidate.nodule_id,
        "malignancy": fmt(candidate.malignancy, "g"), "n_readers": fmt(candidate.n_readers, "d"),
        "diameter_mm": fmt(candidate.diameter_mm, ".1f"),
        "negative_kind": candidate.negative_kind, "mm_per_px": fmt(rendered.mm_per_px, ".4f"),
        "mask_path": mask_rel, "source_file": candidate.source_file,
    }


def _csv_bytes(columns: Iterable[str], rows: Iterable[dict]) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode()


def _package_versions() -> dict[str, str]:
    import cv2
    import numpy
    import pandas
    import pydicom

    return {"python": platform.python_version(), "lungct": __version__,
            "numpy": numpy.__version__, "pydicom": pydicom.__version__,
            "opencv": cv2.__version__, "pandas": pandas.__version__}


def _summary(rows: list[dict], selection: Selection) -> dict:
    counts: dict[str, dict] = {}
    for split in SPLITS:
        in_split = [r for r in rows if r["split"] == split]
        counts[split] = {
            "images": len(in_split),
            "patients": len({r["patient_id"] for r in in_split}),
            "cancer": sum(r["label"] == 1 for r in in_split),
            "non_cancer": sum(r["label"] == 0 for r in in_split),
            "negative_kind": dict(sorted(Counter(
                r["negative_kind"] or "unspecified" for r in in_split if r["label"] == 0
            ).items())),
            "requested": selection.requested[split],
            "available": selection.available[split],
        }
    return counts


# ----------------------------------------------------------------------------- the stage
def _check_existing(output_dir: Path, input_hash: str, overwrite: bool) -> bool:
    """True when ``output_dir`` already holds this exact dataset (nothing to do)."""
    dataset_json = output_dir / "dataset.json"
    if dataset_json.exists():
        try:
            existing = json.loads(dataset_json.read_text()).get("input_hash")
        except (OSError, json.JSONDecodeError):
            existing = None
        if overwrite:
            return False
        if existing == input_hash:
            return True
        raise UserError(f"{output_dir} was made with other settings; use --overwrite")
    if output_dir.exists() and any(output_dir.iterdir()):
        raise UserError(
            f"{output_dir} exists and is not a lungct dataset (no dataset.json); "
            "choose another --output or remove it"
        )
    return False


def run(config: PrepareConfig) -> dict:
    """Run the prepare stage; returns the dataset.json content."""
    work_dir = Path(config.work_dir)
    output_dir = Path(config.output_dir)
    source = sources.resolve_source(
        config.source, input_path=config.input_path, kaggle_dataset=config.kaggle_dataset,
        work_dir=work_dir, max_patients=config.max_patients,
        synthetic_patients=config.synthetic_patients, synthetic_size_px=config.synthetic_size_px,
        seed=config.seed,
    )
    root = source.root
    files, links = _list_files(root)
    input_hash = _input_hash(config, root, files, source.description)
    if _check_existing(output_dir, input_hash, config.overwrite):
        LOG.info("%s is up to date (same settings and input): reusing it", output_dir)
        return json.loads((output_dir / "dataset.json").read_text())
    LOG.info("source %s: %d files under %s", source.description, len(files), root)

    skipped: dict[Path, str] = dict(links)
    skipped.update({root / name: f"unsafe archive entry: {why}"
                    for name, why in source.refused_entries})
    found = find_candidates(config, root, files, skipped)
    candidates = found.candidates
    skipped_rel = {p.relative_to(root).as_posix(): r for p, r in found.skipped.items()}
    if config.pseudonymise:
        candidates, skipped_rel = pseudonymise(candidates, found.skipped, work_dir, root)

    patient_labels: dict[str, int] = {}
    for candidate in candidates:
        patient_labels[candidate.patient_id] = max(
            patient_labels.get(candidate.patient_id, 0), candidate.label
        )
    split_of = split_patients(patient_labels, config.split_fractions, config.seed)
    selection = balance(candidates, split_of, config.split_fractions, config.target_count,
                        config.max_per_patient, config.seed)
    chosen = {c.key for _, c in selection.samples}
    for candidate in candidates:
        if candidate.key not in chosen:
            skipped_rel.setdefault(candidate.source_file, "not selected by balancing")

    center_hu, width_hu = dicom.parse_window(config.window)
    view = config.view if found.label_source == "lidc_xml" else "slice"
    if view != config.view:
        LOG.warning("--view patch needs nodule outlines (LIDC XML): using whole images")
    settings = RenderSettings(config.image_size_px, center_hu, width_hu, view, config.patch_mm)
    staging = output_dir.with_name(output_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    jobs = [(split, c, settings, staging) for split, c in selection.samples]
    rows: list[dict] = []
    for (_, candidate, _, _), result in zip(
        jobs, pool_map(_render_and_write, jobs, config.workers, "render"), strict=True
    ):
        if isinstance(result, str):
            skipped_rel[candidate.source_file] = result
        else:
            rows.append(result)
    rows.sort(key=lambda r: r["path"])
    for candidate_rel in {r["source_file"] for r in rows}:
        skipped_rel.pop(candidate_rel, None)

    summary = _summary(rows, selection)
    missing = {s: [c for c in ("cancer", "non_cancer") if summary[s][c] == 0] for s in SPLITS}
    missing = {s: m for s, m in missing.items() if m}
    if missing:
        LOG.warning("splits missing a class (cohort too small?): %s", missing)
    reasons = Counter(skipped_rel.values())
    dataset = {
        "source": source.description,
        "synthetic": source.kind == "synthetic",
        "label_source": found.label_source,
        "label_rule": {**config.label_rule.to_dict(), "nodules": found.outcomes}
        if found.label_source == "lidc_xml" else None,
        "negative_margin_mm": config.negative_margin_mm,
        "window": {"center_hu": center_hu, "width_hu": width_hu},
        "image_size": config.image_size_px,
        "view": view,
        "patch_mm": config.patch_mm if view == "patch" else None,
        "seed": config.seed,
        "split_fractions": dict(zip(SPLITS, config.split_fractions, strict=True)),
        "split_level": "patient",
        "target_count": config.target_count,
        "max_per_patient": config.max_per_patient,
        "counts": summary,
        "n_images": len(rows),
        "splits_missing_class": missing,
        "pseudonymised": config.pseudonymise,
        "files_skipped": {"total": len(skipped_rel), "by_reason": dict(sorted(reasons.items()))},
        "versions": _package_versions(),
        "input_hash": input_hash,
    }
    atomic_write_bytes(staging / "manifest.csv", _csv_bytes(MANIFEST_COLUMNS, rows))
    atomic_write_bytes(staging / "skipped.csv", _csv_bytes(
        ("file", "reason"),
        ({"file": f, "reason": r} for f, r in sorted(skipped_rel.items()))))
    atomic_write_json(staging / "dataset.json", dataset)
    _swap_into_place(staging, output_dir)
    LOG.info("wrote %d images to %s (%s); skipped %d files: %s", len(rows), output_dir,
             ", ".join(f"{s} {summary[s]['images']}" for s in SPLITS), len(skipped_rel),
             ", ".join(f"{n} {r}" for r, n in reasons.most_common(6)) or "none")
    return dataset


def _swap_into_place(staging: Path, output_dir: Path) -> None:
    """Replace ``output_dir`` by the finished ``staging`` folder."""
    old = output_dir.with_name(output_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if output_dir.exists():
        output_dir.rename(old)
    staging.rename(output_dir)
    shutil.rmtree(old, ignore_errors=True)
