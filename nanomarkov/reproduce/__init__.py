"""Papers reproduced as files: papers/NAME.toml (paper.py) becomes a sweep at a scale (runner.py),
each run is measured (quantities.py) and the paper's claims are judged over seeds (claims.py) into
claims.json and report.md (report.md's text: report.py).

Imports point one way: runner.py -> report.py, paper.py -> claims.py -> quantities.py.
"""

from nanomarkov.reproduce.paper import paper_names, read_paper
from nanomarkov.reproduce.runner import claims_table, reproduce

__all__ = ["claims_table", "paper_names", "read_paper", "reproduce"]
