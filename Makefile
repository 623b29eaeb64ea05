# `make serve` runs the MONAI Label server on the embedded sample data; `make test` runs the tests
# that CI runs (all but those marked slow); `make test-all` runs every test.
# Both set up .venv on first use. On a GPU machine: make install CONSTRAINTS=constraints-gpu.txt
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONSTRAINTS ?= constraints.txt
HOST ?= 127.0.0.1
PORT ?= 8000
WORK ?= work
STUDIES ?= $(WORK)/studies
PIP := $(PY) -m pip --disable-pip-version-check

.PHONY: install serve test test-all sample-data clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS) requirements-app.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c $(CONSTRAINTS) -r requirements-app.txt -e ".[test]"
	# monailabel without its metadata's torchvision/sam2 (see requirements-app.txt)
	$(PIP) install -q -c $(CONSTRAINTS) --no-deps "monailabel>=0.8.5"
	touch $@

serve: install
	$(PY) -m busi_monai.serve --studies $(STUDIES) --host $(HOST) --port $(PORT)

test: install
	$(PY) -m pytest -q -m "not slow"

test-all: install
	$(PY) -m pytest -q

sample-data: install
	rm -rf sample-data/benign sample-data/malignant sample-data/normal
	$(VENV)/bin/busi-monai synth --out sample-data --count 40 --seed 0

clean:
	rm -rf $(WORK) .pytest_cache
