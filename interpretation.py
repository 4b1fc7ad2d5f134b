#!/usr/bin/env python3
"""Stage 3: write the evaluation and Grad-CAM report of the trained models.

Reads training_results.json (stage 2), the selected model and the dataset folder, and writes
reports/: confusion_matrix.png, roc_curve.png, pr_curve.png, calibration.png,
gradcam_gallery.png, gradcam/ (per-image overlays), report.html and report.json.

    python interpretation.py                      # defaults: ./training_results.json -> reports/
    python interpretation.py --cam gradcam++ --gradcam-max 32 --out reports_pp/
"""

from lungct.interpret.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
