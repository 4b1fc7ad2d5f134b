#!/usr/bin/env python3
"""Stage 2: train a baseline CNN and VGG16/ResNet50 transfer models on output_dataset/.

Selects the model with the highest validation AUC, chooses the decision threshold on
validation (Youden's J) and writes lung_cancer_cnn_enhanced.h5 / .keras, runs/<model>/ and
training_results.json. docs/formats.md describes the files.
"""

from lungct.train.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
