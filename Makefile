# Convenience targets. `make demo` and `make test` each set up .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch, pinned so that pip does not fetch a multi-GB CUDA build;
# on a GPU machine install your own torch (>= 2.2) first and set TORCH= (empty).
TORCH ?= torch==2.13.0
# `make test` adds the test tools and the extras whose tests must run: TransformerLens 3, SAELens and
# nnsight (interp, ~1.0 GB), submitit (cluster) and Jupyter (notebook). TEST_EXTRAS=dev skips those tests
# (the SLURM ones also need root, to start a local cluster).
ALL_TEST_EXTRAS := dev,interp,cluster,notebook,tune
TEST_EXTRAS ?= $(ALL_TEST_EXTRAS)
# Every skip is listed (-rs); one that tests/allowed_skips.txt does not allow fails the run
# (tests/conftest.py), unless fewer extras were asked for: then they are only listed.
ALLOW_SKIPS := $(if $(filter $(ALL_TEST_EXTRAS),$(TEST_EXTRAS)),,NANOMARKOV_ALLOW_SKIPS=1)

# TransformerLens 4 cannot share $(VENV) with SAELens (which needs TransformerLens < 4): `make test-lens4`
# (which `make test` runs last) runs its tests, nnsight's and the tutorial notebook beside it, in a second venv: a copy of $(VENV) with SAELens out and the
# interp4 extra in (TransformerLens 3 -> 4). Copying keeps torch and the shared dependencies: seconds,
# where a fresh venv took minutes (BENCHMARKS.md); a fresh `pip install -e ".[interp4]"` passes the same tests.
VENV4 ?= .venv-lens4
LENS4_TESTS := $(wildcard tests/interp/test_bridge*.py) tests/interp/test_nnsight.py tests/test_notebook.py

.PHONY: install demo test test-lens4 bench grid-tiny grid-seed grid-status clean

# The package alone: enough for the demo, training, sweeps.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(if $(TORCH),$(PY) -m pip install $(TORCH))
	$(PY) -m pip install -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -e ".[$(TEST_EXTRAS)]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/nanomarkov demo

# With every extra, `make test` goes on to the TransformerLens 4 tests (test-lens4) once the main suite passes.
# One worker per core (pytest-xdist); --dist loadfile keeps a test file, and its module-scoped fixtures, on one worker.
TEST_WORKERS ?= auto
test: $(VENV)/.installed-test
	$(ALLOW_SKIPS) $(PY) -m pytest -q -rs -n $(TEST_WORKERS) --dist loadfile
	$(if $(ALLOW_SKIPS),,$(MAKE) test-lens4)

$(VENV4)/.installed-test: $(VENV)/.installed-test
	rm -rf $(VENV4)
	cp -a $(VENV) $(VENV4)
	rm -f $(VENV4)/.installed*
	$(VENV4)/bin/python -m pip uninstall -y sae-lens
	$(VENV4)/bin/python -m pip install -e ".[dev,interp4]"
	touch $@

test-lens4: $(VENV4)/.installed-test
	$(VENV4)/bin/python -m pytest -q -rs $(LENS4_TESTS)

# The seed's experiment grid (grids/seed.toml; hours on a CPU: JOBS=2 runs two at once).
JOBS ?= 1
SWEEP ?= sweeps/seed
grid-tiny: install
	$(VENV)/bin/nanomarkov sweep grids/tiny.toml --out sweeps/tiny

grid-seed: install
	$(VENV)/bin/nanomarkov sweep grids/seed.toml --out sweeps/seed --jobs $(JOBS)

grid-status: install
	$(VENV)/bin/nanomarkov sweep status $(SWEEP)

bench: $(VENV)/.installed-test
	$(PY) benchmarks/generate.py
	$(PY) benchmarks/train.py
	$(PY) benchmarks/evaluate.py
	$(PY) benchmarks/processes.py

clean:
	rm -rf data trainings sweeps runs
