"""Stage 2: output_dataset/ -> trained Keras models, the selected one and its results.

Entry point: :func:`lungct.train.stage.run`.
"""
