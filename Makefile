# Two commands for a newcomer: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# timm imports torchvision, so torch and torchvision are pinned as a matching pair and installed first.
TORCH_PAIR := torch==2.14.1 torchvision==0.29.1
DEMO_DIR ?= demo
DEMO_N ?= 3000
DEMO_SEED ?= 1
DEMO_PORT ?= 8000
ZOO_DIR ?= runs/zoo

RESULTS_DIR ?= runs/results
RESULTS_MINUTES ?= 15

.PHONY: setup test test-all demo lint clean results zoo

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PAIR)
	$(PY) -m pip install --quiet -e '.[train,serve,dev]'
	touch $@

setup: $(VENV)/.installed

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
# training, evaluation on a held-out archive, export, the CLIP baseline the same way, and the model card.
zoo: setup
	$(VENV)/bin/retina-train zoo --out $(ZOO_DIR) --epochs 3 --batch-size 48 --baseline

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
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
