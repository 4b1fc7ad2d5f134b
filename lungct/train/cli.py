"""Stage 2: train a baseline CNN and VGG16/ResNet50 transfer models on output_dataset/.

Selects the model with the highest validation AUC (with --folds K: pooled out-of-fold AUC,
and the selected model is the ensemble of its K fold models), calibrates it by temperature
scaling on validation logits, chooses the decision threshold on the calibrated validation
probabilities (Youden's J) and writes lung_cancer_cnn_enhanced.h5 / .keras, runs/<model>/ and
training_results.json. docs/formats.md describes the files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lungct.cli import (
    add_logging_flags,
    captured_stderr,
    configure_logging,
    finite_float,
    non_negative_int,
    positive_int,
    run_main,
)
from lungct.train.job import leave

__all__ = ["build_parser", "main"]

MODEL_CHOICES = "baseline,vgg16,resnet50"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults; flags left unset take their value from --preset."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None:
            return f"{action.help} (default: from --preset)"
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of the training stage."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].strip() + " Selects on validation AUC; writes "
        "lung_cancer_cnn_enhanced.h5/.keras, runs/<model>/ and training_results.json.",
        formatter_class=_HelpFormatter,
    )
    io_group = parser.add_argument_group("input and output")
    io_group.add_argument(
        "--dataset",
        type=Path,
        default=Path("output_dataset"),
        help="the prepare stage's output folder",
    )
    io_group.add_argument(
        "--out",
        type=Path,
        default=Path("."),
        help="folder for the models, runs/ and training_results.json",
    )
    io_group.add_argument(
        "--overwrite",
        action="store_true",
        help="retrain models whose runs/<model>/ match this configuration",
    )

    model_group = parser.add_argument_group("models")
    model_group.add_argument(
        "--models",
        default=MODEL_CHOICES,
        help="comma-separated models to train, from " + MODEL_CHOICES,
    )
    model_group.add_argument(
        "--weights",
        default="auto",
        help="backbone weights: auto (ImageNet from the Keras cache or a download, else random "
        "with a warning), imagenet (error instead of random), none, a folder holding the Keras "
        "weight files, or vgg16=PATH,resnet50=PATH",
    )
    model_group.add_argument(
        "--fine-tune-layers",
        type=positive_int,
        default=None,
        help="top backbone layers to fine-tune (preset: vgg16 4, resnet50 10 "
        "in quick; 8 and 32 in full)",
    )

    train_group = parser.add_argument_group("training (unset values come from --preset)")
    train_group.add_argument(
        "--preset",
        default="auto",
        choices=("auto", "full", "quick"),
        help="full: the seed's settings (224 px, batch 32, baseline 15 epochs, transfer 15 "
        "frozen + 10 fine-tune epochs, early stopping after 5); quick: <= 64 px, <= 600 "
        "training images, baseline 8 epochs, transfer 2 frozen + 1 fine-tune epochs on cached "
        "activations; auto: full on a GPU, quick on a CPU",
    )
    train_group.add_argument(
        "--train-size",
        type=positive_int,
        default=None,
        help="side in px the models compute at (in-model resizing)",
    )
    train_group.add_argument("--epochs", type=positive_int, default=None, help="baseline epochs")
    train_group.add_argument(
        "--frozen-epochs",
        type=non_negative_int,
        default=None,
        help="transfer epochs with the backbone frozen",
    )
    train_group.add_argument(
        "--fine-tune-epochs",
        type=non_negative_int,
        default=None,
        help="transfer epochs fine-tuning the top backbone layers",
    )
    train_group.add_argument(
        "--batch-size", type=positive_int, default=None, help="global batch size"
    )
    train_group.add_argument(
        "--max-train-images",
        type=non_negative_int,
        default=None,
        help="cap on training images, class ratio kept (0 = all)",
    )
    train_group.add_argument(
        "--learning-rate",
        type=finite_float,
        default=1e-3,
        help="Adam learning rate (fine-tuning uses a tenth)",
    )
    train_group.add_argument(
        "--patience",
        type=positive_int,
        default=None,
        help="early-stopping patience on validation AUC, epochs",
    )
    train_group.add_argument(
        "--cached-features",
        choices=("auto", "on", "off"),
        default="auto",
        help="train transfer models on the activations of their frozen backbone layers, "
        "computed once, without augmentation (auto: on in the quick preset)",
    )
    train_group.add_argument(
        "--folds",
        type=positive_int,
        default=1,
        help="K-fold cross-validation by patient over the pooled train and validation "
        "splits (stratified by patient label; 1..20): every model trains K times, selection "
        "and threshold use the out-of-fold predictions, and the saved model is the ensemble "
        "of the selected architecture's K fold models (K times the disk and prediction "
        "cost); 1 = train on train, select on validation",
    )
    train_group.add_argument(
        "--no-augment", action="store_true", help="no flip/rotation/zoom/contrast augmentation"
    )
    train_group.add_argument(
        "--seed",
        type=non_negative_int,
        default=42,
        help="seed of weights, shuffling, augmentation and subsampling",
    )

    device_group = parser.add_argument_group("devices")
    device_group.add_argument(
        "--mixed-precision",
        choices=("auto", "on", "off"),
        default="auto",
        help="bf16 mixed precision (auto: on a GPU that supports it)",
    )
    device_group.add_argument(
        "--distribute",
        choices=("none", "data-parallel", "mirrored"),
        default="none",
        help="data-parallel: all devices with keras.distribution (JAX backend); mirrored: "
        "TensorFlow MirroredStrategy (best-effort)",
    )
    add_logging_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, train, and return the exit code."""
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose, args.quiet)

    def body() -> int:
        with captured_stderr():
            from lungct.train.config import TrainConfig
            from lungct.train.stage import run

        cached_features = {"auto": None, "on": True, "off": False}[args.cached_features]
        config = TrainConfig(
            dataset_dir=args.dataset,
            out_dir=args.out,
            overwrite=args.overwrite,
            models=tuple(name.strip() for name in args.models.split(",") if name.strip()),
            weights=args.weights,
            fine_tune_layers=args.fine_tune_layers,
            preset=args.preset,
            train_size=args.train_size,
            epochs=args.epochs,
            frozen_epochs=args.frozen_epochs,
            fine_tune_epochs=args.fine_tune_epochs,
            batch_size=args.batch_size,
            max_train_images=args.max_train_images,
            learning_rate=args.learning_rate,
            patience=args.patience,
            cached_features=cached_features,
            augment=not args.no_augment,
            seed=args.seed,
            folds=args.folds,
            mixed_precision=args.mixed_precision,
            distribute=args.distribute,
            progress="none" if args.quiet else "auto",
        )
        run(config)
        return 0

    return leave(run_main(body))  # a failed process of a multi-process job exits there

