"""Stage 1: raw CT data (DICOM + LIDC XML, labels CSV or class folders) -> output_dataset/.

Never imports Keras, TensorFlow or JAX. Entry point: :func:`lungct.prepare.stage.run`.
"""
