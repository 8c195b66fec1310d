"""Hugging Face export: a GPT-2 folder that transformers loads with no custom code and our logits, absent
parts as exact zeros, the exact activation, clear refusals of what GPT-2 cannot hold, atomic writes."""

import dataclasses
import json
import os
import stat
import sys

import pytest
import torch
from test_export import VARIANTS, inputs, preset_config, trained_looking, write_ckpt

from nanomarkov import NanoMarkovError
from nanomarkov.cli import main
from nanomarkov.config import PRESETS
from nanomarkov.interp.hf import export_hf, to_hf_gpt2

transformers = pytest.importorskip("transformers", reason='transformers is the hf extra: pip install -e ".[hf]"')

WITH_LAYERNORM = [name for name in PRESETS + VARIANTS if preset_config(name).use_ln]
WITHOUT_LAYERNORM = [name for name in PRESETS if not preset_config(name).use_ln]


def build(name, **changes):
    return trained_looking(dataclasses.replace(preset_config(name), **changes))


def loaded_logits(folder, idx):
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert type(hf).__name__ == "GPT2LMHeadModel"
    with torch.no_grad():
        return hf(idx).logits


# bias alternates so both settings meet attention, MLP-only, one-hot and no-position presets.
@pytest.mark.parametrize("name, bias", [(name, i % 2 == 0) for i, name in enumerate(WITH_LAYERNORM)])
def test_every_preset_with_layernorm_loads_in_transformers_with_our_logits(name, bias, tmp_path):
    model = build(name, bias=bias)
    export_hf(write_ckpt(model, tmp_path / "ckpt.pt"), tmp_path / "hf")
    idx = inputs(model.config)
    with torch.no_grad():
        assert torch.allclose(loaded_logits(tmp_path / "hf", idx), model(idx)[0], rtol=0, atol=1e-4)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    c = model.config
    assert config["model_type"] == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"]
    assert (config["vocab_size"], config["n_positions"], config["bos_token_id"]) == (101, c.block_size, 100)
    assert config["nanomarkov"]["gpt_config"] == dataclasses.asdict(c)
    assert config["nanomarkov"]["source"]["checkpoint"] == str(tmp_path / "ckpt.pt")
    assert not list(tmp_path.glob("*partial*"))


def test_the_activations_are_transformers_exact_ones():
    x = torch.linspace(-6, 6, 1201)
    for name, ours in [("GELU", torch.nn.functional.gelu(x)), ("RELU", x.relu()), ("RELU2", x.relu() ** 2)]:
        hf = to_hf_gpt2(build("c2", mlp_filter=name, bias=True))
        assert torch.equal(transformers.activations.ACT2FN[hf.config.activation_function](x), ours), name
    # GPT-2's default, the tanh approximation, is not ours: mapping GELU to it would be wrong.
    assert not torch.equal(transformers.activations.ACT2FN["gelu_new"](x), torch.nn.functional.gelu(x))


def test_absent_parts_are_exact_zeros():
    model = build("c5")  # MLP-only, one-hot embedding, no biases
    hf = to_hf_gpt2(build("c7"))  # no positions
    assert not hf.transformer.wpe.weight.any()
    hf = to_hf_gpt2(model)
    attn = hf.transformer.h[0].attn
    assert not attn.c_attn.weight.any() and not attn.c_proj.weight.any() and not attn.c_proj.bias.any()
    assert not hf.transformer.h[0].mlp.c_fc.bias.any() and not hf.transformer.ln_f.bias.any()
    assert (
        torch.equal(hf.transformer.wte.weight, torch.eye(101, 101)) and hf.lm_head.weight is hf.transformer.wte.weight
    )
    written = []
    attn.register_forward_hook(lambda module, args, out: written.append(out[0]))
    with torch.no_grad():
        hf(inputs(model.config))
    assert not written[0].any()  # the stand-in attention adds exactly nothing
    model = build("c2+attn_only", bias=True, mlp_filter="RELU3")  # an activation no MLP applies: accepted
    hf = to_hf_gpt2(model)
    mlp = hf.transformer.h[0].mlp
    assert hf.config.n_inner == 1 and not mlp.c_proj.weight.any() and not mlp.c_proj.bias.any()
    mlp.register_forward_hook(lambda module, args, out: written.append(out))
    with torch.no_grad():
        hf(inputs(model.config))
    assert not written[-1].any()  # nor does the stand-in MLP of an attention-only model


