# The whole set-up on a fresh machine is `make demo` or `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q --disable-pip-version-check
STAMP  := $(VENV)/.sterling-installed

.PHONY: demo test test-unit test-cluster test-distributed bench lint clean

$(STAMP): pyproject.toml requirements/runtime.txt requirements/dev.txt requirements/dev-nodeps.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first and alone: a CPU build from local disk; anything unpinned would pull CUDA.
	$(PIP) torch==2.13.0
	$(PIP) -r requirements/runtime.txt -r requirements/dev.txt
	# torchrec declares the CUDA fbgemm-gpu; take the CPU build and skip its deps (docs/install.md).
	$(PIP) --no-deps fbgemm-gpu-cpu==1.8.0 torchrec==1.8.0
	$(PIP) --no-deps -r requirements/dev-nodeps.txt
	$(PIP) --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sterling demo

test: $(STAMP)
	$(PY) -m pytest -q tests

test-unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

bench: $(STAMP)
	$(VENV)/bin/sterling bench ann

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
