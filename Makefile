# p2pedge: `make demo` sets everything up and runs the main job; `make test` sets up and tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MODEL_STAMP := .cache/models/.complete

.PHONY: chromium jsinterop netns-tools venv model demo test test-fast lint docs bench clean llamacpp llamacpp-rpc fuzz

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

test: venv model jsinterop chromium netns-tools
	$(PY) -m pytest -q -p no:randomly

# nftables and miniupnpd from Debian's packages, for the NAT and UPnP namespace tests of
# tests/reach (as root)
netns-tools:
	@command -v nft >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		export DEBIAN_FRONTEND=noninteractive && \
		{ apt-get install -y -q --no-install-recommends nftables || \
		  { apt-get update -q && apt-get install -y -q --no-install-recommends nftables; }; }; } || \
		echo "nftables not installed (needs root and apt-get): the NAT tests will be skipped"
	@test -x /usr/sbin/miniupnpd || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		export DEBIAN_FRONTEND=noninteractive && \
		{ apt-get install -y -q --no-install-recommends miniupnpd-nftables || \
		  { apt-get update -q && apt-get install -y -q --no-install-recommends miniupnpd-nftables; }; }; } || \
		echo "miniupnpd not installed (needs root and apt-get): the UPnP test will be skipped"

# headless Chromium from Debian's packages, for the swarm page's browser test (as root)
chromium:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		export DEBIAN_FRONTEND=noninteractive && \
		{ apt-get install -y -q --no-install-recommends chromium || \
		  { apt-get update -q && apt-get install -y -q --no-install-recommends chromium; }; }; } || \
		echo "chromium not installed (needs root and apt-get): the swarm page test will be skipped"

# the js-libp2p peer of tests/interop, at the versions pinned in its package.json
JSINTEROP := .cache/jsinterop
jsinterop: $(JSINTEROP)/.installed

$(JSINTEROP)/.installed: tests/interop/package.json
	@if command -v npm >/dev/null; then \
		mkdir -p $(JSINTEROP) && cp tests/interop/package.json $(JSINTEROP)/ && \
		cd $(JSINTEROP) && npm install --no-audit --no-fund --loglevel=error && touch .installed; \
	else echo "npm not found: the js-libp2p interop test will be skipped"; fi

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

# llama.cpp's RPC backend (rpc-server processes plus a client with --rpc) for benchmarks/big.py,
# from the same source, in its own build dir so the plain build above stays as it is.
LLAMA_RPC_BUILD := $(LLAMACPP)/build-rpc
LLAMA_RPC_SERVER := $(LLAMA_RPC_BUILD)/bin/rpc-server

llamacpp-rpc: $(LLAMA_RPC_SERVER)
	@echo "run: LLAMACPP_RPC_BIN=$(abspath $(LLAMA_RPC_BUILD)/bin) $(PY) benchmarks/big.py"

$(LLAMA_RPC_SERVER): $(STAMP)
	mkdir -p $(LLAMACPP)
	test -f $(LLAMACPP)/llama_cpp_python-$(LLAMACPP_VERSION).tar.gz || $(PY) -m pip download \
		--no-deps --no-binary :all: llama-cpp-python==$(LLAMACPP_VERSION) -d $(LLAMACPP)
	test -d $(LLAMACPP_SRC) || tar -xzf $(LLAMACPP)/llama_cpp_python-$(LLAMACPP_VERSION).tar.gz \
		-C $(LLAMACPP)
	cmake -S $(LLAMACPP_SRC) -B $(LLAMA_RPC_BUILD) $(LLAMACPP_FLAGS) -DBUILD_SHARED_LIBS=OFF -DGGML_RPC=ON
	nice cmake --build $(LLAMA_RPC_BUILD) --target ggml-rpc-server llama-bench llama-completion \
		-j $$(nproc)
	cp $(LLAMA_RPC_BUILD)/bin/ggml-rpc-server $(LLAMA_RPC_SERVER)

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
