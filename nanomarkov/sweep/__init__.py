"""Grids of training runs: expanded from a TOML file, run locally or on SLURM, and watched."""

from nanomarkov.sweep.run import expand_grid, load_grid, run_one, run_sweep

__all__ = ["expand_grid", "load_grid", "run_one", "run_sweep"]
