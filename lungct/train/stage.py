"""Phases 1-3: train the baseline and the transfer models, select on validation, save.

Phase 1 trains the baseline CNN from scratch. Phase 2 trains VGG16 / ResNet50 with a frozen
backbone, then fine-tunes its top layers at a 10x lower learning rate. Phase 3 has every model
predict the validation and test splits once, selects the highest validation AUC, chooses the
decision threshold on validation (Youden's J), and writes the selected model
(``lung_cancer_cnn_enhanced.h5`` / ``.keras``), ``runs/<model>/`` and
``training_results.json`` (../shared/DESIGN.md section 2).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from lungct import backend
from lungct.train import image_cache as data
from lungct.train import models
from lungct.train.augment import AugmentationRanges, augmented_model
from lungct.train.distribute import (
    DISTRIBUTE_MODES,
    MIRRORED_NAN_HINT,
    FiniteLossCheck,
    distribution_scope,
)
from lungct.errors import UserError
from lungct.fileio import atomic_path, atomic_write_json
from lungct.train.loop import CHECKPOINT_FILE, PhaseTracker, fit_phase

__all__ = [
    "PRESETS",
    "PresetValues",
    "TrainConfig",
    "resolve_config",
    "run",
    "start_model_session",
    "youden_threshold",
]

LOG = logging.getLogger(__name__)

RESULTS_FILE = "training_results.json"
MODEL_FILES = {"h5": "lung_cancer_cnn_enhanced.h5", "keras": "lung_cancer_cnn_enhanced.keras"}
THRESHOLD_RULE = "youden_j_on_validation"
FINE_TUNE_LR_FACTOR = 0.1


@dataclass(frozen=True)
class PresetValues:
    """Settings a preset gives to every flag the user left unset."""

    train_size: int | None  # None: the dataset's image size, capped at quick_max_px
    epochs: int
    frozen_epochs: int
    fine_tune_epochs: int
    batch_size: int
    max_train_images: int  # 0 = all
    fine_tune_layers: dict[str, int]
    patience: int
    cached_features: bool


PRESETS = {
    # The seed's settings: 224 px, 15 epochs, batch 32; on a GPU.
    "full": PresetValues(
        train_size=224,
        epochs=15,
        frozen_epochs=15,
        fine_tune_epochs=10,
        batch_size=32,
        max_train_images=0,
        fine_tune_layers={"vgg16": 8, "resnet50": 32},
        patience=5,
        cached_features=False,
    ),
    # CPU demo and CI: small images, few epochs, transfer models trained on cached
    # activations of their frozen layers (a frozen ResNet50 costs ~50 s to trace and runs at
    # ~130 img/s on this CPU, ../shared/MEASURED.md: run it once, not every epoch).
    "quick": PresetValues(
        train_size=None,
        epochs=8,
        frozen_epochs=2,
        fine_tune_epochs=1,
        batch_size=32,
        max_train_images=600,
        fine_tune_layers={"vgg16": 4, "resnet50": 10},
        patience=3,
        cached_features=True,
    ),
}
QUICK_MAX_PX = 64
PROGRESS_MODES = ("auto", "bar", "epoch", "none")
SWITCH_MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; ``None`` fields take the preset's value.

    Attributes:
        dataset_dir: the prepare stage's output folder.
        out_dir: where the models, ``runs/`` and ``training_results.json`` go.
        models: which of ``baseline``, ``vgg16``, ``resnet50`` to train, in order.
        preset: ``auto`` (full on a GPU, quick on a CPU), ``full`` or ``quick``.
        weights: ``auto``, ``imagenet``, ``none``, a folder, or ``vgg16=PATH,resnet50=PATH``.
        train_size: side the models compute at, px (in-model Resizing when it differs).
        epochs: baseline epochs.
        frozen_epochs: transfer epochs with the backbone frozen.
        fine_tune_epochs: transfer epochs with the top backbone layers trainable.
        fine_tune_layers: backbone layers unfrozen for fine-tuning (None: per backbone).
        batch_size: global batch size.
        max_train_images: cap on training images, stratified (0 = all).
        learning_rate: Adam learning rate (fine-tuning uses a tenth).
        patience: early-stopping patience in epochs (validation AUC).
        cached_features: train transfer models on the activations of the frozen part of the
            backbone (below the fine-tuned layers), computed once, without augmentation,
            instead of on augmented images (the baseline always trains on images).
        augment: augment training images (flip, rotation, zoom, contrast).
        seed: seed of initial weights, shuffling, augmentation and subsampling.
        mixed_precision: ``auto`` (bf16 on a GPU that supports it), ``on``, ``off``.
        distribute: ``none``, ``data-parallel`` (JAX) or ``mirrored`` (TensorFlow).
        overwrite: retrain models whose ``runs/<name>/`` match this configuration.
        progress: ``auto`` (bars in a terminal, a line per epoch otherwise), ``bar``,
            ``epoch`` or ``none``.
    """

    dataset_dir: Path = Path("output_dataset")
    out_dir: Path = Path(".")
    models: tuple[str, ...] = models.MODEL_NAMES
    preset: str = "auto"
    weights: str = "auto"
    train_size: int | None = None
    epochs: int | None = None
    frozen_epochs: int | None = None
    fine_tune_epochs: int | None = None
    fine_tune_layers: int | None = None
    batch_size: int | None = None
    max_train_images: int | None = None
    learning_rate: float = 1e-3
    patience: int | None = None
    cached_features: bool | None = None
    augment: bool = True
    seed: int = 42
    mixed_precision: str = "auto"
    distribute: str = "none"
    overwrite: bool = False
    progress: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "dataset_dir", Path(self.dataset_dir))
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        object.__setattr__(self, "models", tuple(self.models))
        _validate_choices(self)
        _validate_numbers(self)

    def to_json(self) -> dict:
        """The configuration as JSON values (paths as absolute strings)."""
        values = dataclasses.asdict(self)
        values["dataset_dir"] = str(self.dataset_dir.resolve())
        values["out_dir"] = str(self.out_dir.resolve())
        values["models"] = list(self.models)
        return values


