# `make serve` runs the MONAI Label server on the embedded sample data; `make test` runs the tests
# that CI runs (all but those marked slow); `make test-all` runs every test.
# Both set up .venv on first use. On a GPU machine: make install CONSTRAINTS=constraints-gpu.txt
# Without internet: `make wheelhouse` where pip works, carry the folder, `make install WHEELHOUSE=DIR`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONSTRAINTS ?= constraints.txt
HOST ?= 127.0.0.1
PORT ?= 8000
WORK ?= work
STUDIES ?= $(WORK)/studies
PIP := $(PY) -m pip --disable-pip-version-check

.PHONY: install serve test test-all sample-data clean wheelhouse

# The wheelhouse: the exact pins of requirements-wheelhouse*.txt as binary wheels for the
# target's Python(s) (PYVER="3.10 3.12" for several) and manylinux x86_64; ITK=0 leaves ITK out.
WHEELHOUSE_OUT ?= wheelhouse
PYVER ?= 3.11
PLATFORMS ?= manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_5_x86_64 manylinux1_x86_64
ITK ?= 1
WH_LISTS := requirements-wheelhouse.txt $(if $(filter 1,$(ITK)),requirements-wheelhouse-itk.txt)

wheelhouse:
	mkdir -p $(WHEELHOUSE_OUT)
	# Lines marked "# sdist" have no wheel on PyPI: built here (pure Python), since sdists cannot be built offline.
	cat $(WH_LISTS) | grep -v '# sdist' > $(WHEELHOUSE_OUT)/.binary.txt
	cat $(WH_LISTS) | grep '# sdist' | sed 's/#.*//' > $(WHEELHOUSE_OUT)/.sdist.txt
	for v in $(PYVER); do \
	  $(PYTHON) -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --implementation cp \
	    --python-version $$v $(addprefix --platform ,$(PLATFORMS)) -d $(WHEELHOUSE_OUT) -r $(WHEELHOUSE_OUT)/.binary.txt || exit 1; \
	done
	$(PYTHON) -m pip wheel -q --disable-pip-version-check --no-deps -w $(WHEELHOUSE_OUT) -r $(WHEELHOUSE_OUT)/.sdist.txt
	rm -f $(WHEELHOUSE_OUT)/.binary.txt $(WHEELHOUSE_OUT)/.sdist.txt
	@du -sh $(WHEELHOUSE_OUT); ls $(WHEELHOUSE_OUT)/*.whl | wc -l

install: $(VENV)/.installed

ifdef WHEELHOUSE
# Offline: nothing but DIR, every package with --no-deps from the exact pins. torch, numpy and the
# rest of $(PYTHON)'s packages (MONAI and ITK too, where it has them) are not reinstalled: a new
# venv sees them through a .pth file, and the venv's own packages come first.
$(VENV)/.installed: pyproject.toml requirements-wheelhouse.txt requirements-wheelhouse-itk.txt
	test -x $(PY) || { $(PYTHON) -m venv $(VENV) && $(PYTHON) -c "import sys; print('\n'.join(p for p in sys.path if p.endswith(('site-packages', 'dist-packages'))))" > "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_base_python.pth"; }
	$(PY) -c "import torch" || { echo "no torch in $(PY): this wheelhouse brings none; install PyTorch first" >&2; exit 1; }
	$(PY) -c "import monai" 2>/dev/null && skip='^(monai)=='; \
	if ! $(PY) -c "import itk" 2>/dev/null && ls $(WHEELHOUSE)/itk_core-* > /dev/null 2>&1; then itk=requirements-wheelhouse-itk.txt; fi; \
	cat requirements-wheelhouse.txt $$itk | sed 's/#.*//' | grep -Ev "$${skip:-^$$}" | grep . > $(VENV)/.wheelhouse-reqs.txt
	$(PIP) install -q --no-index --find-links $(WHEELHOUSE) --no-deps -r $(VENV)/.wheelhouse-reqs.txt
	$(PIP) install -q --no-index --find-links $(WHEELHOUSE) --no-deps -e .
	$(PY) -c "import monailabel, monai, busi_monai.cli; from busi_monai.data.io import itk_backend; itk_backend()" || { echo "the app does not import: a package is missing from $(WHEELHOUSE) and $(PYTHON)" >&2; exit 1; }
	touch $@
else
$(VENV)/.installed: pyproject.toml $(CONSTRAINTS) requirements-app.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c $(CONSTRAINTS) -r requirements-app.txt -e ".[test]"
	# monailabel without its metadata's torchvision/sam2 (see requirements-app.txt)
	$(PIP) install -q -c $(CONSTRAINTS) --no-deps "monailabel>=0.8.5"
	touch $@
endif

serve: install
	$(PY) -m busi_monai.serve --studies $(STUDIES) --host $(HOST) --port $(PORT)

# `make test ISA=avx2` runs the suite as a CPU without AVX-512 (and so without native bf16) would:
# PyTorch's and oneDNN's kernels limited to AVX2, which also makes training choose fp32.
ifeq ($(ISA),avx2)
test test-all: export ATEN_CPU_CAPABILITY := avx2
test test-all: export ONEDNN_MAX_CPU_ISA := AVX2
endif

# One pytest worker per core (pytest-xdist, where installed; an offline wheelhouse may lack it),
# a test file to a worker: the servers and trainings the tests start wait on subprocesses and
# sockets much of the time, so two workers on two cores cut the suite's time by a third or more.
# Each worker's torch gets its share of the cores (tests/conftest.py).
XDIST = $$($(PY) -c "import xdist; print('-n auto --dist loadfile --no-loadscope-reorder')" 2>/dev/null)

test: install
	$(PY) -m pytest -q -m "not slow" $(XDIST) --durations=15

test-all: install
	$(PY) -m pytest -q $(XDIST)

sample-data: install
	rm -rf sample-data/benign sample-data/malignant sample-data/normal
	$(VENV)/bin/busi-monai synth --out sample-data --count 40 --seed 0

clean:
	rm -rf $(WORK) .pytest_cache
