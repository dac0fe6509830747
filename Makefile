# `make demo` and `make test` each install what they need, then run.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# torch is installed first when missing; the default is the light CPU build. For a CUDA build:
#   make demo TORCH=torch
TORCH ?= torch==2.13.0
# the default test run uses two worker processes (one per core on CI)
WORKERS ?= 2

.PHONY: install install-test demo test test-all bench clean

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH)"
	$(PIP) install -e .

install-test:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH)"
	$(PIP) install -e ".[test]"

demo: install
	$(PYTHON) -m scorekit demo --out_dir outputs/demo

test: install-test
	$(PYTHON) -m pytest -n $(WORKERS) -q

# everything, including the slow checks (about an hour on 2 cores)
test-all: install-test
	$(PYTHON) -m pytest -n $(WORKERS) -q -m ""

clean:
	rm -rf outputs build *.egg-info .pytest_cache
