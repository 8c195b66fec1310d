"""TransformerLens interop: same logits for every preset, exact round trip, clear refusals, a usable cache."""

import dataclasses
import sys

import pytest
import torch
from test_export import TL_MAJOR, VARIANTS, inputs, preset_config, trained_looking, write_ckpt

from nanomarkov import NanoMarkovError
from nanomarkov.checkpoint import export_safetensors
from nanomarkov.config import PRESETS
from nanomarkov.interp.lens import from_hooked_transformer, to_hooked_transformer, to_transformer_lens
from nanomarkov.model import GPT

transformer_lens = pytest.importorskip(
    "transformer_lens", reason='TransformerLens is the interp extra: pip install -e ".[interp]"'
)
if TL_MAJOR >= 4:
    pytest.skip(
        "TransformerLens 4 is installed here: HookedTransformer needs 3.x (tests/interp/test_bridge.py covers 4.x)",
        allow_module_level=True,
    )


def build(name, **changes):
    """A random GPT of preset `name` (MM-100, 16 positions); bias=True makes every bias random too."""
    return trained_looking(dataclasses.replace(preset_config(name), **changes))


def hooked_logits(hooked, idx):
    with torch.no_grad():
        return hooked(idx)


def our_logits(model, idx):
    with torch.no_grad():
        return model(idx)[0]


# Every preset with and without biases; the variants (attn_only) once each, one of either.
@pytest.mark.parametrize(
    "name, bias", [(n, b) for n in PRESETS for b in (False, True)] + [(v, i % 2 == 0) for i, v in enumerate(VARIANTS)]
)
def test_logits_match_and_round_trip_is_exact_for_every_preset(name, bias):
    model = build(name, bias=bias)
    hooked = to_hooked_transformer(model)
    idx = inputs(model.config)
    assert torch.allclose(hooked_logits(hooked, idx), our_logits(model, idx), rtol=0, atol=1e-4)
    # attn_only is TransformerLens's own: blocks without MLP and ln2, not stand-ins.
    assert hooked.cfg.attn_only == model.config.attn_only
    has_mlp = any(".mlp." in n or ".ln2." in n for n, _ in hooked.named_parameters())
    assert has_mlp == (model.config.n_layer > 0 and not model.config.attn_only)

    back = from_hooked_transformer(hooked)
    assert back.config == model.config
    assert torch.equal(our_logits(back, idx), our_logits(model, idx))
    assert [p.requires_grad for p in back.parameters()] == [p.requires_grad for p in model.parameters()]


def test_stand_ins_are_frozen_and_neutral():
    c = preset_config("c12")  # no LayerNorm, no positions, MLP-only, one-hot embedding, identity W_in
    hooked = to_hooked_transformer(build("c12"))
    params = dict(hooked.named_parameters())
    assert hooked.cfg.normalization_type is None and hooked.cfg.act_fn == "relu"
    for name in [
        "pos_embed.W_pos",
        "embed.W_E",
        "unembed.W_U",
        "unembed.b_U",
        "blocks.0.attn.W_O",
        "blocks.0.attn.b_O",
        "blocks.0.mlp.W_in",
        "blocks.0.mlp.b_in",
    ]:
        assert not params[name].requires_grad, name
    assert not params["pos_embed.W_pos"].any() and not params["blocks.0.attn.W_O"].any()
    assert torch.equal(params["embed.W_E"], torch.eye(c.vocab_size, c.n_embd))
    assert torch.equal(params["blocks.0.mlp.W_in"], torch.eye(c.n_embd))
    assert params["blocks.0.mlp.W_out"].requires_grad  # what c12 trains


def test_relu2_maps_and_relu3_is_refused():
    model = build("c2", mlp_filter="RELU2", bias=True)
    hooked = to_hooked_transformer(model)
    assert hooked.cfg.act_fn == "relu2"
    idx = inputs(model.config)
    assert torch.allclose(hooked_logits(hooked, idx), our_logits(model, idx), rtol=0, atol=1e-4)
    assert from_hooked_transformer(hooked).config.mlp_filter == "RELU2"
    with pytest.raises(NanoMarkovError, match="mlp_filter=RELU3 has no TransformerLens equivalent"):
        to_hooked_transformer(build("c2", mlp_filter="RELU3"))
    to_hooked_transformer(build("c2+attn_only", mlp_filter="RELU3"))  # no MLP applies it: same logits