def _validate_choices(config: TrainConfig) -> None:
    unknown = [name for name in config.models if name not in models.MODEL_NAMES]
    if unknown or not config.models:
        raise UserError(
            f"unknown model {', '.join(unknown) or '(none given)'}; choose from "
            f"{', '.join(models.MODEL_NAMES)}."
        )
    if len(set(config.models)) != len(config.models):
        raise UserError(f"--models lists a model twice: {','.join(config.models)}.")
    for flag, value, allowed in (
        ("--preset", config.preset, ("auto", *PRESETS)),
        ("--mixed-precision", config.mixed_precision, SWITCH_MODES),
        ("--distribute", config.distribute, DISTRIBUTE_MODES),
        ("--progress", config.progress, PROGRESS_MODES),
    ):
        if value not in allowed:
            raise UserError(f"{flag} {value!r} is not one of {', '.join(allowed)}.")


def _validate_numbers(config: TrainConfig) -> None:
    minimums = {
        "train_size": 8,
        "epochs": 1,
        "frozen_epochs": 0,
        "fine_tune_epochs": 0,
        "fine_tune_layers": 1,
        "batch_size": 1,
        "max_train_images": 0,
        "patience": 1,
    }
    for field, minimum in minimums.items():
        value = getattr(config, field)
        if value is not None and value < minimum:
            flag = "--" + field.replace("_", "-")
            raise UserError(f"{flag} must be at least {minimum}, got {value}.")
    if config.frozen_epochs == 0 and config.fine_tune_epochs == 0:
        raise UserError("--frozen-epochs and --fine-tune-epochs are both 0: nothing to train.")
    if not 0.0 < config.learning_rate < 1.0:
        raise UserError(f"--learning-rate must be in (0, 1), got {config.learning_rate}.")


