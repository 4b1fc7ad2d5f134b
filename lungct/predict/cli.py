"""Stage 4: score new CT scans (DICOM folders or archives) with a trained lungct model.

The model and how it must be fed come from training_results.json; images are rendered by
exactly the code prepare uses. Research use only. docs/formats.md describes predictions/.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from lungct.cli import (
    add_logging_flags,
    configure_logging,
    non_negative_int,
    positive_int,
    run_main,
)
from lungct.errors import UserError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of the predict stage."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--input", type=Path, action="append", required=True,
                        help="a folder or .zip/.tar/.tar.gz archive of DICOM (any nesting); "
                             "repeat for several")
    parser.add_argument("--results", type=Path, default=Path("training_results.json"),
                        help="the training results naming the model, threshold and rendering")
    parser.add_argument("--model", type=Path, help="score this model file instead of the "
                        "selected one (it must take the recorded rendering)")
    parser.add_argument("--out", type=Path, default=Path("predictions"),
                        help="every output, and every extracted archive, goes here")
    parser.add_argument("--gradcam-top", type=non_negative_int, default=8,
                        help="Grad-CAM overlays of this many most suspicious images per series")
    parser.add_argument("--patient-id", action="append", dest="patient_ids", metavar="ID",
                        help="score only the series of this (0010,0020) Patient ID (repeat "
                        "for several; none: every series in the input)")
    parser.add_argument("--nodules", type=Path, help="CSV of nodule centres for a patch model: "
                        "series_uid or patient_id, x_mm, y_mm, z_mm (patient coordinates)")
    parser.add_argument("--dicom-out", action="store_true", help="also write the overlays as a "
                        "DICOM Secondary Capture series in each scored study")
    parser.add_argument("--batch-size", type=positive_int, default=32,
                        help="images per model call")
    parser.add_argument("--workers", type=positive_int, default=os.cpu_count() or 1,
                        help="processes indexing and rendering series")
    parser.add_argument("--overwrite", action="store_true",
                        help="score again series whose results are up to date")
    parser.add_argument("--pseudonymise", action="store_true",
                        help="write prepare's salted pseudonyms instead of ids and UIDs")
    parser.add_argument("--work-dir", type=Path, default=Path("."),
                        help="the folder holding prepare's .lungct_salt (with --pseudonymise)")
    parser.add_argument("--patient-regex", default=r"LIDC-IDRI-\d{4}",
                        help="prepare's patient id pattern, masked with --pseudonymise")
    add_logging_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the stage; exit 0 all scored, 1 some failed, 2 a user error."""
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose, args.quiet)

    def body() -> int:
        from lungct.predict.config import PredictConfig
        from lungct.predict.stage import run

        try:
            config = PredictConfig(
                inputs=tuple(args.input), results_path=args.results, model_path=args.model,
                out_dir=args.out, gradcam_top=args.gradcam_top, nodules_csv=args.nodules,
                dicom_out=args.dicom_out, batch_size=args.batch_size, workers=args.workers,
                overwrite=args.overwrite, pseudonymise=args.pseudonymise,
                work_dir=args.work_dir, patient_regex=args.patient_regex,
                patient_ids=tuple(args.patient_ids or ()))
        except ValueError as error:
            raise UserError(f"invalid argument: {error}") from None
        counts = run(config)
        return 1 if counts["failed"] else 0

    return run_main(body)
