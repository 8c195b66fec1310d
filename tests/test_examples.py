"""The examples run end to end (shorter training) and print what the probes compute."""
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import nanomarkov
from nanomarkov import probes
from nanomarkov.data import load_dataset

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _printed(stdout, label):
    match = re.search(rf"^{re.escape(label)}.*= ([0-9.]+) nats$", stdout, re.MULTILINE)
    assert match, f"{label!r} not in:\n{stdout}"
    return float(match.group(1))


def test_mm10_interpretability_runs_and_prints_the_probes(tmp_path):
    out = tmp_path / "example"
    result = subprocess.run([sys.executable, str(EXAMPLES / "mm10_interpretability.py"), str(out), "--max_iters", "40"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("transition_readout.png", "direct_path.png", "logit_lens.png", "attention_summary.png",
                 "export/model.safetensors", "export/config.json", "run/ckpt.pt", "data/meta.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert not (tmp_path / "examples_out").exists()  # everything went where it was told

    # The printed numbers are the probes' own, recomputed here from the exported model.
    model, data = nanomarkov.load(out / "export"), load_dataset(out / "data")
    whole = probes.transition_readout(model, data.chain)["kl"].mean()
    direct = probes.direct_path(model, data.chain)["kl"].mean()
    lens = probes.logit_lens(model, data.chain, data.val[:200])
    assert _printed(result.stdout, "whole model") == pytest.approx(whole, abs=1e-6)
    assert _printed(result.stdout, "direct path") == pytest.approx(direct, abs=1e-6)
    for layer, kl in zip(lens["layers"], lens["kl_to_truth"]):
        assert _printed(result.stdout, f"logit lens   after {layer} ") == pytest.approx(kl, abs=1e-6)
    # The last lens stream is the whole model's output, so its KL to the truth is finite and positive.
    assert np.isfinite(lens["kl_to_truth"]).all() and lens["kl_to_truth"][-1] > 0
