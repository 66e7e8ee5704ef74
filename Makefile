# `make demo` and `make test` create or reuse .venv and install what they need.
# On a CPU machine torch comes from the 2.13.0 CPU wheel (never a multi-GB CUDA build); where torch is
# already importable in .venv (for example a GPU machine with its own build) it is left alone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: demo test bench gpu-suite clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): setup.py | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[test,text]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/anyid-rt demo --out out/demo.mp4

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests --benchmark-disable

bench: $(STAMP)
	$(PY) -m pytest -q tests/test_bench_cpu.py --benchmark-only

gpu-suite: $(STAMP)
	bash bench/gpu_suite.sh

clean:
	rm -rf $(VENV) out build *.egg-info
