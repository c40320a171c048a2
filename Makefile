# Two commands for a newcomer: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# timm imports torchvision, so torch and torchvision are pinned as a matching pair and installed first.
TORCH_PAIR := torch==2.14.1 torchvision==0.29.1
DEMO_DIR ?= demo
DEMO_N ?= 3000
DEMO_SEED ?= 1
DEMO_EPOCHS ?= 6
DEMO_MINUTES ?= 8

RESULTS_DIR ?= runs/results
RESULTS_MINUTES ?= 15

.PHONY: setup test test-all demo lint clean results

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

# The embedded default: synthetic archive -> splits -> `tiny` trained and evaluated -> ONNX bundle -> FAISS
# index -> an example query. The web service joins this target with issue 5 (see README, "Status").
demo: setup
	test -d $(DEMO_DIR)/archive || $(VENV)/bin/retina-train synth --out $(DEMO_DIR)/archive --n $(DEMO_N) \
		--seed $(DEMO_SEED) --size 224 --contact-sheet $(DEMO_DIR)/contact_sheet.png
	$(VENV)/bin/retina-index describe $(DEMO_DIR)/archive
	$(VENV)/bin/retina-train split $(DEMO_DIR)/archive --out $(DEMO_DIR)/splits.json
	test -f $(DEMO_DIR)/run/checkpoint/model.safetensors || $(VENV)/bin/retina-train fit --config tiny \
		--archive $(DEMO_DIR)/archive --splits $(DEMO_DIR)/splits.json --out $(DEMO_DIR)/run \
		--epochs $(DEMO_EPOCHS) --max-minutes $(DEMO_MINUTES)
	test -f $(DEMO_DIR)/run/eval-test/metrics.json || $(VENV)/bin/retina-train evaluate --run $(DEMO_DIR)/run \
		--archive $(DEMO_DIR)/archive --splits $(DEMO_DIR)/splits.json
	test -f $(DEMO_DIR)/bundle/manifest.json || $(VENV)/bin/retina-train export --run $(DEMO_DIR)/run \
		--archive $(DEMO_DIR)/archive --splits $(DEMO_DIR)/splits.json --out $(DEMO_DIR)/bundle
	test -f $(DEMO_DIR)/index/index.json || $(VENV)/bin/retina-index build --bundle $(DEMO_DIR)/bundle \
		--archive $(DEMO_DIR)/archive --out $(DEMO_DIR)/index
	$(VENV)/bin/retina-index query --index $(DEMO_DIR)/index -k 5 \
		--text "Left eye of a 60-year-old woman with diabetes: proliferative diabetic retinopathy with new vessels."
	@echo "demo: stopped after the last stage that exists today: archive, splits, training, evaluation"
	@echo "demo: ($(DEMO_DIR)/run/eval-test/report.md), ONNX bundle and FAISS index. The web service (issue 5)"
	@echo "demo: is not built yet; query the index with: $(VENV)/bin/retina-index query --index $(DEMO_DIR)/index --text '...'"

# The README's Results table: ours (`tiny`) against the CLIP baseline, same archive, same time budget.
results: setup
	test -d $(RESULTS_DIR)/archive || $(VENV)/bin/retina-train synth --out $(RESULTS_DIR)/archive --n 3000 --seed 1 --size 224
	$(VENV)/bin/retina-train split $(RESULTS_DIR)/archive --out $(RESULTS_DIR)/splits.json --seed 0
	$(VENV)/bin/retina-train fit --config tiny --archive $(RESULTS_DIR)/archive --splits $(RESULTS_DIR)/splits.json \
		--out $(RESULTS_DIR)/tiny --epochs 12 --batch-size 32 --balance 0.5 --max-minutes $(RESULTS_MINUTES)
	$(VENV)/bin/retina-train fit --config clip-baseline --archive $(RESULTS_DIR)/archive --splits $(RESULTS_DIR)/splits.json \
		--out $(RESULTS_DIR)/clip-baseline --epochs 28 --batch-size 32 --balance 0.5 --max-minutes $(RESULTS_MINUTES)
	$(VENV)/bin/retina-train evaluate --run $(RESULTS_DIR)/tiny --archive $(RESULTS_DIR)/archive --splits $(RESULTS_DIR)/splits.json
	$(VENV)/bin/retina-train evaluate --run $(RESULTS_DIR)/clip-baseline --archive $(RESULTS_DIR)/archive --splits $(RESULTS_DIR)/splits.json
	$(VENV)/bin/retina-train compare $(RESULTS_DIR)/tiny $(RESULTS_DIR)/clip-baseline

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
