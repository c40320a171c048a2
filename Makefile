# Two commands for a newcomer: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# timm imports torchvision, so torch and torchvision are pinned as a matching pair and installed first.
TORCH_PAIR := torch==2.14.1 torchvision==0.29.1
DEMO_DIR ?= demo
DEMO_N ?= 3000
DEMO_SEED ?= 1

.PHONY: setup test test-all demo lint clean

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

# The embedded default: a synthetic BRSET-layout archive, its report and patient-level splits.
# Training, export, indexing and serving join this target as they land (see README, "Status").
demo: setup
	$(VENV)/bin/retina-train synth --out $(DEMO_DIR)/archive --n $(DEMO_N) --seed $(DEMO_SEED) --size 224 \
		--contact-sheet $(DEMO_DIR)/contact_sheet.png
	$(VENV)/bin/retina-index describe $(DEMO_DIR)/archive
	$(VENV)/bin/retina-train split $(DEMO_DIR)/archive --out $(DEMO_DIR)/splits.json
	@echo "demo: stopped after the last stage that exists today (synthetic archive + splits)."
	@echo "demo: training, export, index and the web service are not built yet; see README 'Status'."

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
