# Convenience targets. `make demo` and `make test` each set up .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch, pinned so that pip does not fetch a multi-GB CUDA build;
# on a GPU machine install your own torch (>= 2.2) first and set TORCH= (empty).
TORCH ?= torch==2.13.0
# interp (TransformerLens, ~0.6 GB) lets `make test` run the interop tests; EXTRAS=dev skips them.
# cluster (submitit) is the SLURM launcher's; its tests also need root for the local cluster.
EXTRAS ?= dev,interp,cluster

.PHONY: install demo test bench grid-tiny grid-seed grid-status clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(if $(TORCH),$(PY) -m pip install $(TORCH))
	$(PY) -m pip install -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/nanomarkov demo

test: install
	$(PY) -m pytest -q

# The seed's experiment grid (grids/seed.toml; hours on a CPU: JOBS=2 runs two at once).
JOBS ?= 1
SWEEP ?= sweeps/seed
grid-tiny: install
	$(VENV)/bin/nanomarkov sweep grids/tiny.toml --out sweeps/tiny

grid-seed: install
	$(VENV)/bin/nanomarkov sweep grids/seed.toml --out sweeps/seed --jobs $(JOBS)

grid-status: install
	$(VENV)/bin/nanomarkov sweep status $(SWEEP)

bench: install
	$(PY) benchmarks/generate.py
	$(PY) benchmarks/train.py
	$(PY) benchmarks/evaluate.py

clean:
	rm -rf data trainings sweeps runs
