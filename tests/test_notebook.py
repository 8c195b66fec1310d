"""examples/tutorial.ipynb: stored without outputs, and it runs top to bottom (nbclient, a fresh kernel)."""

import json
import re
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "tutorial.ipynb"


def test_the_notebook_is_stored_without_outputs():
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    code = [cell for cell in cells if cell["cell_type"] == "code"]
    assert code, "the tutorial has no code"
    for number, cell in enumerate(code, start=1):
        assert cell["outputs"] == [] and cell["execution_count"] is None, (
            f"code cell {number} of {NOTEBOOK.name} was saved with its outputs: clear them before committing "
            "(Jupyter: Edit > Clear outputs of all cells)"
        )


def test_the_notebook_runs_top_to_bottom(tmp_path):
    nbclient = pytest.importorskip("nbclient", reason='the notebook extra runs it: pip install -e ".[notebook]"')
    nbformat = pytest.importorskip("nbformat", reason='the notebook extra runs it: pip install -e ".[notebook]"')
    pytest.importorskip("ipykernel", reason='the notebook extra runs it: pip install -e ".[notebook]"')
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # A cell that raises fails here with its traceback; the notebook writes under tmp_path.
    nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
    ).execute()
    text = "\n".join(
        output.get("text", "") + "".join(output.get("data", {}).get("text/plain", ""))
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    )
    for name in (
        "data/meta.json",
        "run/ckpt.pt",
        "run/eval.json",
        "run/learning_curve.png",
        "run/transition_matrix.png",
    ):
        assert (tmp_path / "tutorial_out" / name).is_file(), name
    # The short training got close to the chain, and the patch moved the prediction to row s'.
    whole = float(re.search(r"whole model mean KL\(P_s \|\| q_s\) = ([0-9.]+)", text).group(1))
    assert whole < 0.05
    to_source, to_base = map(
        float, re.search(r"mean KL to row s' = ([0-9.]+) nats, to row s = ([0-9.]+)", text).groups()
    )
    assert to_source < 0.05 < to_base
    assert float(re.search(r"max \|logit - ours\| = ([0-9.e+-]+)", text).group(1)) <= 1e-4
