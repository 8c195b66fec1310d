"""Grids of training runs: expanded from a TOML file, run locally or on SLURM, and watched.

Imports point one way: run.py (the sweep) -> local.py, slurm.py (launchers, handed what they
run), status.py -> manifest.py (sweep.json) -> grid.py (the grid and its run specs).
"""

from nanomarkov.sweep.grid import expand_grid, load_grid
from nanomarkov.sweep.run import check_launcher, run_one, run_sweep
from nanomarkov.sweep.slurm import require_slurm

__all__ = ["check_launcher", "expand_grid", "load_grid", "require_slurm", "run_one", "run_sweep"]
