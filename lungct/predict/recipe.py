"""How the model must be fed, read from the training results: the model file, its threshold
and the rendering recorded in the dataset it was trained on.

Nothing here imports Keras: the recipe is read (and a bad one refused) before the framework
starts and before the worker pool renders a single slice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lungct import contract
from lungct.errors import UserError
from lungct.fingerprint import file_sha256, verify_file_set
from lungct.prepare.config import MAX_CONTEXT_MM, MAX_PATCH_MM, MAX_WINDOW_HU
from lungct.prepare.lidc import LabelRule
from lungct.prepare.render import RenderSettings

__all__ = ["Recipe", "read_recipe"]


@dataclass(frozen=True)
class Recipe:
    """The selected model and everything that decides its input and its decision.

    Attributes:
        model_path: the model file scored (``--model`` or the results' selected model).
        model_sha256: SHA-256 of its bytes.
        best_model: the selected model's name in the results.
        threshold: the threshold block (``value``, ``rule``, ``comparison``, ...).
        settings: prepare's rendering (window, image size, view, patch size).
        channels: 1, or 3 for 2.5D context (contract.CHANNEL_ORDERS).
        context_mm: z distance of the context channels (0 for one channel).
        label_rule: the LIDC rule the dataset was labelled with: XML candidates are made by
            exactly prepare's rule with it.
        dataset: the dataset.json content recorded at training (provenance).
        slice_thickness_mm: range of (0018,0050) Slice Thickness the model was trained on,
            from the dataset's manifest when it is still the one trained on, else None.
        temperature: with ``--model``, the calibration temperature T of the results, which
            the model's ``temperature`` layer must apply (scale 1/T); else None (unchecked).
    """

    model_path: Path
    model_sha256: str
    best_model: str
    threshold: dict[str, Any]
    settings: RenderSettings
    channels: int
    context_mm: float
    label_rule: LabelRule
    dataset: dict[str, Any]
    slice_thickness_mm: tuple[float, float] | None
    temperature: float | None = None

    @property
    def threshold_value(self) -> float:
        """Cancer when the probability is at least this."""
        return float(self.threshold["value"])

    def to_json(self) -> dict[str, Any]:
        """The recipe as series.json records it."""
        return {
            "model_path": str(self.model_path), "model_sha256": self.model_sha256,
            "best_model": self.best_model, "threshold": self.threshold,
            "rendering": {"window": {"center_hu": self.settings.window_center_hu,
                                     "width_hu": self.settings.window_width_hu},
                          "image_size": self.settings.image_size_px, "view": self.settings.view,
                          "patch_mm": self.settings.patch_mm if self.settings.view == "patch"
                          else None,
                          "channels": self.channels, "context_mm": self.context_mm},
            "label_rule": self.label_rule.to_dict(),
            "trained_slice_thickness_mm": list(self.slice_thickness_mm)
            if self.slice_thickness_mm else None,
        }


def _number(dataset: dict, key: str, where: str) -> float:
    value = dataset.get(key)
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise UserError(f"{where} records no rendering the model was trained with (dataset."
                        f"{key} is {value!r}): re-run training_lung_cnn.py on a prepared dataset")
    return float(value)


def _settings(dataset: dict, where: str) -> tuple[RenderSettings, int, float]:
    """Prepare's rendering from the dataset block of training_results.json."""
    window = dataset.get("window")
    if not isinstance(window, dict):
        raise UserError(f"{where} records no rendering the model was trained with (no dataset."
                        "window): re-run training_lung_cnn.py on a prepared dataset")
    center_hu, width_hu = (_number(window, k, where) for k in ("center_hu", "width_hu"))
    size = _number(dataset, "image_size", where)
    view = dataset.get("view")
    if view not in ("slice", "patch") or size != int(size) or not 8 <= size <= 2048 \
            or not 1 <= width_hu <= 2 * MAX_WINDOW_HU or abs(center_hu) > MAX_WINDOW_HU:
        raise UserError(f"{where}: dataset view {view!r}, image_size {size:g} and window "
                        f"{center_hu:g}/{width_hu:g} HU are not a rendering prepare makes")
    patch_mm = _number(dataset, "patch_mm", where) if view == "patch" else 0.0
    if view == "patch" and not 1 <= patch_mm <= MAX_PATCH_MM:
        raise UserError(f"{where}: dataset.patch_mm must be 1-{MAX_PATCH_MM:g} mm, got "
                        f"{patch_mm:g}")
    channels = contract.dataset_channels(dataset, f"{where} dataset")
    context_mm = _number(dataset, "context_mm", where) if channels == 3 else 0.0
    if channels == 3 and not 0 < context_mm <= MAX_CONTEXT_MM:
        raise UserError(f"{where}: a 3-channel (2.5D) dataset needs a positive "
                        f"dataset.context_mm of at most {MAX_CONTEXT_MM:g} mm, got "
                        f"{context_mm:g}")
    settings = RenderSettings(int(size), center_hu, width_hu, view, patch_mm or 64.0,
                              context_mm)
    return settings, channels, context_mm


def _label_rule(dataset: dict, where: str) -> LabelRule:
    recorded = dataset.get("label_rule", {})
    if not isinstance(recorded, dict):
        raise UserError(f"{where}: dataset.label_rule must be a JSON object, got "
                        f"{type(recorded).__name__}")
    fields = {k: recorded[k] for k in LabelRule().to_dict() if k in recorded}
    try:
        return LabelRule(**fields)
    except (TypeError, ValueError) as error:
        raise UserError(f"the label rule recorded at training is invalid ({error})") from None


def _model_path(results: dict, results_path: Path, override: Path | None) -> Path:
    """``--model``, else models[best].model_path, else model_files.keras, beside the results."""
    if override is not None:
        if not override.is_file():
            raise UserError(f"--model {override} is not a file")
        return override
    base = results_path.parent
    recorded = [results["models"][results["best_model"]].get("model_path"),
                (results.get("model_files") or {}).get("keras")]
    candidates = [base / r for r in recorded if isinstance(r, str) and r]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    shown = ", ".join(str(c) for c in candidates) or "no model_path recorded"
    raise UserError(f"the selected model {results['best_model']!r} was not found ({shown}): "
                    "pass --model FILE or re-run training_lung_cnn.py")


def _trained_thickness(results: dict, results_path: Path) -> tuple[float, float] | None:
    """Slice thickness range of the training manifest, when the dataset is still the one
    trained on (its manifest's SHA-256 is the results' ``dataset_manifest_sha256``)."""
    recorded = results["config"].get("dataset_dir")
    expected = results.get("dataset_manifest_sha256")
    if not isinstance(recorded, str) or not recorded or not isinstance(expected, str):
        return None
    for folder in (Path(recorded), results_path.parent / recorded):
        if not (folder / contract.MANIFEST_FILE).is_file():
            continue
        try:
            if contract.manifest_sha256(folder) != expected:
                return None
            values = contract.read_manifest(folder)["slice_thickness_mm"].dropna()
        except (UserError, KeyError, OSError):
            return None
        return (float(values.min()), float(values.max())) if len(values) else None
    return None


def _temperature(results: dict, override: Path | None) -> float | None:
    """T the ``--model`` file must apply: the results' calibration temperature (None without
    ``--model`` or without calibration: nothing to check)."""
    calibration = results.get("calibration")
    if override is None or not isinstance(calibration, dict):
        return None
    return float(calibration.get("temperature", 1.0))  # checked by read_training_results


def read_recipe(results_path: Path, model_override: Path | None) -> Recipe:
    """Read ``training_results.json`` and the model file it names (or ``--model``).

    Raises:
        UserError: unreadable results, no recorded rendering, or no model file.
    """
    results = contract.read_training_results(results_path)
    dataset = results.get("dataset")
    if not isinstance(dataset, dict) or not dataset:
        raise UserError(f"{results_path} records no dataset rendering (dataset is empty): the "
                        "model cannot be fed as it was trained; re-run training_lung_cnn.py on "
                        "a dataset made by prepare_lung_dataset.py")
    settings, channels, context_mm = _settings(dataset, str(results_path))
    if model_override is None:
        # the selected model must be the one these results (and their threshold) describe
        verify_file_set(results.get("files_sha256"), results_path.parent, str(results_path),
                        "training_lung_cnn.py")
    path = _model_path(results, results_path, model_override)
    threshold = {k: results["threshold"][k] for k in ("value", "rule", "comparison")
                 if k in results["threshold"]}
    return Recipe(path, file_sha256(path), results["best_model"], threshold, settings,
                  channels, context_mm, _label_rule(dataset, str(results_path)), dataset,
                  _trained_thickness(results, results_path),
                  _temperature(results, model_override))
