"""Stage 4: score new CT scans with a trained model (predict_lung_ct.py).

The one stage package allowed to import another: prepare's source handling, header index,
series rules, candidates and rendering, so that a new scan is turned into pixels exactly as
the training images were. docs/formats.md describes the outputs (``predictions/``).
"""