def resolve_config(config: TrainConfig, image_size: int, accelerator: str) -> TrainConfig:
    """Fill the unset fields from the preset (``auto``: full on an accelerator, else quick)."""
    preset = config.preset
    if preset == "auto":
        preset = "quick" if accelerator == "cpu" else "full"
        if preset == "quick":
            LOG.warning(
                "no GPU: --preset auto uses the quick preset (<= %d px, <= %d training "
                "images, few epochs); pass --preset full for the seed's settings (slow on a CPU)",
                QUICK_MAX_PX,
                PRESETS["quick"].max_train_images,
            )
    values = PRESETS[preset]
    preset_train_size = values.train_size or min(QUICK_MAX_PX, image_size)
    filled = {
        field.name: getattr(values, field.name)
        for field in dataclasses.fields(values)
        if field.name in {f.name for f in dataclasses.fields(config)}
        and getattr(config, field.name) is None
    }
    filled.pop("fine_tune_layers", None)
    if config.train_size is None:
        filled["train_size"] = preset_train_size
    return dataclasses.replace(config, preset=preset, **filled)


def fine_tune_layer_count(config: TrainConfig, name: str) -> int:
    """Backbone layers to unfreeze for ``name``: the flag, else the preset's per-backbone value."""
    if config.fine_tune_layers is not None:
        return config.fine_tune_layers
    return PRESETS[config.preset].fine_tune_layers[name]


@dataclass(frozen=True)
class Dataset:
    """The splits and provenance a run trains on."""

    train: data.SplitData
    val: data.SplitData
    test: data.SplitData
    image_size: int
    digest: str
    provenance: dict


def load_dataset(dataset_dir: Path) -> Dataset:
    """Read the manifest, refuse unusable splits, and load the three splits' images."""
    manifest = data.read_manifest(dataset_dir)
    data.check_split_classes(manifest)
    splits = {split: data.load_split(dataset_dir, manifest, split) for split in data.SPLITS}
    if len(splits["test"]) == 0:
        raise UserError(f"the test split of {dataset_dir} is empty.")
    return Dataset(
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        image_size=int(splits["train"].images.shape[1]),
        digest=data.manifest_digest(dataset_dir),
        provenance=data.read_provenance(dataset_dir),
    )


def _check_transfer_size(config: TrainConfig) -> None:
    transfer = [name for name in config.models if name in models.BACKBONES]
    if transfer and config.train_size < models.MIN_TRANSFER_SIZE_PX:
        raise UserError(
            f"{', '.join(transfer)} need --train-size {models.MIN_TRANSFER_SIZE_PX} or more, "
            f"got {config.train_size}."
        )


def _check_output_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as error:
        raise UserError(f"output folder {out_dir} is not writable ({error.strerror}).") from error


def _mixed_precision_enabled(mode: str) -> bool:
    enabled = mode == "on" or (mode == "auto" and backend.supports_bf16())
    if enabled and not backend.supports_bf16():
        LOG.warning("bf16 mixed precision on a device without native bf16 is slow")
    return enabled


def start_model_session(mixed_precision: bool) -> None:
    """Free the previous model's Keras state, then set the dtype policy for the next model.

    ``keras.backend.clear_session`` also resets the global dtype policy to float32, so the
    policy is set after it, for every model.
    """
    keras.backend.clear_session()
    keras.mixed_precision.set_global_policy("mixed_bfloat16" if mixed_precision else "float32")


def _progress_verbosity(progress: str) -> int:
    if progress == "auto":
        progress = "bar" if sys.stdout.isatty() else "epoch"
    return {"bar": 1, "epoch": 2, "none": 0}[progress]


def run(config: TrainConfig) -> dict:
    """Train, select and save; return the content written to ``training_results.json``.

    Raises:
        UserError: bad dataset, output folder, weights, or out of memory.
    """
    _check_output_dir(config.out_dir)
    dataset = load_dataset(config.dataset_dir)
    config = resolve_config(config, dataset.image_size, backend.accelerator_kind())
    _check_transfer_size(config)
    mixed_precision = _mixed_precision_enabled(config.mixed_precision)
    weight_choices = models.parse_weights_option(config.weights)
    LOG.info(
        "training %s on %d/%d/%d train/val/test images (%d px, computing at %d px), %s preset, "
        "%s backend on %s",
        ", ".join(config.models),
        len(dataset.train),
        len(dataset.val),
        len(dataset.test),
        dataset.image_size,
        config.train_size,
        config.preset,
        backend.backend_name(),
        ", ".join(backend.list_devices()),
    )
    outcomes = {}
    for name in config.models:
        start_model_session(mixed_precision)
        outcomes[name] = _train_or_reuse(name, config, dataset, weight_choices)
    best = max(config.models, key=lambda name: outcomes[name]["val_auc"])
    threshold = youden_threshold(
        dataset.val.labels, np.asarray(outcomes[best]["validation"]["y_prob"])
    )
    _save_selected(config.out_dir, outcomes[best]["model_path"])
    results = _results(config, dataset, outcomes, best, threshold, mixed_precision)
    atomic_write_json(config.out_dir / RESULTS_FILE, results)
    _log_summary(results, config.out_dir)
    return results


