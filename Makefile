# lungct: every target installs what it needs into .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-slow test-distributed deps lint check-install bench clean

# Pinned dependencies first, then lungct itself, editable (built offline by the venv's setuptools).
$(STAMP): requirements.txt requirements-dev.txt constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt -c constraints.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e . >$(VENV)/editable.log 2>&1 \
		|| { cat $(VENV)/editable.log; exit 1; }
	touch $(STAMP)

setup: $(STAMP)

# The four stages in order on the built-in synthetic cohort (CPU-sized settings: patch view,
# 64 px, 2.5D context of 2.5 mm, about 1,000 images; training picks the quick preset on a CPU;
# benchmarks/RESULTS.md section 15 says why these settings).
demo: setup
	$(PY) prepare_lung_dataset.py --source synthetic --view patch --image-size 64 \
		--target-count 1000 --context-mm 2.5
	$(PY) training_lung_cnn.py
	$(PY) interpretation.py
	$(PY) predict_lung_ct.py --input raw_synthetic --out predictions $$($(PY) -c \
		"import csv; rows = csv.DictReader(open('output_dataset/manifest.csv')); \
		ids = sorted({r['patient_id'] for r in rows if r['split'] == 'test'})[:2]; \
		print(' '.join('--patient-id ' + i for i in ids))")
	@echo "Scored two synthetic test series: predictions/summary.csv (research use only)"

# deptry and import-linter first (seconds; output only on failure), then the tests.
test: setup
	@out=$$($(VENV)/bin/deptry lungct 2>&1) || { echo "$$out"; exit 1; }
	@out=$$($(VENV)/bin/lint-imports 2>&1) || { echo "$$out"; exit 1; }
	$(PY) -m pytest -q

# The slow matrices (every kill point, concurrency variants); CI runs them after `make test`.
test-slow: setup
	$(PY) -m pytest -q -m slow --ignore=tests/test_train_multiprocess.py

# Two training processes (JAX, one CPU device each, localhost) against one; CI runs it too.
test-distributed: setup
	$(PY) -m pytest -q -m slow tests/test_train_multiprocess.py

# Imports of lungct against pyproject.toml's dependencies and extras ([tool.deptry]).
deps: setup
	$(VENV)/bin/deptry lungct

lint: setup
	$(PY) -m ruff check lungct tests benchmarks *.py
	$(VENV)/bin/lint-imports

# The wheel as a user gets it: built from a copy of the package (no stale build/ in the checkout),
# installed with its dependencies and the tensorflow extra into a fresh venv (pinned by
# constraints.txt; downloads from PyPI or the pip cache), then run from outside the checkout.
check-install: setup
	@set -e; start=$$(date +%s); tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	log="$$tmp/log"; run() { "$$@" >>"$$log" 2>&1 || { cat "$$log"; echo "check-install: failed: $$*"; exit 1; }; }; \
	mkdir "$$tmp/src"; cp -R lungct pyproject.toml README.md LICENSE "$$tmp/src/"; \
	find "$$tmp/src" -name __pycache__ -prune -exec rm -rf {} +; \
	run $(PY) -m build --wheel --no-isolation --outdir "$$tmp/dist" "$$tmp/src"; \
	wheel=$$(ls "$$tmp"/dist/lungct-*.whl); \
	run $(PYTHON) -m venv --without-pip "$$tmp/venv"; \
	run $(PY) -m pip --python "$$tmp/venv/bin/python" install --disable-pip-version-check \
		-c constraints.txt "$$wheel[tensorflow]"; \
	cd "$$tmp"; export TF_CPP_MIN_LOG_LEVEL=3; \
	for stage in prepare train interpret predict; do run "$$tmp/venv/bin/lungct-$$stage" --help; done; \
	run "$$tmp/venv/bin/python" -c "import lungct, lungct.prepare.stage, lungct.train.stage, \
		lungct.interpret.stage; assert '$$tmp/venv/' in lungct.__file__, lungct.__file__"; \
	echo "check-install: $$(basename "$$wheel") installs and runs ($$(( $$(date +%s) - start )) s)"

# CPU benchmarks; JSON per run in benchmarks/out/, figures copied into benchmarks/RESULTS.md.
bench: setup
	$(PY) benchmarks/bench_prepare.py --patients 4 --repeats 5 --out benchmarks/out/prepare.json
	$(PY) benchmarks/bench_synthetic_acceptance.py --out benchmarks/out/synthetic_acceptance.json
	for model in baseline vgg16 resnet50; do for backend in tensorflow jax; do \
		KERAS_BACKEND=$$backend $(PY) benchmarks/bench_train.py --model $$model --n-images 256 \
			--out benchmarks/out/train_$${model}_$$backend.json -q || exit 1; done; done
	$(PY) benchmarks/bench_gradcam.py --output benchmarks/out/gradcam.json
	$(PY) benchmarks/bench_metrics.py --units 150 --out benchmarks/out/metrics_150.json -q
	$(PY) benchmarks/bench_metrics.py --units 1000 --out benchmarks/out/metrics_1000.json -q
	$(PY) benchmarks/bench_decode.py --out benchmarks/out/decode.json
	$(PY) benchmarks/bench_predict.py --out benchmarks/out/predict.json

clean:
	rm -rf build dist lungct.egg-info
	rm -rf output_dataset output_dataset.partial raw_synthetic extracted runs reports predictions \
		benchmarks/out \
		.lungct-header-index.parquet \
		lung_cancer_cnn_enhanced.h5 lung_cancer_cnn_enhanced.keras training_results.json
