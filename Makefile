# vidprune: `make setup` builds .venv, `make test` runs the CPU test suite. Both are idempotent.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: help setup test lint format eval sweep tables bench bench-prune viz clean

# `make eval model=llava_ov prune=hieravid ratio=0.3` sets these make variables; they become Hydra overrides.
EVAL_VARS := model prune benchmark ratio limit seed device threads paired_baseline logger max_new_tokens results_dir
OVERRIDES := $(foreach v,$(EVAL_VARS),$(if $($(v)),$(v)=$($(v))))

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

setup: $(STAMP)  ## create .venv and install vidprune with its dev tools

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "vidprune needs Python >= 3.11"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]' -c constraints.txt
	@# lmms-eval pulls latex2sympy2 (math tasks only), which pins antlr4 4.7.2; Hydra's parser needs 4.9.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps antlr4-python3-runtime==4.9.3
	@# lmms-eval also pulls torchvision; the registry's wheel is a CUDA build that breaks imports next to CPU torch.
	$(PY) -c 'import torchvision' 2>/dev/null || $(PY) -m pip uninstall -q -y torchvision
	touch $(STAMP)

test: setup  ## CPU test suite (GPU tests are skipped)
	$(PY) -m pytest $(PYTEST_ARGS)

eval: setup  ## the main job (default: tiny model on the tiny bundle, offline); ARGS="..." for more overrides
	$(PY) scripts/run_eval.py $(OVERRIDES) $(ARGS)

# `make sweep exp=ratio_sweep model=tiny_llava_ov`: model/benchmark/prune/ratio narrow the experiment's grid.
GRID_OVERRIDES := $(foreach v,model benchmark prune ratio results_dir,$(if $($(v)),$(v)=$($(v))))

sweep: setup  ## run the cells of configs/experiment/$(exp).yaml that have no record (Hydra multirun; launcher=slurm)
	@test -n "$(exp)" || { echo "usage: make sweep exp=<name> (one of: $$(ls configs/experiment | sed 's/.yaml//' | xargs))"; exit 2; }
	$(PY) scripts/sweep.py $(exp) $(OVERRIDES) $(if $(launcher),--launcher $(launcher)) $(ARGS)

tables: setup  ## rebuild tables from the records: summary.{csv,md}, or exp=<name> -> <name>.{md,csv,tex} + plots
	$(PY) scripts/make_tables.py $(if $(exp),--exp $(exp) $(GRID_OVERRIDES)) $(ARGS)

viz: setup  ## token-selection picture of one sample (default tiny_llava_ov × prunevid); ARGS="prune=hieravid --doc 3"
	$(PY) scripts/viz.py $(ARGS)

lint: setup  ## ruff lint + format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup  ## apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: setup  ## TTFT of every method vs none on an LLM of the backbone's shape (CPU default; BENCH_ARGS="--preset pllava")
	$(PY) scripts/bench.py $(BENCH_ARGS)

bench-prune: setup  ## CPU time of the pre-LLM stages on PLLaVA and LLaVA-OV shapes
	$(PY) scripts/bench_prune.py $(BENCH_ARGS)

clean:  ## caches only; never touches results/
	rm -rf .pytest_cache .ruff_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
