#!/usr/bin/env python3
"""Stage 1: turn lung CT DICOM (local, Kaggle or synthetic) into a balanced PNG dataset.

Labels come from the radiologists' LIDC XML readings (or a --labels CSV, or class-named
folders); the split is by patient. docs/formats.md describes the files.
"""

from lungct.prepare.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
