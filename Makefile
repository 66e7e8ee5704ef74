# `make demo` and `make test` create or reuse .venv and install what they need.
# On a CPU machine torch comes from the 2.13.0 CPU wheel (never a multi-GB CUDA build); where torch is
# already importable in .venv (for example a GPU machine with its own build) it is left alone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CORE := $(VENV)/.installed-core
TESTDEPS := $(VENV)/.installed-test
LINTDEPS := $(VENV)/.installed-lint

.PHONY: demo test test-slow lint bench gpu-validate clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# the runtime: torch, triton, safetensors, PyAV, and transformers for the umT5 text encoder
$(CORE): setup.py | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[text]"
	touch $(CORE)

# the test oracles (diffusers, transformers), export (onnx, onnxruntime, tritonclient), modelopt's ONNX PTQ
# (the `modelopt` extra: modelopt without its CUDA-only [onnx] extra) and the Triton server
# (nvidia-pytriton, --no-deps: its numpy<2 pin would downgrade numpy; the server's Python stub gets a
# numpy<2 of its own inside .venv)
$(TESTDEPS): $(CORE)
	$(PIP) install -q -e ".[text,test,export,eval,modelopt]"
	$(PIP) install -q --no-deps "nvidia-pytriton==0.7.0"
	$(VENV)/bin/anyid-rt serve --prepare
	touch $(TESTDEPS)

$(LINTDEPS): | $(PY)
	$(PIP) install -q "ruff==0.17.6"
	touch $(LINTDEPS)

lint: $(LINTDEPS)
	$(VENV)/bin/ruff check --no-cache .

demo: $(CORE)
	$(VENV)/bin/anyid-rt demo --out out/demo.mp4

# `slow`: the cross-compile sweep for sm80/sm89 and the sm90 backward (about 4 minutes on 2 cores); `make test-slow`
test: $(TESTDEPS)
	$(PY) -m pytest -q tests --benchmark-disable -m "not slow"

test-slow: $(TESTDEPS)
	$(PY) -m pytest -q tests --benchmark-disable -m slow

bench: $(TESTDEPS)
	$(PY) -m pytest -q tests/test_bench_cpu.py --benchmark-only

# every GPU number in one budgeted run (bench/gpu_validate.py): a JSON and a log in OUT
gpu-validate: $(CORE)
	$(PY) bench/gpu_validate.py --out $${OUT:-bench/results/gpu_validate}

clean:
	rm -rf $(VENV) out build *.egg-info
