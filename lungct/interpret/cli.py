"""Stage 3: write the evaluation and Grad-CAM report of the trained models.

Reads training_results.json (stage 2), the selected model and the dataset folder, and writes
reports/: confusion_matrix.png, roc_curve.png, pr_curve.png, calibration.png,
gradcam_gallery.png, gradcam/ (per-image overlays), report.html and report.json.

    python interpretation.py                      # defaults: ./training_results.json -> reports/
    python interpretation.py --cam gradcam++ --gradcam-max 32 --out reports_pp/
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lungct.cli import (
    add_logging_flags,
    captured_stderr,
    configure_logging,
    non_negative_int,
    positive_int,
    run_main,
)
from lungct.contract import CAM_METHODS
from lungct.errors import UserError

__all__ = ["build_parser", "main"]


def _gradcam_max(text: str) -> int | str:
    if text == "all":
        return text
    try:
        value = int(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {text!r}"
                                         ) from error
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags of the interpretation stage."""
    parser = argparse.ArgumentParser(
        description="Evaluate the models of training_lung_cnn.py on the test split (slice, "
                    "nodule and patient level, patient-bootstrap CIs, calibration, a "
                    "diameter-only baseline) and explain the selected model with Grad-CAM. "
                    "Research use only.")
    parser.add_argument("--results", type=Path, default=Path("training_results.json"),
                        help="training results of stage 2 (default: %(default)s)")
    parser.add_argument("--dataset", type=Path, default=None,
                        help="dataset folder (default: config.dataset_dir of the results)")
    parser.add_argument("--out", type=Path, default=Path("reports"),
                        help="report folder (default: %(default)s)")
    parser.add_argument("--bootstrap", type=positive_int, default=2000,
                        help="patient-level bootstrap resamples for the 95%% CIs "
                             "(default: %(default)s)")
    parser.add_argument("--seed", type=non_negative_int, default=None,
                        help="seed of the bootstrap and the Grad-CAM draw "
                             "(default: the training seed)")
    parser.add_argument("--cam", choices=tuple(CAM_METHODS), default="gradcam",
                        help="saliency method (default: %(default)s)")
    parser.add_argument("--gradcam-max", type=_gradcam_max, default=None, metavar="N|all",
                        help="explain at most N masked test images, a seeded draw stratified "
                             "by class (default: the cap training recorded: all, or 64 for "
                             "the quick preset)")
    parser.add_argument("--gradcam-layer", default=None, metavar="NAME",
                        help="explained layer, e.g. block5_conv3 or resnet50/conv5_block3_out "
                             "(default: the output of the last convolutional block)")
    parser.add_argument("--batch-size", type=positive_int, default=32,
                        help="images per Grad-CAM batch (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="recompute even when report.json is up to date with its inputs")
    add_logging_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, run the stage, return the exit code."""
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose, args.quiet)

    def body() -> int:
        with captured_stderr():
            from lungct.interpret.stage import InterpretConfig, run

        try:
            config = InterpretConfig(
                results_path=args.results, dataset_dir=args.dataset, out_dir=args.out,
                bootstrap_resamples=args.bootstrap, seed=args.seed, cam_method=args.cam,
                gradcam_max=args.gradcam_max, gradcam_layer=args.gradcam_layer,
                batch_size=args.batch_size, overwrite=args.overwrite)
        except ValueError as error:
            raise UserError(str(error)) from error
        run(config)
        return 0

    return run_main(body)

