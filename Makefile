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

# The three stages in order on the built-in synthetic cohort (CPU-sized settings: patch view,
# 64 px, about 1,000 images; training picks the quick preset on a CPU).
demo: setup
	$(PY) prepare_lung_dataset.py --source synthetic --view patch --image-size 64 \
		--target-count 1000
	$(PY) training_lung_cnn.py
	$(PY) interpretation.py

test: setup
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check lungct tests benchmarks *.py

# CPU benchmarks; JSON per run in benchmarks/out/, figures copied into benchmarks/RESULTS.md.
bench: setup
	$(PY) benchmarks/bench_prepare.py --patients 4 --repeats 5 --out benchmarks/out/prepare.json
	$(PY) benchmarks/bench_synthetic_acceptance.py --out benchmarks/out/synthetic_acceptance.json
	for model in baseline vgg16 resnet50; do for backend in tensorflow jax; do \
		KERAS_BACKEND=$$backend $(PY) benchmarks/bench_train.py --model $$model --n-images 256 \
			--out benchmarks/out/train_$${model}_$$backend.json -q || exit 1; done; done
	$(PY) benchmarks/bench_gradcam.py --output benchmarks/out/gradcam.json

clean:
	rm -rf output_dataset output_dataset.partial raw_synthetic extracted runs reports \
		benchmarks/out \
		lung_cancer_cnn_enhanced.h5 lung_cancer_cnn_enhanced.keras training_results.json
