"""Training configuration: the flags, the presets, and the one place a preset applies.

:class:`TrainConfig` holds what the user asked for (``None`` = take the preset's value) and is
checked on construction; :func:`resolve_config` fills every unset field from the preset once
the device is known, so later steps read plain values and never the preset.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

from lungct.errors import UserError
from lungct.train.distribute import DISTRIBUTE_MODES
from lungct.train.folds import MAX_FOLDS
from lungct.train.models import MIN_TRANSFER_SIZE_PX, MODEL_NAMES

__all__ = ["PRESETS", "PresetValues", "TrainConfig", "resolve_config"]

LOG = logging.getLogger(__name__)

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
    gradcam_max_images: int  # masked test images interpretation explains by default (0 = all)


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
        gradcam_max_images=0,
    ),
    # CPU demo and CI: small images, transfer models trained on cached activations of their
    # frozen layers (a frozen ResNet50 costs ~50 s to trace and runs at ~130 img/s on this CPU,
    # docs/measured.md: run it once, not every epoch). 24 baseline epochs with patience 6: on
    # the 160-patient benchmark cohort 8 epochs and 600 images left the CNN below the
    # diameter-only baseline's CI (benchmarks/RESULTS.md, section 15).
    "quick": PresetValues(
        train_size=None,
        epochs=24,
        frozen_epochs=2,
        fine_tune_epochs=1,
        batch_size=32,
        max_train_images=2000,
        fine_tune_layers={"vgg16": 4, "resnet50": 10},
        patience=6,
        cached_features=True,
        gradcam_max_images=64,
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
        seed: seed of initial weights, shuffling, augmentation, subsampling and folds.
        folds: K. 1 trains on the train split and selects on the validation split; K > 1
            pools both, divides their patients into K folds stratified by label
            (lungct.train.folds), trains every model once per fold and selects on the pooled
            out-of-fold predictions; the selected model is the ensemble of its K fold models.
        mixed_precision: ``auto`` (bf16 on a GPU that supports it), ``on``, ``off``.
        distribute: ``none``, ``data-parallel`` (JAX) or ``mirrored`` (TensorFlow).
        overwrite: retrain models whose ``runs/<name>/`` match this configuration.
        progress: ``auto`` (bars in a terminal, a line per epoch otherwise), ``bar``,
            ``epoch`` or ``none``.
        fine_tune_layers_by_model: set by :func:`resolve_config`: the layers each transfer
            model fine-tunes (the flag, else the preset's per-backbone value).
        gradcam_max_images: set by :func:`resolve_config`: the preset's default cap on the
            images interpretation explains (0 = all); recorded for stage 3.
    """

    dataset_dir: Path = Path("output_dataset")
    out_dir: Path = Path(".")
    models: tuple[str, ...] = MODEL_NAMES
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
    folds: int = 1
    mixed_precision: str = "auto"
    distribute: str = "none"
    overwrite: bool = False
    progress: str = "auto"
    fine_tune_layers_by_model: tuple[tuple[str, int], ...] = ()
    gradcam_max_images: int | None = None

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
        values["fine_tune_layers_by_model"] = dict(self.fine_tune_layers_by_model)
        return values

    def fine_tune_layer_count(self, name: str) -> int:
        """Backbone layers transfer model ``name`` fine-tunes (resolved configurations only)."""
        return dict(self.fine_tune_layers_by_model)[name]


def _validate_choices(config: TrainConfig) -> None:
    unknown = [name for name in config.models if name not in MODEL_NAMES]
    if unknown or not config.models:
        raise UserError(
            f"unknown model {', '.join(unknown) or '(none given)'}; choose from "
            f"{', '.join(MODEL_NAMES)}."
        )
    if len(set(config.models)) != len(config.models):
        raise UserError(f"--models lists a model twice: {','.join(config.models)}.")
    for flag, value, allowed in (
        ("--preset", config.preset, ("auto", *PRESETS)),
        ("--mixed-precision", config.mixed_precision, SWITCH_MODES),
        ("--distribute", config.distribute, DISTRIBUTE_MODES),
        ("progress", config.progress, PROGRESS_MODES),
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
    if (not isinstance(config.folds, int) or isinstance(config.folds, bool)
            or not 1 <= config.folds <= MAX_FOLDS):
        raise UserError(f"--folds must be an integer from 1 to {MAX_FOLDS}, got {config.folds!r}.")
    if not 0.0 < config.learning_rate < 1.0:
        raise UserError(f"--learning-rate must be in (0, 1), got {config.learning_rate}.")


def resolve_config(config: TrainConfig, image_size: int, accelerator: str) -> TrainConfig:
    """The one place the preset applies: every unset field takes the preset's value.

    ``auto`` is the full preset on an accelerator and the quick one on a CPU. The result is
    checked once more as a whole (transfer models need ``train_size`` >= 32 px); nothing
    downstream reads the preset again.

    Raises:
        UserError: the resolved settings do not fit together.
    """
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
    filled = {
        field.name: getattr(values, field.name)
        for field in dataclasses.fields(values)
        if field.name not in ("fine_tune_layers", "train_size")
        and getattr(config, field.name) is None
    }
    train_size = config.train_size or values.train_size or min(QUICK_MAX_PX, image_size)
    by_model = tuple(
        (name, config.fine_tune_layers or values.fine_tune_layers[name])
        for name in config.models if name in values.fine_tune_layers
    )
    resolved = dataclasses.replace(config, preset=preset, train_size=train_size,
                                   fine_tune_layers_by_model=by_model, **filled)
    transfer = [name for name, _ in by_model]
    if transfer and train_size < MIN_TRANSFER_SIZE_PX:
        raise UserError(
            f"{', '.join(transfer)} need --train-size {MIN_TRANSFER_SIZE_PX} or more, "
            f"got {train_size}."
        )
    return resolved
