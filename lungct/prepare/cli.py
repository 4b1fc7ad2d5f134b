"""Stage 1: turn lung CT DICOM (local, Kaggle or synthetic) into a balanced PNG dataset.

Labels come from the radiologists' LIDC XML readings (or a --labels CSV, or class-named
folders); the split is by patient. docs/formats.md describes the files.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from lungct.cli import (
    add_logging_flags,
    configure_logging,
    finite_float,
    non_negative_int,
    positive_int,
    run_main,
)
from lungct.errors import UserError

__all__ = ["SCHEDULER_ENV", "build_parser", "main"]

#: Dask's own variable for the scheduler address, read for --executor dask only.
SCHEDULER_ENV = "DASK_SCHEDULER_ADDRESS"


def _fractions(text: str) -> tuple[float, float, float]:
    values = tuple(finite_float(v) for v in text.split(","))
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three fractions TRAIN,VAL,TEST, got {text!r}")
    return values  # type: ignore[return-value]


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of the prepare stage."""
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    src = parser.add_argument_group("source")
    src.add_argument("--source", choices=("auto", "local", "kaggle", "synthetic"), default="auto",
                     help="auto: --input if given, else Kaggle if credentials exist, else the "
                          "built-in synthetic cohort")
    src.add_argument("--input", type=Path, help="a folder or .zip/.tar/.tar.gz archive of DICOM "
                     "(+ LIDC XML) files or of class-named image folders")
    src.add_argument("--kaggle-dataset", default=None,
                     help="Kaggle dataset slug (default: a raw LIDC-IDRI DICOM + XML mirror)")
    src.add_argument("--max-patients", type=positive_int,
                     help="limit a Kaggle download to N patients")
    src.add_argument("--labels", type=Path,
                     help="CSV with columns path (relative to --input), label, patient_id")
    src.add_argument("--patient-regex", default=r"LIDC-IDRI-\d{4}",
                     help="patient id pattern in paths, for class folders without PatientID")
    src.add_argument("--synthetic-patients", type=non_negative_int, default=0,
                     help="patients in the synthetic cohort (0 = its default)")
    src.add_argument("--synthetic-size", type=non_negative_int, default=0,
                     help="synthetic slice size in pixels (0 = its default)")
    out = parser.add_argument_group("output")
    out.add_argument("--output", type=Path, default=Path("output_dataset"))
    out.add_argument("--work-dir", type=Path, default=Path("."),
                     help="where raw_synthetic/, raw_kaggle/ and extracted/ go")
    out.add_argument("--image-size", type=positive_int, default=224, help="PNG side in pixels")
    out.add_argument("--window", default="lung",
                     help="'lung' (centre -600 HU, width 1500) or CENTER,WIDTH in HU")
    out.add_argument("--view", choices=("slice", "patch"), default="slice",
                     help="whole axial slice, or a square patch around the nodule")
    out.add_argument("--patch-mm", type=finite_float, default=64.0, help="patch side in mm")
    out.add_argument("--context-mm", type=finite_float, default=0.0,
                     help="2.5D context D: 0 = the slice alone (grayscale); D > 0 = RGB of the "
                          "HU planes at z - D, z, z + D, interpolated along z (0-50 mm)")
    out.add_argument("--overwrite", action="store_true", help="rebuild an existing output")
    out.add_argument("--pseudonymise", action="store_true",
                     help="replace patient ids and UIDs by salted hashes in every output")
    lab = parser.add_argument_group("labels, split and balance")
    lab.add_argument("--label-rule", default="",
                     help="changes to the LIDC rule, e.g. "
                          "'cancer_at_least=4,non_cancer_at_most=2,min_readers=1,aggregate=median'")
    lab.add_argument("--min-readers", type=positive_int, default=None,
                     help="exclude nodules rated by fewer readers (default 1)")
    lab.add_argument("--negative-margin-mm", type=finite_float, default=10.0,
                     help="no_finding slices are at least this far in z from every mark")
    lab.add_argument("--split", type=_fractions, default=(0.7, 0.15, 0.15),
                     help="TRAIN,VAL,TEST fractions of patients")
    lab.add_argument("--target-count", type=positive_int, default=3000, help="images in total")
    lab.add_argument("--max-per-patient", type=positive_int, default=20,
                     help="at most this many images per patient and class")
    lab.add_argument("--seed", type=non_negative_int, default=42)
    parser.add_argument("--workers", type=positive_int, default=os.cpu_count() or 1,
                        help="processes for reading and writing (with --executor dask and no "
                             "scheduler: the LocalCluster's worker processes)")
    parser.add_argument("--executor", choices=("local", "dask"), default="local",
                        help="local: this machine's process pool; dask: a Dask cluster "
                             "(pip install 'lungct[dask]'), a LocalCluster unless "
                             "--dask-scheduler names a running one")
    parser.add_argument("--dask-scheduler", default=None, metavar="ADDRESS",
                        help="address of a running Dask scheduler, e.g. tcp://host:8786 "
                             f"(default: ${SCHEDULER_ENV} when --executor dask)")
    add_logging_flags(parser)
    return parser


def _scheduler_address(args: argparse.Namespace) -> str | None:
    """--dask-scheduler, else $DASK_SCHEDULER_ADDRESS for --executor dask, else None."""
    if args.dask_scheduler is not None or args.executor != "dask":
        return args.dask_scheduler
    return os.environ.get(SCHEDULER_ENV) or None


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the stage, return the exit code."""
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose, args.quiet)

    def body() -> None:
        from lungct.prepare import lidc, sources
        from lungct.prepare.config import PrepareConfig
        from lungct.prepare.stage import run

        try:
            rule = lidc.LabelRule.parse(args.label_rule) if args.label_rule else lidc.LabelRule()
            if args.min_readers is not None:
                rule = lidc.LabelRule(**{**rule.to_dict(), "min_readers": args.min_readers})
            config = PrepareConfig(
                source=args.source, input_path=args.input,
                kaggle_dataset=args.kaggle_dataset or sources.DEFAULT_KAGGLE_DATASET,
                max_patients=args.max_patients, labels_csv=args.labels,
                patient_regex=args.patient_regex, output_dir=args.output, work_dir=args.work_dir,
                image_size_px=args.image_size, window=args.window, view=args.view,
                patch_mm=args.patch_mm, context_mm=args.context_mm, split_fractions=args.split,
                target_count=args.target_count, max_per_patient=args.max_per_patient,
                negative_margin_mm=args.negative_margin_mm, label_rule=rule, seed=args.seed,
                synthetic_patients=args.synthetic_patients,
                synthetic_size_px=args.synthetic_size, pseudonymise=args.pseudonymise,
                workers=args.workers, executor=args.executor,
                dask_scheduler=_scheduler_address(args), overwrite=args.overwrite,
            )
        except ValueError as error:
            raise UserError(f"invalid argument: {error}") from None
        run(config)

    return run_main(body)

