"""lungct: a three-stage research pipeline for lung CT cancer classification.

prepare (DICOM -> PNG dataset) -> train (Keras 3 models) -> interpret (report).
Research use only: labels are radiologists' suspicion ratings, not pathology.
"""

__version__ = "0.1.0"
