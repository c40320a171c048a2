# Two commands for a newcomer: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Every install path installs from a lock file in requirements/ (hashed, one version per package; the torch
# pair is pinned in requirements/torch.in). `make lock` regenerates them with this uv, in $(LOCK_VENV).
UV_VERSION := 0.13.9
LOCK_VENV := .venv-lock
LOCK_ARGS ?=
DEMO_DIR ?= demo
DEMO_N ?= 3000
DEMO_SEED ?= 1
DEMO_PORT ?= 8000
ZOO_DIR ?= runs/zoo

RESULTS_DIR ?= runs/results
RESULTS_MINUTES ?= 15

.PHONY: setup test test-all demo lint clean results zoo lock lock-check

# requirements/dev.txt (the train, serve, dev and openvino extras, the torch pair: PyPI's CUDA build), an offline
# check that the locks still match pyproject.toml, then the project itself (--no-deps: nothing beyond the lock).
$(VENV)/.installed: pyproject.toml requirements/dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --require-hashes -r requirements/dev.txt
	$(PY) scripts/lock.py --verify
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

setup: $(VENV)/.installed

$(LOCK_VENV)/.uv-$(UV_VERSION):
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install --quiet uv==$(UV_VERSION)
	touch $@

# Regenerate every lock file from pyproject.toml and requirements/*.in (see scripts/lock.py): pins move only
# where they must; `make lock LOCK_ARGS=--upgrade` takes the newest versions allowed.
lock: $(LOCK_VENV)/.uv-$(UV_VERSION)
	$(PYTHON) scripts/lock.py --uv $(LOCK_VENV)/bin/uv $(LOCK_ARGS)

# Fails if `make lock` would change a lock file (asks PyPI; `make setup` runs only the offline check).
lock-check: $(LOCK_VENV)/.uv-$(UV_VERSION)
	$(PYTHON) scripts/lock.py --uv $(LOCK_VENV)/bin/uv --check

test: setup
	$(PY) -m pytest -q

test-all: setup
	$(PY) -m pytest -q -m ''

lint: setup
	$(PY) -m ruff check training index service tests scripts

# The embedded default: synthetic archive -> splits -> the shipped model (zoo:tiny-synth) exported to an ONNX
# bundle -> FAISS index -> the service at http://127.0.0.1:$(DEMO_PORT)/. Nothing is trained. Stages already
# built for the same inputs (checked by fingerprint) are reused, so a second `make demo` serves in seconds.
demo: setup
	$(VENV)/bin/retina-train demo --dir $(DEMO_DIR) --n $(DEMO_N) --seed $(DEMO_SEED) --host 127.0.0.1 --port $(DEMO_PORT)

# The recipe of the shipped model (hours on 2 CPU cores; minutes on a GPU): a 30,000-record synthetic archive,
# training, locked-image tuning with the grading path frozen, the appearance stage (the image embedding's
# projections alone), the facts stage (the two text->record projections alone), evaluation on a held-out archive,
# export, the CLIP baseline the same way, and the model card.
zoo: setup
	$(VENV)/bin/retina-train zoo --out $(ZOO_DIR) --epochs 3 --batch-size 48 --baseline \
	    --tune-config tiny-synth-lit --tune-epochs 30 --tune-batch-size 256 --tune-lr 1e-3 \
	    --tune-reinit text --tune-reinit tabular --tune-freeze fusion --tune-freeze image_to_fusion \
	    --appearance-config tiny-synth-lit-appearance --appearance-epochs 3 --appearance-batch-size 48 \
	    --appearance-lr 2e-3 --facts-config tiny-synth-lit-facts --facts-epochs 3 --facts-batch-size 256 \
	    --facts-lr 1e-3

# The README's Results table: ours (`tiny`) against the CLIP baseline, same archive, same time budget.
results: setup
	test -d $(RESULTS_DIR)/archive || $(VENV)/bin/retina-train synth --out $(RESULTS_DIR)/archive --n 3000 --seed 1 --size 224
	$(VENV)/bin/retina-train split $(RESULTS_DIR)/archive --out $(RESULTS_DIR)/splits.json --seed 0
	$(VENV)/bin/retina-train fit --config tiny --archive $(RESULTS_DIR)/archive --splits $(RESULTS_DIR)/splits.json \
		--out $(RESULTS_DIR)/tiny --epochs 32 --batch-size 32 --balance 0.5 --max-minutes $(RESULTS_MINUTES)
	$(VENV)/bin/retina-train fit --config clip-baseline --archive $(RESULTS_DIR)/archive --splits $(RESULTS_DIR)/splits.json \
		--out $(RESULTS_DIR)/clip-baseline --epochs 64 --batch-size 32 --balance 0.5 --max-minutes $(RESULTS_MINUTES)
	$(VENV)/bin/retina-train evaluate --run $(RESULTS_DIR)/tiny --archive $(RESULTS_DIR)/archive --splits $(RESULTS_DIR)/splits.json
	$(VENV)/bin/retina-train evaluate --run $(RESULTS_DIR)/clip-baseline --archive $(RESULTS_DIR)/archive --splits $(RESULTS_DIR)/splits.json
	$(VENV)/bin/retina-train compare $(RESULTS_DIR)/tiny $(RESULTS_DIR)/clip-baseline

clean:
	rm -rf $(VENV) $(LOCK_VENV) $(DEMO_DIR) .pytest_cache
