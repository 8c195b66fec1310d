"""The examples run end to end (shorter training) and print what the probes compute."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import nanomarkov
from nanomarkov.data import load_dataset
from nanomarkov.interp import readouts as probes

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _printed(stdout, label):
    match = re.search(rf"^{re.escape(label)}.*= (-?[0-9.e+-]+)( nats)?$", stdout, re.MULTILINE)
    assert match, f"{label!r} not in:\n{stdout}"
    return float(match.group(1))


def test_mm10_interpretability_runs_and_prints_the_probes(tmp_path):
    out = tmp_path / "example"
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "mm10_interpretability.py"), str(out), "--max_iters", "40"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for name in (
        "transition_readout.png",
        "direct_path.png",
        "logit_lens.png",
        "attention_summary.png",
        "export/model.safetensors",
        "export/config.json",
        "run/ckpt.pt",
        "data/meta.json",
    ):
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

    if importlib.util.find_spec("transformer_lens") is None:
        assert "TransformerLens part skipped" in result.stdout
        return
    assert _printed(result.stdout, "TransformerLens max |logit - ours|") <= 1e-4
    # The shares of the logit table, recomputed from our own model without TransformerLens: the state
    # token's stream is wte[s] + wpe[1] + the MLP's output (the default recipe has no attention).
    assert model.config.mlp_only and model.config.n_layer == 1
    k = data.chain.n_states
    prompts = torch.stack([torch.full((k,), k), torch.arange(k)], dim=1)
    written = {}
    model.blocks[0].mlp.register_forward_hook(lambda module, args, out: written.update(mlp=out[:, 1]))
    with torch.no_grad():
        model(prompts)
        pieces = {
            "embed": model.wte.weight[:k],
            "pos_embed": model.wpe.weight[1].expand(k, -1),
            "0_attn_out": torch.zeros(k, model.config.n_embd),
            "0_mlp_out": written["mlp"],
        }
        stream = sum(pieces.values())
        scale = (stream.var(-1, unbiased=False, keepdim=True) + model.ln_f.eps).sqrt()
        logit_parts = {
            name: ((x - x.mean(-1, keepdim=True)) / scale * model.ln_f.weight) @ model.lm_head.weight[:k].T
            for name, x in pieces.items()
        }
        logit_parts = {name: x - x.mean(-1, keepdim=True) for name, x in logit_parts.items()}
        table = sum(logit_parts.values())
    for name, part in logit_parts.items():
        share = ((part * table).sum() / table.square().sum()).item()
        assert _printed(result.stdout, f"TransformerLens {name} ") == pytest.approx(share, abs=1e-4)