def test_no_blocks_and_an_untied_head_load_too_with_the_modes_the_umask_gives(tmp_path):
    for model in (build("c1", n_layer=0), build("default", lm_head_tied=False, mlp_filter="RELU2")):
        old_umask = os.umask(0o027)
        try:
            export_hf(model, tmp_path / "hf")  # the second replaces the first
        finally:
            os.umask(old_umask)
        assert stat.S_IMODE((tmp_path / "hf").stat().st_mode) == 0o750
        modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in (tmp_path / "hf").iterdir()}
        assert "model.safetensors" in modes and set(modes.values()) == {0o640}, modes  # transformers': 0600
        idx = inputs(model.config)
        with torch.no_grad():
            assert torch.allclose(loaded_logits(tmp_path / "hf", idx), model(idx)[0], rtol=0, atol=1e-4)


def test_weights_that_do_not_fit_on_the_disk_are_one_error_and_the_previous_export_stays(tmp_path, monkeypatch):
    from safetensors import SafetensorError
    from transformers import GPT2LMHeadModel

    export_hf(build("c1", n_layer=0), tmp_path / "hf")
    before = {path.name: path.read_bytes() for path in (tmp_path / "hf").iterdir()}

    def full_disk(self, folder, **_):  # how safetensors reports it: its own error, not an OSError
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(GPT2LMHeadModel, "save_pretrained", full_disk)
    with pytest.raises(NanoMarkovError, match=r"cannot write the export to .*hf \(No space left on device"):
        export_hf(build("c1", n_layer=0), tmp_path / "hf")
    assert {path.name: path.read_bytes() for path in (tmp_path / "hf").iterdir()} == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["hf"]  # no build left beside it


def test_an_export_through_a_link_keeps_the_link_and_no_one_elses_partial_folder_is_touched(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "hf").symlink_to("real")
    (tmp_path / "real.partial").mkdir()  # a folder of the user's, named as an unfinished build once was
    (tmp_path / "real.partial" / "mine.txt").write_text("mine")
    (tmp_path / ".real.partial-killed").mkdir()  # the build an export killed midway left: removed by the next
    assert export_hf(build("c1", n_layer=0), tmp_path / "hf") == tmp_path / "real"
    assert (tmp_path / "hf").is_symlink() and (tmp_path / "real" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "real", "real.partial"]
    assert (tmp_path / "real.partial" / "mine.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "model, message",
    [(build(name), "use_ln=False") for name in WITHOUT_LAYERNORM[:1]]
    + [(build("c1", lm_head_bias=True), "lm_head_bias=True"), (build("c2", mlp_filter="RELU3"), "mlp_filter=RELU3")]
    + [(build("c2", alibi=True), "alibi=True")],
    ids=["no-layernorm", "head-bias", "relu3", "alibi"],
)
def test_what_gpt2_cannot_hold_is_refused_and_nothing_is_written(model, message, tmp_path):
    with pytest.raises(NanoMarkovError, match=f"GPT-2 .* cannot express this model: {message}"):
        export_hf(model, tmp_path / "hf")
    assert not list(tmp_path.iterdir())


def test_cli_export_hf_and_its_one_line_errors(tmp_path, capsys):
    model = build("c1", bias=True)
    ckpt = write_ckpt(model, tmp_path / "ckpt.pt")
    assert main(["export", str(ckpt), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    printed = capsys.readouterr()
    assert "AutoModelForCausalLM.from_pretrained" in printed.out
    assert printed.err == ""  # no "Writing model shards" bar from transformers
    assert transformers.utils.logging.is_progress_bar_enabled()  # its global setting put back
    idx = inputs(model.config)
    with torch.no_grad():
        assert torch.allclose(loaded_logits(tmp_path / "hf", idx), model(idx)[0], rtol=0, atol=1e-4)
    capsys.readouterr()  # transformers' own "Loading weights" bar of the check above
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    for ckpt_path, out, needle in [
        (write_ckpt(build("c12"), tmp_path / "c12.pt"), "other", "use_ln=False"),
        (ckpt, "mine", "holds files that are not a Hugging Face export (notes.txt)"),
    ]:
        assert main(["export", str(ckpt_path), "--format", "hf", "--out", str(tmp_path / out)]) == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_a_missing_transformers_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # what an uninstalled package looks like
    with pytest.raises(NanoMarkovError, match=r'pip install -e "\.\[hf\]"'):
        to_hf_gpt2(build("c1"))
    with pytest.raises(NanoMarkovError, match="float32"):
        to_hf_gpt2(build("c1").to(torch.bfloat16))
