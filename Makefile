# lungct: every target installs what it needs into .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench clean

$(STAMP): requirements.txt requirements-dev.txt constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt -c constraints.txt
	touch $(STAMP)

setup: $(STAMP)

# The three stages in order on the built-in synthetic cohort (CPU-sized settings).
demo: setup
	$(PY) prepare_lung_dataset.py --source synthetic --view patch --image-size 64 \
		--target-count 1000

test: setup
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check lungct tests benchmarks *.py

clean:
	rm -rf output_dataset output_dataset.partial raw_synthetic extracted runs reports \
		lung_cancer_cnn_enhanced.h5 lung_cancer_cnn_enhanced.keras training_results.json
