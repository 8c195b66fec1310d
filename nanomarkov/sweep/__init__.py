"""Grids of training runs: expanded from a TOML file, run locally or on SLURM, and watched.

Imports point one way: run.py (the sweep) -> local.py, slurm.py (launchers, handed what they
run), status.py -> manifest.py (sweep.json) -> grid.py (the grid and its run specs).
"""

from nanomarkov.sweep.grid import expand_grid, load_grid
from nanomarkov.sweep.run import run_one, run_sweep

__all__ = ["expand_grid", "load_grid", "run_one", "run_sweep"]
