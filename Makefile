# vidprune: `make setup` builds .venv, `make test` runs the CPU test suite. Both are idempotent.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip -q --disable-pip-version-check
# GPU machines get PyPI's CUDA torch and its CUDA packages (requirements/cuda.txt), others the CPU wheel (torch-cpu.txt).
TORCH  ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu)
EXTRAS ?=
LOCKS  := requirements/lock.txt requirements/$(if $(filter cuda,$(TORCH)),cuda,torch-cpu).txt $(EXTRAS:%=requirements/%.txt)
STAMP  := $(VENV)/.installed-$(TORCH)$(EXTRAS:%=-%)
# The lock is resolved for CPython 3.11 only (scripts/lock.py); any other Python stops here with this line.
PYCHECK := import sys; v = sys.version_info; sys.exit(0 if v[:2] == (3, 11) else \
	f"vidprune: requirements/lock.txt is resolved for CPython 3.11, this is {v[0]}.{v[1]}; use make PYTHON=python3.11")

.PHONY: help setup lock test lint format eval sweep tables bench bench-prune bench-eval viz probe-model clean

# `make eval model=llava_ov prune=hieravid ratio=0.3` (or `budget=0.3 budget_measure=flops` instead of ratio) sets
# these make variables; they become Hydra overrides.
EVAL_VARS := model prune benchmark ratio budget budget_measure limit seed device threads paired_baseline logger \
	max_new_tokens results_dir nproc prefetch cache
OVERRIDES := $(foreach v,$(EVAL_VARS),$(if $($(v)),$(v)=$($(v))))

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

setup: $(STAMP)  ## create .venv and install exactly requirements/lock.txt (TORCH=cuda|cpu, EXTRAS=slurm)
	@# Other targets trust the stamp; `make setup` also checks the venv and re-installs where it drifted from the lock.
	@$(PY) scripts/lockcheck.py --quiet || { echo "vidprune: re-installing the lock"; rm -f $(STAMP); $(MAKE) --no-print-directory $(STAMP); }

# One stamp per variant; it is older than a lock file that changed, so `make setup` re-installs after `git pull`.
$(STAMP): $(LOCKS) pyproject.toml
	@$(PYTHON) -c '$(PYCHECK)' || exit 2
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c '$(PYCHECK)' || { echo "vidprune: .venv was made by another Python; remove it (rm -rf $(VENV))"; exit 2; }
	@# --no-compile: byte-compiling every file of 150 packages was half of setup's CPU time; Python compiles what it imports.
	$(PIP) install --no-compile --require-hashes --no-deps $(addprefix -r ,$(LOCKS))
	@# Packages left by an older lock (or installed by hand) go, so the venv is the lock and nothing else.
	extras="$$($(PY) scripts/lockcheck.py --extras)"; test -z "$$extras" || $(PIP) uninstall -y $$extras
	$(PIP) install --no-deps --no-build-isolation -e .
	$(PY) scripts/lockcheck.py
	touch $(STAMP)

lock: $(STAMP)  ## re-resolve requirements/*.txt from pyproject.toml (docs/install.md); commit them with the change
	$(PY) scripts/lock.py $(if $(TORCH_FIND_LINKS),--torch-find-links $(TORCH_FIND_LINKS))

test: $(STAMP)  ## CPU test suite (GPU tests are skipped)
	$(PY) -m pytest $(PYTEST_ARGS)

eval: $(STAMP)  ## the main job (default: the probe model × HieraVid 0.3 × the probe, paired with none, offline); ARGS="..." for more overrides
	$(PY) scripts/run_eval.py $(OVERRIDES) $(ARGS)

# `make sweep exp=ratio_sweep model=tiny_llava_ov`: model/benchmark/prune/ratio/budget/budget_measure narrow the
# experiment's grid.
GRID_OVERRIDES := $(foreach v,model benchmark prune ratio budget budget_measure results_dir,$(if $($(v)),$(v)=$($(v))))

sweep: $(STAMP)  ## run the cells of configs/experiment/$(exp).yaml that have no record (Hydra multirun; launcher=slurm)
	@test -n "$(exp)" || { echo "usage: make sweep exp=<name> (one of: $$(ls configs/experiment | sed 's/.yaml//' | xargs))"; exit 2; }
	$(PY) scripts/sweep.py $(exp) $(OVERRIDES) $(if $(launcher),--launcher $(launcher)) $(ARGS)

tables: $(STAMP)  ## rebuild tables from the records: summary.{csv,md}, or exp=<name> -> <name>.{md,csv,tex} + plots
	$(PY) scripts/make_tables.py $(if $(exp),--exp $(exp) $(GRID_OVERRIDES)) $(ARGS)

viz: $(STAMP)  ## token-selection picture of one sample (default tiny_llava_ov × prunevid); ARGS="prune=hieravid --doc 3"
	$(PY) scripts/viz.py $(ARGS)

lint: $(STAMP)  ## ruff lint + format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)  ## apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STAMP)  ## TTFT of every method vs none on an LLM of the backbone's shape (CPU default; BENCH_ARGS="--preset pllava")
	$(PY) scripts/bench.py $(BENCH_ARGS)

bench-prune: $(STAMP)  ## CPU time of the pre-LLM stages on PLLaVA and LLaVA-OV shapes
	$(PY) scripts/bench_prune.py $(BENCH_ARGS)

bench-eval: $(STAMP)  ## eval wall time with prefetch / decode cache on vs off: default eval and a 5-cell sweep (CPU)
	$(PY) scripts/bench_eval.py $(BENCH_ARGS)

probe-model: $(STAMP)  ## retrain the committed probe model (tests/fixtures/probe_llava_ov) from seeds; ~30 min on 2 cores
	$(PY) scripts/train_probe.py --out tests/fixtures/probe_llava_ov $(ARGS)

clean:  ## caches only; never touches results/
	rm -rf .pytest_cache .ruff_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
