#!/usr/bin/env python3
"""Stage 4: score new CT scans (DICOM folders or archives) with a trained lungct model.

The model and how it must be fed come from training_results.json; images are rendered by
exactly the code prepare uses. Research use only. docs/formats.md describes predictions/.
"""

from lungct.predict.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
