# p2pedge: `make demo` sets everything up and runs the main job; `make test` sets up and tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MODEL_STAMP := .cache/models/.complete

.PHONY: venv model demo test test-fast lint docs bench clean llamacpp fuzz

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,dev]'
	touch $(STAMP)

model: $(MODEL_STAMP)

$(MODEL_STAMP): $(STAMP) scripts/fetch_model.sh p2pedge/models/convert/layout.py
	PYTHON=$(PY) bash scripts/fetch_model.sh
	touch $(MODEL_STAMP)

demo: venv model
	$(PY) examples/demo.py

test: venv model
	$(PY) -m pytest -q -p no:randomly

test-fast: venv
	$(PY) -m pytest -q -m "not real_model and not slow"

lint: venv
	$(VENV)/bin/ruff check p2pedge simnet benchmarks examples tests fuzz
	$(VENV)/bin/ruff format --check p2pedge simnet benchmarks examples tests fuzz
	$(VENV)/bin/mypy --strict p2pedge

# the guide and API reference (docs/, mkdocs.yml) into build/site; any warning fails it
docs: venv
	$(VENV)/bin/mkdocs build --strict

bench: venv model
	$(PY) benchmarks/dht.py
	$(PY) benchmarks/decode.py
	$(PY) benchmarks/local.py
	$(PY) benchmarks/pull.py
	$(PY) benchmarks/hop_cold.py
	$(PY) benchmarks/kv_in_place.py
	$(PY) benchmarks/sharded.py
	$(PY) benchmarks/preload.py
	$(PY) benchmarks/transport.py
	$(PY) benchmarks/hostile.py
	$(PY) -m simnet.federated
	$(PY) -m simnet.push_latency
	$(PY) -m simnet.route_learning
	$(PY) -m simnet.slowdown

# 100,000 seeded inputs per decoder, each target in its own memory- and time-bounded
# process (fuzz/run.py); reproducers go to .cache/fuzz; the last line is crashes=N.
fuzz: venv
	nice $(PY) -m fuzz --inputs 100000 --jobs 2

clean:
	rm -rf $(VENV) .cache build *.egg-info

# llama.cpp for the side-by-side decode benchmarks only (not a dependency, not part of test/demo):
# the llama-cpp-python sdist bundles llama.cpp; build its llama-bench under .cache/llamacpp, and
# its Python binding over shared libraries (.cache/llamacpp/pyllama) for llama.cpp's own answer.
LLAMACPP_VERSION := 0.3.36
LLAMACPP := .cache/llamacpp
LLAMACPP_SRC := $(LLAMACPP)/llama_cpp_python-$(LLAMACPP_VERSION)/vendor/llama.cpp
LLAMA_BENCH_BIN := $(LLAMACPP)/build/bin/llama-bench
LLAMA_PY := $(LLAMACPP)/pyllama/llama_cpp/lib/libllama.so
LLAMACPP_FLAGS := -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF \
	-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF

llamacpp: $(LLAMA_BENCH_BIN) $(LLAMA_PY)
	@echo "run: LLAMA_BENCH=$(abspath $(LLAMA_BENCH_BIN)) $(PY) benchmarks/decode.py"

$(LLAMA_BENCH_BIN): $(STAMP)
	mkdir -p $(LLAMACPP)
	test -f $(LLAMACPP)/llama_cpp_python-$(LLAMACPP_VERSION).tar.gz || $(PY) -m pip download \
		--no-deps --no-binary :all: llama-cpp-python==$(LLAMACPP_VERSION) -d $(LLAMACPP)
	test -d $(LLAMACPP_SRC) || tar -xzf $(LLAMACPP)/llama_cpp_python-$(LLAMACPP_VERSION).tar.gz \
		-C $(LLAMACPP)
	cmake -S $(LLAMACPP_SRC) -B $(LLAMACPP)/build $(LLAMACPP_FLAGS) -DBUILD_SHARED_LIBS=OFF
	nice cmake --build $(LLAMACPP)/build --target llama-bench -j $$(nproc)

$(LLAMA_PY): $(LLAMA_BENCH_BIN)
	cmake -S $(LLAMACPP_SRC) -B $(LLAMACPP)/build-shared $(LLAMACPP_FLAGS) -DBUILD_SHARED_LIBS=ON \
		-DLLAMA_BUILD_TOOLS=OFF
	nice cmake --build $(LLAMACPP)/build-shared --target llama -j $$(nproc)
	rm -rf $(LLAMACPP)/pyllama
	mkdir -p $(LLAMACPP)/pyllama
	cp -r $(LLAMACPP)/llama_cpp_python-$(LLAMACPP_VERSION)/llama_cpp $(LLAMACPP)/pyllama/
	mkdir -p $(LLAMACPP)/pyllama/llama_cpp/lib
	cp -P $(LLAMACPP)/build-shared/bin/lib*.so* $(LLAMACPP)/pyllama/llama_cpp/lib/
	$(PY) -m pip install -q --no-deps --target $(LLAMACPP)/pyllama diskcache==5.6.3
