"""TransformerLens 4 interop: a TransformerBridge with our logits for every preset, our activations at its
standard hook points, the head bias and RELU2 carried, clear refusals. Runs where TransformerLens 4 is
installed (the interp4 extra; CI's second virtualenv); tests/interp/test_lens.py covers 3.x."""

import dataclasses
import math

import pytest
import torch
from test_export import TL_MAJOR, VARIANTS, inputs, preset_config, trained_looking, write_ckpt

from nanomarkov import NanoMarkovError
from nanomarkov.config import PRESETS
from nanomarkov.interp.hf import export_hf
from nanomarkov.interp.lens import to_transformer_bridge, to_transformer_lens

pytest.importorskip("transformer_lens", reason='TransformerLens 4 is the interp4 extra: pip install -e ".[interp4]"')
if TL_MAJOR < 4:
    pytest.skip(
        "TransformerLens 3 is installed here: TransformerBridge needs 4.x (tests/interp/test_lens.py covers 3.x)",
        allow_module_level=True,
    )
from transformer_lens.model_bridge import TransformerBridge  # noqa: E402 (only once 4.x is known to be there)


def build(name, **changes):
    return trained_looking(dataclasses.replace(preset_config(name), **changes))


def both_logits(model, bridge, idx):
    with torch.no_grad():
        return model(idx)[0], bridge(idx)


# Every preset once; bias alternates so both settings meet attention, MLP-only and no-LayerNorm presets.
@pytest.mark.parametrize("name, bias", [(name, i % 2 == 1) for i, name in enumerate(PRESETS + VARIANTS)])
def test_logits_match_for_every_preset(name, bias):
    model = build(name, bias=bias)
    bridge = to_transformer_lens(model)
    assert isinstance(bridge, TransformerBridge) and not bridge.training
    ours, theirs = both_logits(model, bridge, inputs(model.config))
    assert torch.allclose(theirs, ours, rtol=0, atol=1e-4)
    # attn_only is the native model's own: blocks without MLP and ln2, not stand-ins.
    assert bridge.cfg.attn_only == model.config.attn_only
    has_mlp = any(".mlp." in n or ".ln2." in n for n in bridge.state_dict())
    assert has_mlp == (model.config.n_layer > 0 and not model.config.attn_only)  # MM-100's default has no block


def our_activations(model, idx):
    """What each block's attention and MLP add, and the stream after each block, from hooks on our GPT."""
    seen, handles = {}, []
    for i, block in enumerate(model.blocks):
        handles.append(block.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(f"resid_post{i}", out)))
        handles.append(block.mlp.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(f"mlp{i}", out)))
        if block.attn is not None:
            handles.append(block.attn.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(f"attn{i}", out)))
    with torch.no_grad():
        model(idx)
    for handle in handles:
        handle.remove()
    return seen


def attention_pattern_by_hand(model, idx):
    """Block 0's attention pattern (B, H, T, T) computed from our weights: softmax(q k^T / sqrt(d)) below the diagonal."""
    c, attn = model.config, model.blocks[0].attn
    T, D = idx.shape[1], c.n_embd // c.n_head
    with torch.no_grad():
        x = model.blocks[0].ln_1(model.wte(idx) + model.wpe.weight[:T])
        q, k, _ = attn.c_attn(x).split(c.n_embd, dim=2)
        q, k = (t.view(*idx.shape, c.n_head, D).transpose(1, 2) for t in (q, k))
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(D)
        return scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -math.inf).softmax(-1)


def test_run_with_cache_holds_our_activations_at_the_standard_hook_points():
    model = build("seed", bias=True)  # two blocks of attention and MLP, LayerNorm, positions, 8 heads
    bridge = to_transformer_bridge(model)
    idx = inputs(model.config)
    ours = our_activations(model, idx)
    logits, cache = bridge.run_with_cache(idx)
    assert torch.allclose(logits, model(idx)[0], rtol=0, atol=1e-4)
    assert torch.equal(cache["hook_embed"], model.wte.weight[idx])
    assert torch.allclose(cache["blocks.0.attn.hook_pattern"], attention_pattern_by_hand(model, idx), atol=1e-5)
    for i in range(model.config.n_layer):
        assert torch.allclose(cache[f"blocks.{i}.hook_resid_post"], ours[f"resid_post{i}"], rtol=0, atol=1e-4)
        assert torch.allclose(cache[f"blocks.{i}.hook_attn_out"], ours[f"attn{i}"], rtol=0, atol=1e-4)
        assert torch.allclose(cache[f"blocks.{i}.hook_mlp_out"], ours[f"mlp{i}"], rtol=0, atol=1e-4)
    assert cache["blocks.1.mlp.hook_post"].shape == (*idx.shape, 4 * model.config.n_embd)