@pytest.mark.parametrize("bias", [False, True])
def test_alibi_is_transformer_lenss_alibi_holding_our_slopes_and_round_trips(bias):
    model = build("seed", alibi=True, pos_ape=False, bias=bias)
    hooked = to_hooked_transformer(model)
    assert hooked.cfg.positional_embedding_type == "alibi"
    idx = inputs(model.config)
    assert torch.allclose(hooked_logits(hooked, idx), our_logits(model, idx), rtol=0, atol=1e-4)
    short = idx[:, :5]  # TransformerLens adds its bias's last rows then: the same softmax
    assert torch.allclose(hooked_logits(hooked, short), our_logits(model, short), rtol=0, atol=1e-4)
    back = from_hooked_transformer(hooked)
    assert back.config == model.config
    assert torch.equal(our_logits(back, idx), our_logits(model, idx))
    # Our slopes travel with the model (a buffer) but stay out of TransformerLens's state_dict layout.
    assert not any("alibi" in name for name in hooked.state_dict())
    hooked.to("meta")
    assert all(block.attn.alibi.is_meta for block in hooked.blocks)


def test_a_trained_alibi_goes_into_transformer_lens_but_does_not_come_back():
    model = build("seed", alibi=True, alibi_trained=True, pos_ape=False)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.distance_table.normal_()  # no longer alibi's lines
    hooked = to_hooked_transformer(model)
    idx = inputs(model.config)
    assert torch.allclose(hooked_logits(hooked, idx), our_logits(model, idx), rtol=0, atol=1e-4)
    with pytest.raises(NanoMarkovError, match="a trained table \\(alibi_trained\\) do not come back"):
        from_hooked_transformer(hooked)


def test_alibi_beside_a_position_table_is_refused():
    with pytest.raises(NanoMarkovError, match="alibi=True beside pos_ape=True"):
        to_hooked_transformer(build("seed", alibi=True))


def test_one_call_gives_a_hooked_transformer_on_3x():
    model = build("c2", lm_head_bias=True)
    hooked = to_transformer_lens(model)
    assert isinstance(hooked, transformer_lens.HookedTransformer)
    idx = inputs(model.config)
    assert torch.allclose(hooked_logits(hooked, idx), our_logits(model, idx), rtol=0, atol=1e-4)


def test_accepts_a_checkpoint_and_an_export_folder(tmp_path):
    model = build("c1", bias=True)
    idx = inputs(model.config)
    ckpt = write_ckpt(model, tmp_path / "ckpt.pt")
    export = export_safetensors(model, tmp_path / "export")
    for source in (ckpt, export, str(export)):
        assert torch.allclose(
            hooked_logits(to_hooked_transformer(source), idx), our_logits(model, idx), rtol=0, atol=1e-4
        )
    with pytest.raises(NanoMarkovError, match="expected a GPT or a path"):
        to_hooked_transformer(42)


def test_run_with_cache_holds_our_residual_streams():
    model = build("c1", bias=True)  # attention and MLP, LayerNorm, positions
    hooked = to_hooked_transformer(model)
    idx = inputs(model.config)
    ours = {}
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda module, args, out, i=i: ours.__setitem__(i, out))
    our_logits(model, idx)
    logits, cache = hooked.run_with_cache(idx)
    B, T = idx.shape
    c = model.config
    assert cache["hook_embed"].shape == (B, T, c.n_embd)
    assert torch.equal(cache["hook_embed"], model.wte.weight[idx])
    assert cache["blocks.0.attn.hook_pattern"].shape == (B, c.n_head, T, T)
    assert cache["blocks.0.mlp.hook_post"].shape == (B, T, c.mlp_ratio * c.n_embd)
    for i in range(c.n_layer):
        assert torch.allclose(cache[f"blocks.{i}.hook_resid_post"], ours[i], rtol=0, atol=1e-4)
    # The cached final stream, read out by hand, is the logits.
    final = cache["ln_final.hook_normalized"] * hooked.ln_final.w + hooked.ln_final.b
    assert torch.allclose(final @ hooked.W_U, logits, rtol=0, atol=1e-4)


def test_mlp_only_attention_writes_exact_zeros():
    model = build("default", bias=True, n_layer=1)  # MM-100's default has no block; K <= 10's has this one
    _, cache = to_hooked_transformer(model).run_with_cache(inputs(model.config))
    assert not cache["blocks.0.hook_attn_out"].any()


