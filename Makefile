# Entry points: `make demo`, `make test` and `make bench` (`make bench QUICK=1`: the small
# workloads, a few minutes). Each creates .venv when it is missing, installs torch first (pinned:
# an unpinned torch pulls a multi-GB CUDA build), then the project.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench bench-sketch mutate install clean dist dist-check

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash examples/demo.sh

test: $(STAMP)
	$(VENV)/bin/ruff format --check --quiet .
	$(VENV)/bin/ruff check --quiet .
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

# PYTHONPATH: the benchmark measures this checkout's fedbip, whatever the venv was installed from.
bench: $(STAMP)
	HF_HUB_OFFLINE=1 PYTHONPATH=$(CURDIR) $(PY) benchmarks/bench.py $(if $(QUICK),--quick)

# Sketched similarity against the exact cosine at 10 000 clients (QUICK=1: 1000 clients, a few minutes).
bench-sketch: $(STAMP)
	$(PY) benchmarks/sketch_error.py $(if $(QUICK),--quick)

# Mutation testing of the core maths with cosmic-ray (its own venv and a copy of the code in .mutate/;
# hours for every module: MODULES=weights,similarity runs a part; JOBS=4 tests 4 mutants at once; RESUME=1
# continues the last session, its survivors run again against today's tests). Not part of `make test`.
mutate: $(STAMP)
	HF_HUB_OFFLINE=1 nice -n 10 $(PY) benchmarks/mutate.py $(if $(MODULES),--modules $(MODULES)) \
		$(if $(JOBS),--jobs $(JOBS)) $(if $(RESUME),--resume)

# A wheel and an sdist in dist/, checked by twine.
dist: $(STAMP)
	rm -rf dist
	$(PY) -m build --outdir dist .
	$(VENV)/bin/twine check --strict dist/*

# The wheel as a user gets it: a fresh virtualenv with only torch and the wheel (and its dependencies)
# installed, where `fedbip --help` answers and a tiny merge runs (.ci/run calls this after make test).
dist-check: dist
	rm -rf .dist-venv
	$(PYTHON) -m venv .dist-venv
	.dist-venv/bin/python -m pip install -q --upgrade pip
	.dist-venv/bin/python -m pip install -q torch==2.13.0
	.dist-venv/bin/python -m pip install -q dist/*.whl
	cd /tmp && $(CURDIR)/.dist-venv/bin/fedbip --help > /dev/null
	cd /tmp && $(CURDIR)/.dist-venv/bin/python $(CURDIR)/examples/tiny_merge.py
	rm -rf .dist-venv

clean:
	rm -rf $(VENV) .dist-venv dist demo-out .pytest_cache benchmarks/.work .mutate
