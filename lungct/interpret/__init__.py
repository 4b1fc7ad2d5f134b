"""Stage 3: training results + dataset -> reports/ (metrics with CIs, Grad-CAM, weaknesses).

Entry point: :func:`lungct.interpret.stage.run`.
"""
