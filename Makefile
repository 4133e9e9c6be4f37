# Two commands do all set-up on a fresh machine:
#   make demo   -> creates .venv if needed, runs the whole analysis on a built-in demo slide
#   make test   -> creates .venv if needed, runs the test suite (what CI runs)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0

.PHONY: demo test test-hostile lint typecheck check bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# CPU torch comes from the local wheel (PIP_FIND_LINKS) or PyTorch's CPU index; never a CUDA
	# build in CI. On a machine with an NVIDIA GPU, plain PyPI torch (CUDA) is taken instead.
	if command -v nvidia-smi >/dev/null 2>&1 && [ -z "$$CI" ]; then \
	  $(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)"; \
	else \
	  $(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)" || \
	  $(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)" --index-url https://download.pytorch.org/whl/cpu; \
	fi
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/slidestream demo --out demo-output

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q

# The fault-injection suite of issue 21 (slow: real CLI processes, signals, a database outage;
# about 4 min on 2 cores). CI runs it after `make test`.
test-hostile: $(STAMP)
	$(BIN)/python -m pytest -n 0 -q -m slow tests/integration/test_hostile_cli.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python tools/lint_imports.py

typecheck: $(STAMP)
	$(BIN)/python tools/typecheck.py

check: lint typecheck test

clean:
	rm -rf $(VENV) build dist *.egg-info .mypy_cache .pytest_cache .ruff_cache
