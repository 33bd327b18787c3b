# p2pedge: `make demo` sets everything up and runs the main job; `make test` sets up and tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MODEL_STAMP := .cache/models/.complete

.PHONY: venv model demo test test-fast lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,dev]'
	touch $(STAMP)

model: $(MODEL_STAMP)

$(MODEL_STAMP): $(STAMP) scripts/fetch_model.sh
	PYTHON=$(PY) bash scripts/fetch_model.sh
	touch $(MODEL_STAMP)

demo: venv model
	$(PY) examples/demo.py

test: venv model
	$(PY) -m pytest -q -p no:randomly

test-fast: venv
	$(PY) -m pytest -q -m "not real_model and not slow"

lint: venv
	$(VENV)/bin/ruff check p2pedge simnet benchmarks examples tests
	$(VENV)/bin/ruff format --check p2pedge simnet benchmarks examples tests
	$(VENV)/bin/mypy --strict p2pedge

bench: venv model
	$(PY) benchmarks/dht.py
	$(PY) benchmarks/decode.py
	$(PY) benchmarks/local.py
	$(PY) benchmarks/pull.py
	$(PY) benchmarks/sharded.py
	$(PY) benchmarks/preload.py
	$(PY) -m simnet.federated

clean:
	rm -rf $(VENV) .cache build *.egg-info