def test_a_hook_that_removes_the_mlp_changes_the_logits_as_removing_ours_does():
    model = build("c1", bias=True)
    bridge = to_transformer_bridge(model)
    idx = inputs(model.config)
    handle = model.blocks[0].mlp.register_forward_hook(lambda m, a, out: torch.zeros_like(out))
    with torch.no_grad():
        ablated = model(idx)[0]
    handle.remove()
    zero = bridge.run_with_hooks(idx, fwd_hooks=[("blocks.0.hook_mlp_out", lambda out, hook: torch.zeros_like(out))])
    assert torch.allclose(zero, ablated, rtol=0, atol=1e-4)
    assert not torch.allclose(zero, model(idx)[0], rtol=0, atol=1e-2)  # the ablation did something


def test_mlp_only_attention_writes_exact_zeros_and_stand_ins_are_frozen():
    model = build("c12")  # no LayerNorm, no positions, MLP-only, one-hot embedding, identity W_in
    bridge = to_transformer_bridge(model)
    _, cache = bridge.run_with_cache(inputs(model.config))
    assert not cache["blocks.0.hook_attn_out"].any()
    tensors = bridge.state_dict(keep_vars=True)
    for name in ["embed.weight", "pos_embed.weight", "blocks.0.attn.o.weight", "blocks.0.mlp.in.weight"]:
        assert not tensors[name].requires_grad, name
    assert tensors["blocks.0.mlp.out.weight"].requires_grad  # what c12 trains
    assert torch.equal(tensors["embed.weight"], torch.eye(*tensors["embed.weight"].shape))


@pytest.mark.parametrize("name", ["c1", "c12", "default"])  # tied; tied to a frozen one-hot table; untied
def test_the_head_bias_is_a_trainable_b_U(name):
    model = build(name, lm_head_bias=True)
    bridge = to_transformer_bridge(model)
    assert torch.equal(bridge.unembed.b_U, model.lm_head.bias)
    assert bridge.state_dict(keep_vars=True)["unembed.bias"].requires_grad
    ours, theirs = both_logits(model, bridge, inputs(model.config))
    assert torch.allclose(theirs, ours, rtol=0, atol=1e-4)
    plain = to_transformer_bridge(build(name))
    assert not plain.unembed.b_U.any() and not plain.state_dict(keep_vars=True)["unembed.bias"].requires_grad


def test_relu2_and_no_blocks_are_carried_and_relu3_is_refused(tmp_path):
    for model in (build("c2", mlp_filter="RELU2", bias=True), build("c8", n_layer=0, lm_head_bias=True)):
        bridge = to_transformer_bridge(write_ckpt(model, tmp_path / "ckpt.pt"))  # from a checkpoint too
        ours, theirs = both_logits(model, bridge, inputs(model.config))
        assert torch.allclose(theirs, ours, rtol=0, atol=1e-4)
    assert bridge.cfg.n_layers == 0
    with pytest.raises(NanoMarkovError, match="mlp_filter=RELU3 has no TransformerLens equivalent"):
        to_transformer_bridge(build("c2", mlp_filter="RELU3"))
    to_transformer_bridge(build("c2+attn_only", mlp_filter="RELU3"))  # no MLP applies it: same logits
    with pytest.raises(NanoMarkovError, match="alibi=True is not carried into a TransformerBridge"):
        to_transformer_bridge(build("c2", alibi=True, pos_ape=False))
    with pytest.raises(NanoMarkovError, match="alibi=True beside pos_ape=True has no TransformerLens equivalent"):
        to_transformer_bridge(build("c2", alibi=True))
    with pytest.raises(NanoMarkovError, match="float32"):
        to_transformer_bridge(build("c1").to(torch.bfloat16))


def test_boot_transformers_opens_the_hugging_face_export(tmp_path):
    model = build("c1", bias=True)
    export_hf(model, tmp_path / "hf")
    bridge = TransformerBridge.boot_transformers(str(tmp_path / "hf"))
    ours, theirs = both_logits(model, bridge, inputs(model.config))
    assert torch.allclose(theirs, ours, rtol=0, atol=1e-4)
    _, cache = bridge.run_with_cache(inputs(model.config))
    assert cache["blocks.0.attn.hook_pattern"].shape == (4, 2, 16, 16)