def _run_fingerprint(
    name: str, config: TrainConfig, dataset: Dataset, weights: models.ResolvedWeights | None
) -> str:
    settings = config.to_json()
    for unrelated in ("out_dir", "models", "overwrite", "progress"):
        settings.pop(unrelated)
    settings.update(
        model=name,
        dataset=dataset.digest,
        backend=backend.backend_name(),
        weights_source=weights.source if weights else None,
        fine_tune_layers=None if name == "baseline" else fine_tune_layer_count(config, name),
    )
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _train_or_reuse(
    name: str, config: TrainConfig, dataset: Dataset, weight_choices: dict[str, str]
) -> dict:
    run_dir = config.out_dir / "runs" / name
    weights = None if name == "baseline" else models.resolve_weights(name, weight_choices[name])
    fingerprint = _run_fingerprint(name, config, dataset, weights)
    record = None if config.overwrite else _reusable_record(run_dir, fingerprint)
    with (
        _out_of_memory_as_user_error(name, config.batch_size),
        distribution_scope(config.distribute, config.batch_size),
    ):
        if record is None:
            model, record = _train(name, config, dataset, weights, run_dir)
            record["fingerprint"] = fingerprint
            with atomic_path(run_dir / "model.keras") as temporary:
                model.save(temporary)
            atomic_write_json(run_dir / "run.json", record)
            # The checkpoint protects a run in progress; model.keras now holds the same weights.
            (run_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
        else:
            LOG.info(
                "%s: reusing %s (same configuration and dataset; --overwrite retrains)",
                name,
                run_dir,
            )
            model = keras.models.load_model(run_dir / "model.keras", safe_mode=True)
        return _predict_outcome(model, name, config, dataset, record)


@contextlib.contextmanager
def _out_of_memory_as_user_error(name: str, batch_size: int) -> Iterator[None]:
    try:
        yield
    except Exception as error:
        if backend.is_out_of_memory(error):
            raise UserError(
                f"out of memory training {name} at --batch-size {batch_size}; lower "
                "--batch-size or --train-size."
            ) from error
        raise


def _reusable_record(run_dir: Path, fingerprint: str) -> dict | None:
    try:
        record = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if record.get("fingerprint") != fingerprint or not (run_dir / "model.keras").is_file():
        return None
    return record


def _train(
    name: str,
    config: TrainConfig,
    dataset: Dataset,
    weights: models.ResolvedWeights | None,
    run_dir: Path,
) -> tuple[keras.Model, dict]:
    keras.utils.set_random_seed(config.seed)
    started = time.perf_counter()
    train = dataset.train
    if config.max_train_images and len(train) > config.max_train_images:
        train = train.subset(
            data.stratified_subset(train.labels, config.max_train_images, config.seed)
        )
    class_weight = data.balanced_class_weights(train.labels)
    model = models.build_model(name, dataset.image_size, config.train_size, weights)
    tracker = PhaseTracker(model, run_dir, verbose=_progress_verbosity(config.progress))
    hint = MIRRORED_NAN_HINT if config.distribute == "mirrored" else "lower --learning-rate"
    common = dict(
        tracker=tracker,
        config=config,
        val=dataset.val,
        class_weight=class_weight,
        extra_callbacks=[FiniteLossCheck(hint=hint)],
    )
    ranges = AugmentationRanges() if config.augment else None
    fine_tuned: list[str] = []
    if name == "baseline":
        fit_phase(
            augmented_model(model, ranges, config.seed),
            "scratch",
            train.images,
            train.labels,
            config.epochs,
            config.learning_rate,
            **common,
        )
    else:
        fine_tuned = _train_transfer(model, name, config, train, ranges, common)
    tracker.restore_best()
    seconds = time.perf_counter() - started
    record = {
        "history": tracker.history,
        "params": int(model.count_params()),
        "weights_source": weights.source if weights else "random: trained from scratch",
        "train_seconds": round(seconds, 2),
        "images_per_second": round(tracker.images_trained / seconds, 2),
        "n_train_images": len(train),
        "class_weight": {str(k): v for k, v in class_weight.items()} if class_weight else None,
        "fine_tuned_layers": fine_tuned,
    }
    return model, record


def _train_transfer(
    model: keras.Model,
    name: str,
    config: TrainConfig,
    train: data.SplitData,
    ranges: AugmentationRanges | None,
    common: dict,
) -> list[str]:
    n_layers = fine_tune_layer_count(config, name)
    n_backbone_layers = len(models.backbone_of(model).layers)
    if n_layers > n_backbone_layers - 2:
        raise UserError(
            f"--fine-tune-layers {n_layers} is more than {name} allows ({n_backbone_layers - 2})."
        )
    models.freeze_backbone(model)
    split = models.split_below_top_layers(model, n_layers) if config.cached_features else None
    if config.cached_features and split is None:
        LOG.info(
            "%s: the top %d layers are not a clean cut of the backbone; training on "
            "augmented images instead of cached activations",
            name,
            n_layers,
        )
    if split is None:
        trainee, x, val = augmented_model(model, ranges, config.seed), train.images, common["val"]
    else:
        trainee, x, val = split[1], *_cached_activations(split[0], train, common["val"], config)
    phase_args = {**common, "val": val}
    if config.frozen_epochs:
        fit_phase(
            trainee,
            "frozen",
            x,
            train.labels,
            config.frozen_epochs,
            config.learning_rate,
            **phase_args,
        )
    if not config.fine_tune_epochs:
        return []
    fine_tuned = models.unfreeze_top_layers(model, n_layers)
    LOG.info(
        "%s: fine-tuning %d backbone layers (%s ... %s) at learning rate %g",
        name,
        len(fine_tuned),
        fine_tuned[0],
        fine_tuned[-1],
        config.learning_rate * FINE_TUNE_LR_FACTOR,
    )
    fit_phase(
        trainee,
        "fine_tune",
        x,
        train.labels,
        config.fine_tune_epochs,
        config.learning_rate * FINE_TUNE_LR_FACTOR,
        **phase_args,
    )
    return fine_tuned


def _cached_activations(
    lower: keras.Model, train: data.SplitData, val: data.SplitData, config: TrainConfig
) -> tuple[np.ndarray, data.SplitData]:
    """Run the frozen part of the backbone once over the train and validation images."""
    started = time.perf_counter()
    train_activations = predict_batches(lower, train.images, config.batch_size)
    val_activations = predict_batches(lower, val.images, config.batch_size)
    LOG.info(
        "%s: frozen-backbone activations %s of %d images in %.1f s",
        lower.name,
        train_activations.shape[1:],
        len(train) + len(val),
        time.perf_counter() - started,
    )
    return train_activations, dataclasses.replace(val, images=val_activations)


def predict_batches(model: keras.Model, x: np.ndarray, batch_size: int) -> np.ndarray:
    """``model.predict`` in full batches (the last one padded), so it compiles for one shape."""
    batches = data.ArrayBatches(x, np.zeros(len(x)), batch_size, pad_final_batch=True)
    return np.asarray(model.predict(batches, verbose=0))[: len(x)]


def _predict_outcome(
    model: keras.Model, name: str, config: TrainConfig, dataset: Dataset, record: dict
) -> dict:
    blocks = {}
    for key, split in (("validation", dataset.val), ("test", dataset.test)):
        probabilities = predict_batches(model, split.images, config.batch_size).reshape(-1)
        blocks[key] = {
            "paths": list(split.paths),
            "patient_ids": list(split.patient_ids),
            "y_true": [int(label) for label in split.labels],
            "y_prob": [float(p) for p in probabilities.astype(np.float32)],
        }
    val_auc = _auc(dataset.val.labels, blocks["validation"]["y_prob"])
    test_auc = _auc(dataset.test.labels, blocks["test"]["y_prob"])
    LOG.info(
        "%s: validation AUC %.3f, test AUC %s",
        name,
        val_auc,
        "undefined" if test_auc is None else f"{test_auc:.3f}",
    )
    fields = (
        "history",
        "params",
        "weights_source",
        "train_seconds",
        "images_per_second",
        "n_train_images",
        "class_weight",
        "fine_tuned_layers",
    )
    return {
        **{field: record[field] for field in fields},
        "val_auc": val_auc,
        "test_auc": test_auc,
        "grad_cam_layer": models.grad_cam_layer(model),
        "model_path": f"runs/{name}/model.keras",
        **blocks,
    }


def _auc(labels: np.ndarray, probabilities) -> float | None:
    if len(set(np.asarray(labels).tolist())) < 2:
        return None
    return float(roc_auc_score(labels, probabilities))


def youden_threshold(labels: np.ndarray, probabilities: np.ndarray) -> dict:
    """The probability cut-off maximising Youden's J = sensitivity + specificity - 1.

    Youden (1950), "Index for rating diagnostic tests". A sample is called cancer when its
    probability is ``>=`` the threshold.

    Raises:
        ValueError: lengths differ or a class is absent.
    """
    labels = np.asarray(labels)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if labels.shape != probabilities.shape:
        raise ValueError(f"labels {labels.shape} and probabilities {probabilities.shape} differ")
    if len(set(labels.tolist())) < 2:
        raise ValueError("Youden's J needs both classes in the validation labels")
    false_positive_rate, true_positive_rate, thresholds = roc_curve(labels, probabilities)
    finite = np.isfinite(thresholds)
    j = np.where(finite, true_positive_rate - false_positive_rate, -np.inf)
    best = int(np.argmax(j))
    return {
        "value": float(thresholds[best]),
        "rule": THRESHOLD_RULE,
        "comparison": ">=",
        "youden_j": float(j[best]),
        "sensitivity": float(true_positive_rate[best]),
        "specificity": float(1.0 - false_positive_rate[best]),
    }


def _save_selected(out_dir: Path, model_path: str) -> None:
    source = out_dir / model_path
    with atomic_path(out_dir / MODEL_FILES["keras"]) as temporary:
        shutil.copyfile(source, temporary)
    model = keras.models.load_model(source, safe_mode=True)
    absl_logger = logging.getLogger("absl")
    previous = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # the .h5 is kept on purpose; hide Keras' legacy notice
    try:
        with atomic_path(out_dir / MODEL_FILES["h5"]) as temporary:
            model.save(temporary)
    finally:
        absl_logger.setLevel(previous)


def _results(config, dataset, outcomes, best, threshold, mixed_precision) -> dict:
    return {
        "class_names": list(data.CLASS_NAMES),
        "best_model": best,
        "selection": {
            "metric": "val_auc",
            "rule": "highest validation AUC; ties: first in --models",
        },
        "threshold": threshold,
        "models": outcomes,
        "validation": outcomes[best]["validation"],
        "test": outcomes[best]["test"],
        "config": {**config.to_json(), "image_size": dataset.image_size},
        "environment": {
            **backend.environment(),
            "mixed_precision": mixed_precision,
            "jit_compile": backend.training_jit_compile(),
        },
        "dataset": dataset.provenance,
        "dataset_manifest_sha256": dataset.digest,
        "model_files": dict(MODEL_FILES),
    }


def _log_summary(results: dict, out_dir: Path) -> None:
    for name, outcome in results["models"].items():
        test_auc = outcome["test_auc"]
        LOG.info(
            "%-9s val AUC %.3f  test AUC %s  %6.1f s  %s%s",
            name,
            outcome["val_auc"],
            "  n/a" if test_auc is None else f"{test_auc:.3f}",
            outcome["train_seconds"],
            outcome["weights_source"],
            "  <- selected" if name == results["best_model"] else "",
        )
    LOG.info(
        "threshold %.4f (Youden's J on validation); wrote %s, %s and %s in %s",
        results["threshold"]["value"],
        MODEL_FILES["h5"],
        MODEL_FILES["keras"],
        RESULTS_FILE,
        out_dir.resolve(),
    )
