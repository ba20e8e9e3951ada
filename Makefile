# Each target sets itself up on a fresh machine: a virtualenv, torch==2.13.0 (never a newer one),
# then this package with its test extras. Override TORCH to pick another build, e.g.
#   make demo TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.metavae-installed

DOCS_STAMP := $(VENV)/.metavae-docs-installed

.PHONY: demo install test docs bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)  ## .venv with torch and metavae (its test extras include the data extras: pandas, pyarrow)

demo: $(STAMP)  ## the main job: mixture-of-Gaussians clustering, a few minutes on 2 CPU cores
	$(BIN)/metavae run mog

test: $(STAMP)  ## the test suite (offline, CPU)
	$(BIN)/python -m pytest

$(DOCS_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e ".[docs]"
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)  ## the documentation site (MkDocs, Material, mkdocstrings) into site/, warnings are errors
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -d site

clean:
	rm -rf $(VENV) runs site .pytest_cache

BENCH ?=
bench: $(STAMP)  ## training-step benchmarks vs the machine's fp32 and bf16 matmul peaks -> benchmarks/results.json
	$(BIN)/python benchmarks/bench.py $(BENCH)  # e.g. make bench BENCH="--only mlp,conv --steps 5"
