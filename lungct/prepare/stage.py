"""Stage 1: raw CT data -> balanced, patient-split PNG dataset (output_dataset/).

The stage reads top to bottom: resolve the source, list its files, reuse or rebuild, find
the label source, build candidates, split patients, balance, render, write. Outputs are built
in ``<output>.partial/`` and renamed into place at the end, so an interrupted run leaves no
half-written dataset and a re-run starts clean.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import Counter
from pathlib import Path

from lungct import contract
from lungct.environment import package_versions
from lungct.errors import UserError
from lungct.faults import kill_point
from lungct.fileio import atomic_write_bytes, fresh_staging, swap_into_place
from lungct.fingerprint import fingerprint
from lungct.locking import output_lock
from lungct.prepare import dicom, dicom_files, sources
from lungct.prepare.archives import MARKER_SUFFIX
from lungct.prepare.candidates import Candidate, relative_display_path
from lungct.prepare.config import PrepareConfig
from lungct.prepare.context import HuCache
from lungct.prepare.executors import Executor, open_executor
from lungct.prepare.header_index import index_path
from lungct.prepare.label_sources import Found, HeaderSource, find_candidates
from lungct.prepare.nodules import CLUSTERING_RULE
from lungct.prepare.pseudonym import Pseudonymiser, masked_logging, pseudonymise
from lungct.prepare.render import RenderSettings, read_hu, render
from lungct.prepare.split import Selection, balance, split_patients

__all__ = ["run"]

LOG = logging.getLogger(__name__)

SOURCES_LOCK_NAME = ".lungct-sources"
#: Samples of one series drawn by one worker task, in z order, sharing decoded slices
#: (lungct.prepare.context.HuCache); small enough to keep every worker busy.
SAMPLES_PER_TASK = 16


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
            elif name.endswith(MARKER_SUFFIX):
                continue
            elif path.is_file():
                files.append(path)
            else:
                links.append((path, "not a regular file (FIFO, socket or device), not opened"))
    return files, links


def _input_hash(config: PrepareConfig, root: Path, files: list[Path], description: str) -> str:
    """Fingerprint of the settings, the source, the labels CSV and the input listing."""
    settings = {**config.hashed_settings(), "source": description,
                "schema_version": contract.SCHEMA_VERSION}
    labels = () if config.labels_csv is None else (Path(config.labels_csv),)
    return fingerprint(settings, contents=labels,
                       listing=((relative_display_path(path, root), path) for path in files))


# ----------------------------------------------------------------------------- writing
def _render_task(task: tuple[list[tuple[str, Candidate]], RenderSettings, Path]
                 ) -> list[dict | str]:
    """Draw and write the samples of one task (one series, in z order) with one slice cache."""
    samples, settings, staging = task
    cache = HuCache(read_hu)
    return [_render_and_write(split, candidate, settings, staging, cache)
            for split, candidate in samples]


def _render_and_write(split: str, candidate: Candidate, settings: RenderSettings, staging: Path,
                      cache: HuCache) -> dict | str:
    """The manifest row of one sample, its image (and mask) written; else the skip reason."""
    try:
        rendered = render(candidate, settings, cache)
    except dicom_files.UnusableFileError as skip:
        return str(skip)
    class_name = contract.CLASS_NAMES[candidate.label]
    image_rel = f"{class_name}/{candidate.key}.png"
    atomic_write_bytes(staging / image_rel, contract.encode_png(rendered.image))
    mask_rel = ""
    if rendered.mask is not None:
        mask_rel = f"masks/{candidate.key}.png"
        atomic_write_bytes(staging / mask_rel, contract.encode_png(rendered.mask))
    fmt = lambda value, spec: "" if value is None else format(value, spec)  # noqa: E731
    centre_mm = rendered.patch_centre_xy_mm or (None, None)
    return {
        "path": image_rel, "label": candidate.label, "class_name": class_name, "split": split,
        "patient_id": candidate.patient_id, "series_uid": candidate.series_uid,
        "slice_z_mm": fmt(candidate.slice_z_mm, ".2f"), "nodule_id": candidate.nodule_id,
        "malignancy": fmt(candidate.malignancy, "g"), "n_readers": fmt(candidate.n_readers, "d"),
        "diameter_mm": fmt(candidate.diameter_mm, ".1f"),
        "negative_kind": candidate.negative_kind, "mm_per_px": fmt(rendered.mm_per_px, ".4f"),
        "mask_path": mask_rel, "source_file": candidate.source_file,
        "manufacturer": candidate.manufacturer, "convolution_kernel": candidate.convolution_kernel,
        "slice_thickness_mm": fmt(candidate.slice_thickness_mm, "g"),
        "lossy": "" if candidate.lossy is None else int(candidate.lossy),
        # 3 decimals (1 um): read back with SliceHeader.pixel_of_patient_xy, they give the
        # same crop (lungct.prepare.render.patch_centre_px)
        "patch_centre_x_mm": fmt(centre_mm[0], ".3f"),
        "patch_centre_y_mm": fmt(centre_mm[1], ".3f"),
    }


def _summary(rows: list[dict], selection: Selection) -> dict:
    counts: dict[str, dict] = {}
    for split in contract.SPLITS:
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
    """True when ``output_dir`` already holds this exact dataset, every file intact."""
    dataset_json = output_dir / contract.DATASET_FILE
    if dataset_json.exists():
        try:
            existing = contract.read_dataset_info(output_dir)
        except UserError:
            existing = {}
        if overwrite:
            return False
        if existing.get("input_hash") != input_hash:
            raise UserError(f"{output_dir} was made with other settings; use --overwrite")
        try:
            intact = contract.dataset_files_sha256(output_dir) == existing.get("files_sha256")
        except UserError as problem:
            LOG.warning("%s: %s", output_dir, problem)
            intact = False
        if not intact:
            LOG.warning("%s was made with these settings but its files are missing or changed: "
                        "rebuilding it", output_dir)
        return intact
    if output_dir.exists() and any(output_dir.iterdir()):
        raise UserError(
            f"{output_dir} exists and is not a lungct dataset (no dataset.json); "
            "choose another --output or remove it"
        )
    return False


def run(config: PrepareConfig) -> dict:
    """Run the prepare stage; returns the dataset.json content.

    Holds the lock of the output folder, and of the work folder's sources, from start to end.
    """
    output_dir = Path(config.output_dir)
    with (output_lock(output_dir, "prepare"),
          output_lock(Path(config.work_dir) / SOURCES_LOCK_NAME, "prepare")):
        if not config.pseudonymise:
            return _run_locked(config, output_dir, None)
        masker = Pseudonymiser(Path(config.work_dir), config.patient_regex)
        with masked_logging(masker):
            return _run_locked(config, output_dir, masker)


def _run_locked(config: PrepareConfig, output_dir: Path, masker: Pseudonymiser | None) -> dict:
    source = _resolve_source(config)
    # absolute: workers of another process or machine (--executor dask) open these paths
    source = dataclasses.replace(source, root=source.root.absolute())
    _check_not_nested(output_dir, source.root)
    files, links = _list_files(source.root)
    input_hash = _input_hash(config, source.root, files, source.description)
    if _check_existing(output_dir, input_hash, config.overwrite):
        LOG.info("%s is up to date (same settings and input): reusing it", output_dir)
        return contract.read_dataset_info(output_dir)
    LOG.info("source %s: %d files under %s", source.description, len(files), source.root)
    with open_executor(config.executor, config.workers, config.dask_scheduler) as executor:
        executor.check_shared(source.root, "read the input from")
        header_source = HeaderSource(executor, index_path(Path(config.work_dir)))
        found, skipped = _find_candidates(config, source, files, links, masker, header_source)
        selection = _split_and_balance(config, found.candidates, skipped)
        settings = _render_settings(config, found.label_source)
        staging = fresh_staging(output_dir).absolute()
        executor.check_shared(staging, "write the output to")
        rows = _render_all(selection, settings, staging, executor, skipped)
    kill_point("prepare", "rendered")
    dataset = _describe(config, source, found, settings, selection, rows, skipped, input_hash)
    if masker is not None:
        dataset["source"] = masker.text(dataset["source"])
    contract.write_manifest(staging, rows)
    contract.write_skipped(staging, skipped)
    dataset["files_sha256"] = contract.dataset_files_sha256(staging)
    contract.write_dataset_info(staging, dataset)
    kill_point("prepare", "written")
    swap_into_place(staging, output_dir)
    reasons = Counter(skipped.values())
    LOG.info("wrote %d images to %s (%s); skipped %d files: %s", len(rows), output_dir,
             ", ".join(f"{s} {dataset['counts'][s]['images']}" for s in contract.SPLITS),
             len(skipped), ", ".join(f"{n} {r}" for r, n in reasons.most_common(6)) or "none")
    return dataset


def _resolve_source(config: PrepareConfig) -> sources.ResolvedSource:
    return sources.resolve_source(
        config.source, input_path=config.input_path, kaggle_dataset=config.kaggle_dataset,
        work_dir=Path(config.work_dir), max_patients=config.max_patients,
        synthetic_patients=config.synthetic_patients, synthetic_size_px=config.synthetic_size_px,
        seed=config.seed,
    )


def _find_candidates(config: PrepareConfig, source: sources.ResolvedSource, files: list[Path],
                     links: list[tuple[Path, str]], masker: Pseudonymiser | None,
                     header_source: HeaderSource) -> tuple[Found, dict[str, str]]:
    """Candidates from the label source, and a reason per unused file (relative names), both
    pseudonymised when ``masker`` is given."""
    root = source.root
    skipped: dict[Path, str] = dict(links)
    skipped.update({root / name: f"unsafe archive entry: {why}"
                    for name, why in source.refused_entries})
    found = find_candidates(config, root, files, skipped, header_source)
    skipped_rel = {relative_display_path(p, root): r for p, r in found.skipped.items()}
    if masker is not None:
        masker.add_patients(found.patient_ids)
        candidates, skipped_rel = pseudonymise(found.candidates, skipped_rel, masker)
        found = dataclasses.replace(found, candidates=candidates)
    return found, skipped_rel


def _split_and_balance(config: PrepareConfig, candidates: list[Candidate],
                       skipped: dict[str, str]) -> Selection:
    """Split patients (label = any cancer sample), then balance; unchosen files get a reason."""
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
            skipped.setdefault(candidate.source_file, "not selected by balancing")
    return selection


def _render_settings(config: PrepareConfig, label_source: str) -> RenderSettings:
    center_hu, width_hu = dicom.parse_window(config.window)
    view = config.view if label_source == "lidc_xml" else "slice"
    if view != config.view:
        LOG.warning("--view patch needs nodule outlines (LIDC XML): using whole images")
    if config.context_mm and label_source != "lidc_xml":
        raise UserError(f"--context-mm needs CT series labelled by LIDC XML readings, but the "
                        f"labels here come from {label_source.replace('_', ' ')} (single "
                        "images): leave --context-mm at 0.")
    return RenderSettings(config.image_size_px, center_hu, width_hu, view, config.patch_mm,
                          config.context_mm)


def _check_not_nested(output_dir: Path, input_root: Path) -> None:
    """Refuse an output inside the input (re-ingested next time) or an input inside the output
    (replaced by the swap)."""
    output, source = output_dir.resolve(), input_root.resolve()
    if output == source or output.is_relative_to(source):
        raise UserError(f"--output {output_dir} is inside the input {input_root}: its images "
                        "would be read as input next time; choose an --output outside it.")
    if source.is_relative_to(output):
        raise UserError(f"the input {input_root} is inside --output {output_dir}, which prepare "
                        "replaces; choose an --output outside it.")


def _tasks(samples: list[tuple[str, Candidate]]) -> list[list[tuple[str, Candidate]]]:
    """The samples in tasks of at most :data:`SAMPLES_PER_TASK`, each of one series in z
    order, so that neighbouring samples share decoded slices (image files: one per task)."""
    by_series: dict[str, list[tuple[str, Candidate]]] = {}
    for split, candidate in samples:
        by_series.setdefault(candidate.series_uid or candidate.key, []).append((split, candidate))
    tasks = []
    for group in by_series.values():
        group.sort(key=lambda sample: (sample[1].slice_z_mm or 0.0, sample[1].key))
        tasks += [group[i : i + SAMPLES_PER_TASK] for i in range(0, len(group),
                                                                   SAMPLES_PER_TASK)]
    return tasks


def _render_all(selection: Selection, settings: RenderSettings, staging: Path,
                executor: Executor, skipped: dict[str, str]) -> list[dict]:
    """Render every selected sample into ``staging`` (one task per series part, run by
    ``executor``, results in task order); manifest rows sorted by path."""
    tasks = _tasks(selection.samples)
    results = executor.map(_render_task, [(task, settings, staging) for task in tasks],
                           "render")
    rows: list[dict] = []
    for task, task_results in zip(tasks, results, strict=True):
        for (_, candidate), result in zip(task, task_results, strict=True):
            if isinstance(result, str):
                skipped[candidate.source_file] = result
            else:
                rows.append(result)
    rows.sort(key=lambda r: r["path"])
    for candidate_rel in {r["source_file"] for r in rows}:
        skipped.pop(candidate_rel, None)
    return rows


def _describe(config: PrepareConfig, source: sources.ResolvedSource, found: Found,
              settings: RenderSettings, selection: Selection, rows: list[dict],
              skipped: dict[str, str], input_hash: str) -> dict:
    """The content of dataset.json: provenance, rule, rendering, counts, versions, hash."""
    summary = _summary(rows, selection)
    missing = {s: [c for c in ("cancer", "non_cancer") if summary[s][c] == 0]
               for s in contract.SPLITS}
    missing = {s: m for s, m in missing.items() if m}
    if missing:
        LOG.warning("splits missing a class (cohort too small?): %s", missing)
    reasons = Counter(skipped.values())
    channels = 3 if settings.context_mm else 1
    return {
        "source": source.description,
        "synthetic": source.kind == "synthetic",
        "label_source": found.label_source,
        "label_rule": {**config.label_rule.to_dict(), "nodules": found.outcomes,
                       "nodules_single_reader": found.single_reader,
                       "clustering": CLUSTERING_RULE}
        if found.label_source == "lidc_xml" else None,
        "series": found.series or None,
        "negative_margin_mm": config.negative_margin_mm,
        "window": {"center_hu": settings.window_center_hu, "width_hu": settings.window_width_hu},
        "image_size": config.image_size_px,
        "view": settings.view,
        "channels": channels, "channel_order": list(contract.CHANNEL_ORDERS[channels]),
        "context_mm": float(settings.context_mm),
        "patch_mm": config.patch_mm if settings.view == "patch" else None,
        "seed": config.seed,
        "split_fractions": dict(zip(contract.SPLITS, config.split_fractions, strict=True)),
        "split_level": "patient",
        "target_count": config.target_count,
        "max_per_patient": config.max_per_patient,
        "counts": summary,
        "n_images": len(rows),
        "splits_missing_class": missing,
        "pseudonymised": config.pseudonymise,
        "files_skipped": {"total": len(skipped), "by_reason": dict(sorted(reasons.items()))},
        "versions": package_versions("numpy", "pydicom", "opencv-python-headless", "pandas"),
        "input_hash": input_hash,
    }