def plain_hooked(**changes):
    """A HookedTransformer as its own code builds it, weights (but not b_U) randomised."""
    cfg = dict(
        n_layers=2, d_model=16, n_ctx=8, d_head=4, n_heads=4, d_mlp=32, d_vocab=11, act_fn="gelu", device="cpu", seed=0
    )
    hooked = transformer_lens.HookedTransformer(transformer_lens.HookedTransformerConfig(**(cfg | changes)))
    with torch.no_grad():
        for name, p in hooked.named_parameters():
            if name != "unembed.b_U":
                p.add_(0.1 * torch.randn_like(p))
    return hooked


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize(
    "changes",
    [
        dict(normalization_type="LN"),
        dict(normalization_type="LNPre"),
        dict(normalization_type=None),
        dict(attn_only=True, d_mlp=None, act_fn=None),  # the circuits literature's attention-only model
    ],
    ids=["LN", "LNPre", "no-LN", "attn_only"],
)
def test_a_plain_transformer_lens_model_converts(changes):
    hooked = plain_hooked(**changes)
    model = from_hooked_transformer(hooked)
    norm = changes.get("normalization_type", "LN")
    assert isinstance(model, GPT) and model.config.use_ln == (norm is not None) and model.config.bias
    assert model.config.attn_only == changes.get("attn_only", False)
    idx = torch.randint(0, 11, (3, 8), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(our_logits(model, idx), hooked_logits(hooked, idx), rtol=0, atol=1e-4)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(act_fn="silu"), "act_fn='silu'"),
        (dict(act_fn="gelu_new"), "act_fn='gelu_new'"),
        (dict(normalization_type="RMS"), "normalization_type='RMS'"),
        (dict(positional_embedding_type="rotary"), "positional_embedding_type='rotary'"),
        (dict(positional_embedding_type="alibi"), "an ALiBi bias other than nanoMarkov's fixed slopes"),
        (dict(gated_mlp=True), "gated_mlp=True"),
        (dict(d_mlp=20), "d_mlp=20"),
        (dict(n_heads=2), "n_heads=2"),
        (dict(eps=1e-6), "eps=1e-06"),
        # Not checked by name: the final logit comparison catches it.
        (dict(output_logits_soft_cap=3.0), "logits differ"),
    ],
)
def test_inexpressible_transformer_lens_settings_are_refused(changes, message):
    with pytest.raises(NanoMarkovError, match=message):
        from_hooked_transformer(plain_hooked(**changes))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_an_unembedding_bias_becomes_the_head_bias():
    hooked = plain_hooked()
    with torch.no_grad():
        hooked.unembed.b_U.copy_(torch.linspace(-1, 1, 11))
    model = from_hooked_transformer(hooked)
    assert model.config.lm_head_bias
    assert torch.equal(model.lm_head.bias, torch.linspace(-1, 1, 11))


@pytest.mark.parametrize("name", ["c1", "c12", "default"])  # tied; tied to a frozen one-hot table; untied
def test_the_head_bias_is_b_U_and_round_trips(name):
    model = build(name, lm_head_bias=True)
    assert model.lm_head.bias.requires_grad and model.lm_head.bias.abs().min() > 0
    hooked = to_hooked_transformer(model)
    assert torch.equal(hooked.b_U, model.lm_head.bias) and hooked.unembed.b_U.requires_grad
    idx = inputs(model.config)
    assert torch.allclose(hooked_logits(hooked, idx), our_logits(model, idx), rtol=0, atol=1e-4)
    back = from_hooked_transformer(hooked)
    assert back.config == model.config and torch.equal(back.lm_head.bias, model.lm_head.bias)
    assert not from_hooked_transformer(to_hooked_transformer(build(name))).config.lm_head_bias


def test_half_precision_and_a_missing_transformer_lens_are_explained(monkeypatch):
    with pytest.raises(NanoMarkovError, match="float32"):
        to_hooked_transformer(build("c1").to(torch.bfloat16))
    monkeypatch.setitem(sys.modules, "transformer_lens", None)  # what an uninstalled package looks like
    with pytest.raises(NanoMarkovError, match=r'pip install -e "\.\[interp\]"'):
        to_hooked_transformer(build("c1"))
