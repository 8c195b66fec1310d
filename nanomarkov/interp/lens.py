"""TransformerLens: to_transformer_lens converts a GPT for whichever major is installed:
to_hooked_transformer (3.x, the `interp` extra; from_hooked_transformer goes back) or
to_transformer_bridge (4.x, the `interp4` extra). TransformerLens is imported only
when called, so the core does not need it. See the comments above them.
"""

import importlib.metadata
import math
import re
import warnings

import torch

from nanomarkov.checkpoint import check_finite_weights, model_and_source
from nanomarkov.errors import NanoMarkovError
from nanomarkov.model import GPT, GPTConfig, alibi_bias

# ---------------------------------------------------------------------------
# TransformerLens. A HookedTransformer is a pre-LN GPT-2 with every weight split
# per head; ours is the same computation with fused matrices, so the conversion
# is reshaping, plus a few stand-ins where TransformerLens has no switch:
# - pos_ape=False: W_pos is all zeros and frozen (requires_grad False);
# - mlp_only=True: TransformerLens has no block without attention, so each block
#   gets one head of width 1 whose weights and biases are all zeros and frozen;
#   its output z @ W_O + b_O is then exactly 0 and hook_attn_out reads zeros;
# - attn_only=True: TransformerLens's own attn_only, blocks without MLP and ln2 (its
#   d_mlp and act_fn carry our unused mlp_ratio and mlp_filter, so a round trip keeps them);
# - one_hot_embed / mlp_first_matrix_identity: the same fixed tables, frozen;
# - lm_head_tied: W_U is a copy of W_E^T (TransformerLens keeps the two apart,
#   so further training of the hooked model would untie them);
# - alibi=True: TransformerLens's positional_embedding_type="alibi", which never reads its position
#   table (frozen zeros; alibi with pos_ape is refused) and has slopes of its own: each attention's
#   attn.alibi, the bias it keeps once built, is set to ours (alibi_trained's table: frozen there, and
#   from_hooked_transformer does not read it back), as a buffer so that .to(device) moves it
#   and outside the state_dict, which keeps TransformerLens's layout (a HookedTransformer rebuilt from
#   cfg and state_dict has its own slopes again). It rebuilds its own only for an input longer than
#   block_size, which our GPT refuses. For a shorter input it adds the last rows of the bias (its
#   key-value cache's convention), so hook_attn_scores carry a constant per query row there; the
#   softmax removes it, so patterns and logits are ours;
# - bias=False: TransformerLens always has biases; they are zeros (b_U too when
#   lm_head_bias is off).
# Weights are assigned to the parameters directly instead of going through
# load_and_process_state_dict, whose defaults fold the LayerNorms into the next
# matrices and center the writing weights: exact in exact arithmetic, but it
# changes what W_E, W_in... and the hooks hold, and costs float equality.

TL_INSTALL = 'pip install -e ".[interp]"'
TL4_INSTALL = 'pip install -e ".[interp4]"'
# Our activations and TransformerLens's act_fn names. F.gelu is the exact (erf)
# GELU, which TransformerLens calls "gelu" ("gelu_new" is the tanh approximation).
TL_ACT_FN = {"GELU": "gelu", "RELU": "relu", "RELU2": "relu2"}
LN_EPS = 1e-5  # nn.LayerNorm's default, which model.py uses
# Both directions compare the two models' logits before returning (float32: the
# measured gap is ~1e-5 at most, from a different order of summation).
LOGIT_TOLERANCE = 1e-4


def _transformer_lens():
    """(HookedTransformer, HookedTransformerConfig, supported act_fn names), or a clear error."""
    try:
        from transformer_lens.utilities.activation_functions import SUPPORTED_ACTIVATIONS
    except ImportError:
        raise NanoMarkovError(f"TransformerLens is not installed; install the interp extra: {TL_INSTALL}") from None
    try:
        from transformer_lens import HookedTransformer, HookedTransformerConfig
    except ImportError:  # 4.0 removed HookedTransformer for TransformerBridge
        raise NanoMarkovError(
            f"transformer_lens {importlib.metadata.version('transformer_lens')} has no "
            f"HookedTransformer; use to_transformer_lens (it picks to_transformer_bridge there), "
            f"or install a 3.x one: {TL_INSTALL}"
        ) from None
    return HookedTransformer, HookedTransformerConfig, SUPPORTED_ACTIVATIONS


def _hooked_state(model):
    """({TransformerLens parameter name: tensor} for a GPT, the names to freeze).

    A GPT tensor that does not exist (no bias, no attention, no position table)
    becomes frozen zeros, so the hooked model also trains like ours would.
    """
    c = model.config
    C, H = c.n_embd, (1 if c.mlp_only else c.n_head)
    D = 1 if c.mlp_only else C // H
    state, frozen = {}, set()

    def put(name, tensor, *shape, fill=0.0):
        if tensor is None or not tensor.requires_grad:
            frozen.add(name)
        state[name] = torch.full(shape, fill) if tensor is None else tensor.detach()

    put("embed.W_E", model.wte.weight)
    put("pos_embed.W_pos", None if model.wpe is None else model.wpe.weight, c.block_size, C)
    norms = [("ln_final", model.ln_f)]
    for i, block in enumerate(model.blocks):
        p = f"blocks.{i}."
        if block.attn is None:
            for name, shape in [
                ("W_Q", (H, C, D)),
                ("W_K", (H, C, D)),
                ("W_V", (H, C, D)),
                ("W_O", (H, D, C)),
                ("b_Q", (H, D)),
                ("b_K", (H, D)),
                ("b_V", (H, D)),
                ("b_O", (C,)),
            ]:
                put(p + "attn." + name, None, *shape)
            norms.append((p + "ln1", None))
        else:
            # c_attn.weight is (3C out, C in); head h owns rows h*D..(h+1)*D of each third.
            qkv, qkv_bias = block.attn.c_attn.weight, block.attn.c_attn.bias
            for j, name in enumerate("QKV"):
                put(p + f"attn.W_{name}", qkv[j * C : (j + 1) * C].view(H, D, C).transpose(1, 2))
                put(p + f"attn.b_{name}", None if qkv_bias is None else qkv_bias[j * C : (j + 1) * C].view(H, D), H, D)
            # c_proj reads the heads concatenated: its input columns h*D..(h+1)*D belong to head h.
            put(p + "attn.W_O", block.attn.c_proj.weight.T.reshape(H, D, C))
            put(p + "attn.b_O", block.attn.c_proj.bias, C)
            norms.append((p + "ln1", block.ln_1))
        mlp = block.mlp
        if mlp is not None:
            put(p + "mlp.W_in", mlp.c_fc.weight.T)
            put(p + "mlp.b_in", mlp.c_fc.bias, mlp.c_fc.out_features)
            put(p + "mlp.W_out", mlp.c_proj.weight.T)
            put(p + "mlp.b_out", mlp.c_proj.bias, C)
            norms.append((p + "ln2", block.ln_2))
    if c.use_ln:
        for name, ln in norms:  # ln None: the stand-in attention's LayerNorm, frozen at the identity
            put(name + ".w", None if ln is None else ln.weight, C, fill=1.0)
            put(name + ".b", None if ln is None else ln.bias, C)
    put("unembed.W_U", model.lm_head.weight.T)
    put("unembed.b_U", model.lm_head.bias, c.vocab_size)
    return state, frozen


def float32_model(ckpt_or_model):
    """(GPT, provenance) as model_and_source gives them, refusing a model that is not in float32."""
    model, source = model_and_source(ckpt_or_model)
    check_finite_weights(model, source, what="convert")
    if model.wte.weight.dtype != torch.float32:
        raise NanoMarkovError(
            f"the model is in {model.wte.weight.dtype}; the conversion is checked in float32: call model.float() first"
        )
    return model, source


def _convertible(ckpt_or_model):
    """(GPT, TransformerLens act_fn name) for a model either major can express, or the reason it cannot.

    An attn_only model has no MLP, so its unused mlp_filter may have no act_fn (None then)."""
    model = float32_model(ckpt_or_model)[0]
    if model.config.alibi and model.config.pos_ape:
        raise NanoMarkovError(
            "alibi=True beside pos_ape=True has no TransformerLens equivalent: its ALiBi drops the position "
            "table; open the model in nanoMarkov or nnsight instead"
        )
    act_fn = TL_ACT_FN.get(model.config.mlp_filter)
    if act_fn is None and not model.config.attn_only:
        raise NanoMarkovError(
            f"mlp_filter={model.config.mlp_filter} has no TransformerLens equivalent; "
            f"it has {', '.join(f'{k} ({v})' for k, v in TL_ACT_FN.items())}"
        )
    return model, act_fn


def to_transformer_lens(ckpt_or_model):
    """The installed TransformerLens's model of a GPT, a ckpt.pt or an export folder, same logits.

    A HookedTransformer under TransformerLens 3.x (to_hooked_transformer), a
    TransformerBridge under 4.x (to_transformer_bridge); the same hook names
    (hook_embed, blocks.{i}.hook_resid_post, blocks.{i}.attn.hook_pattern,
    blocks.{i}.hook_mlp_out, ...) work in both.
    """
    try:
        version = importlib.metadata.version("transformer_lens")
    except importlib.metadata.PackageNotFoundError:
        raise NanoMarkovError(
            f"TransformerLens is not installed; install 3.x ({TL_INSTALL}, works with SAELens) or 4.x ({TL4_INSTALL})"
        ) from None
    if int(re.match(r"\d*", version).group() or 0) >= 4:
        return to_transformer_bridge(ckpt_or_model)
    return to_hooked_transformer(ckpt_or_model)


def to_hooked_transformer(ckpt_or_model):
    """A TransformerLens HookedTransformer computing the same logits as a GPT, a ckpt.pt or an export folder.

    Every GPTConfig switch has a counterpart (see the comment above) except
    mlp_filter=RELU3, which TransformerLens has no activation for: that, and
    anything else it cannot express, raises NanoMarkovError rather than
    returning a model that differs. Dropout is not carried over (TransformerLens
    has none; it does not change the logits of a model in eval mode). The
    hooked model is in eval mode, on the GPT's device and dtype.
    """
    model, act_fn = _convertible(ckpt_or_model)
    HookedTransformer, HookedTransformerConfig, activations = _transformer_lens()
    if act_fn is not None and act_fn not in activations:
        raise NanoMarkovError(
            f"mlp_filter={model.config.mlp_filter} needs act_fn {act_fn!r}, which this transformer_lens "
            f"lacks; upgrade it: {TL_INSTALL}"
        )
    config = HookedTransformerConfig(**_hooked_config(model, act_fn))
    with warnings.catch_warnings():  # the 3.x deprecation notice about 4.0; the interp extra pins < 4
        warnings.simplefilter("ignore", DeprecationWarning)
        hooked = HookedTransformer(config)
    _copy_weights_into(hooked, model)
    if model.config.alibi:
        for block, ours in zip(hooked.blocks, model.blocks):
            del block.attn.alibi  # a plain attribute (None until built), which a buffer may not shadow
            bias = _hooked_alibi(ours.attn.score_bias(model.config.block_size, model.wte.weight.device))
            block.attn.register_buffer("alibi", bias, persistent=False)
    check_same_logits(model, hooked)
    return hooked


def _hooked_alibi(score_bias):
    """The attn.alibi a HookedTransformer adds to its scores for our score_bias: the same, with zeros instead
    of -inf after the query (TransformerLens masks those itself)."""
    return score_bias.detach().nan_to_num(neginf=0.0)


def _hooked_config(model, act_fn):
    """The HookedTransformerConfig arguments for a GPT whose MLP filter is TransformerLens's act_fn."""
    c = model.config
    weight = model.wte.weight
    return dict(
        n_layers=c.n_layer,
        d_model=c.n_embd,
        n_ctx=c.block_size,
        d_vocab=c.vocab_size,
        n_heads=1 if c.mlp_only else c.n_head,
        d_head=1 if c.mlp_only else c.n_embd // c.n_head,
        d_mlp=c.mlp_ratio * c.n_embd,
        act_fn=act_fn,
        attn_only=c.attn_only,
        positional_embedding_type="alibi" if c.alibi else "standard",
        normalization_type="LN" if c.use_ln else None,
        eps=LN_EPS,
        # TransformerLens divides attention scores by sqrt(d_head) by default, as scaled_dot_product_attention does.
        original_architecture="nanomarkov.GPT",
        init_weights=False,
        device=str(weight.device),
        dtype=weight.dtype,
    )


def _copy_weights_into(hooked, model):
    """Set every parameter of `hooked` from the GPT, freezing the stand-ins."""
    state, frozen = _hooked_state(model)
    params = dict(hooked.named_parameters())
    if set(params) != set(state):  # nothing may be left as TransformerLens initialised it
        raise NanoMarkovError(
            f"this transformer_lens lays out its weights differently "
            f"({sorted(set(params) ^ set(state))}); install the one the interp extra allows: "
            f"{TL_INSTALL}"
        )
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)
            params[name].requires_grad_(name not in frozen)


def check_same_logits(gpt, converted):
    """Refuse a conversion whose two models disagree on a random input (full context, every token).

    `converted` returns logits, or an output holding them as .logits (transformers).
    """
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, gpt.config.vocab_size, (2, gpt.config.block_size), generator=g)
    tokens = tokens.to(gpt.wte.weight.device)
    training = gpt.training
    with torch.no_grad():
        output = converted.eval()(tokens)
        diff = (gpt.eval()(tokens)[0] - getattr(output, "logits", output)).abs().max().item()
    gpt.train(training)
    if not diff <= LOGIT_TOLERANCE:
        raise NanoMarkovError(
            f"the converted model's logits differ by {diff:.3g} (> {LOGIT_TOLERANCE}); "
            f"some setting has no counterpart, so no model is returned"
        )


# ---------------------------------------------------------------------------
# TransformerLens 4 has no HookedTransformer: a TransformerBridge wraps a model.
# The bridge here wraps TransformerLens's own native GPT (boot_native: no Hugging
# Face download, and unlike a GPT-2 it can leave out LayerNorm), filled with the
# per-head weights and stand-ins above through TransformerLens's converter of
# HookedTransformer state dicts. The native model lacks two things ours has, so:
# - RELU2: it is built with relu, then each MLP gets TransformerLens's own relu2
#   (the one HookedTransformer used) and the config says act_fn="relu2";
# - lm_head_bias: the bridge's unembedding bias is a fixed zero buffer; with the
#   switch on it becomes a trainable parameter holding our bias.


def _transformer_lens_4():
    """(TransformerBridge, TransformerBridgeConfig, convert_tl_checkpoint, NativeMLP, activations), or a clear error."""
    try:
        from transformer_lens.config import TransformerBridgeConfig
        from transformer_lens.model_bridge import TransformerBridge
        from transformer_lens.model_bridge.sources.native.model import NativeMLP
        from transformer_lens.utilities.activation_functions import SUPPORTED_ACTIVATIONS
        from transformer_lens.utilities.tl_checkpoint_conversion import convert_tl_checkpoint
    except ImportError:
        raise NanoMarkovError(
            f"TransformerLens 4 (TransformerBridge.boot_native and convert_tl_checkpoint, 4.3 or later) is "
            f"not installed; install it: {TL4_INSTALL}, or use to_hooked_transformer with 3.x"
        ) from None
    return TransformerBridge, TransformerBridgeConfig, convert_tl_checkpoint, NativeMLP, SUPPORTED_ACTIVATIONS


def to_transformer_bridge(ckpt_or_model):
    """A TransformerLens 4 TransformerBridge computing the same logits as a GPT, a ckpt.pt or an export folder.

    Every switch maps as in to_hooked_transformer (see the two comments above);
    mlp_filter=RELU3 is refused, for the same reason. The bridge is in eval
    mode, on the GPT's device, its stand-ins frozen; W_U is a copy of W_E^T
    when the head is tied. Logits are checked against ours before returning.
    """
    model, act_fn = _convertible(ckpt_or_model)
    if model.config.alibi:
        raise NanoMarkovError(
            "alibi=True is not carried into a TransformerBridge (its native model keeps no slopes of ours); "
            f"use to_hooked_transformer with TransformerLens 3: {TL_INSTALL}"
        )
    TransformerBridge, TransformerBridgeConfig, convert_tl_checkpoint, NativeMLP, activations = _transformer_lens_4()
    args = _hooked_config(model, act_fn)
    device = args.pop("device")
    native_act_fn = "relu" if act_fn == "relu2" else act_fn
    config = TransformerBridgeConfig(**args | {"act_fn": native_act_fn, "architecture": "TransformerLensNative"})
    bridge = TransformerBridge.boot_native(config, device=device, dtype=args["dtype"])
    state, frozen = _hooked_state(model)
    try:
        bridge.load_state_dict(convert_tl_checkpoint(state, bridge.cfg), strict=True)
    except (RuntimeError, ValueError, KeyError) as e:
        raise NanoMarkovError(
            f"this transformer_lens lays out its native model differently ({str(e).strip().splitlines()[0]}); "
            f"install the one the interp4 extra allows: {TL4_INSTALL}"
        ) from None
    if act_fn != native_act_fn:
        for module in bridge.original_model.modules():
            if isinstance(module, NativeMLP):
                module.act = activations[act_fn]
        bridge.cfg.act_fn = act_fn
    if model.config.lm_head_bias:
        head = bridge.unembed.original_component
        bias = head.bias.detach().clone()
        del head.bias  # the fixed buffer the bridge put there
        head.bias = torch.nn.Parameter(bias)
    tensors = bridge.state_dict(keep_vars=True)
    for name in convert_tl_checkpoint({name: state[name] for name in frozen}, bridge.cfg):
        tensors[name].requires_grad_(False)
    check_same_logits(model, bridge)
    return bridge.eval()


def from_hooked_transformer(hooked):
    """The GPT (eval mode) computing the same logits as a HookedTransformer.

    Exact inverse of to_hooked_transformer: its frozen stand-ins are read back
    as the switches they stand for (frozen zero W_pos -> pos_ape=False, frozen
    zero attention -> mlp_only, attn_only -> attn_only, frozen one-hot W_E -> one_hot_embed, frozen
    identity W_in -> mlp_first_matrix_identity, frozen zero biases -> bias=False,
    a frozen zero b_U -> lm_head_bias=False, ALiBi with our slopes -> alibi); W_U equal to W_E^T means
    lm_head_tied. A plain TransformerLens model works
    if it is a GPT-2-style one nanoMarkov can express (LayerNorm or none, learned
    absolute positions, causal attention, a gelu/relu/relu2 MLP; its trainable
    b_U becomes lm_head_bias); anything else raises NanoMarkovError naming the setting.
    """
    params = dict(hooked.named_parameters())
    _check_expressible(hooked.cfg, params)
    config = _gpt_config_of(hooked.cfg, params)
    fixed = _hooked_alibi(alibi_bias(config.n_head, config.block_size)) if config.alibi else None
    if config.alibi and not all(_holds(block.attn.alibi, fixed) for block in hooked.blocks):
        _refuse(
            "an ALiBi bias other than nanoMarkov's fixed slopes",
            "alibi halves from 1 in head 0 (alibi_bias); TransformerLens's own slopes and a trained table "
            "(alibi_trained) do not come back",
        )
    weights = {name: p.detach() for name, p in params.items()}
    state = _gpt_state(weights, config, hooked.cfg.normalization_type)
    gpt = GPT(config).to(weights["embed.W_E"].device)
    wanted = gpt.state_dict()
    gpt.load_state_dict({name: tensor for name, tensor in state.items() if name in wanted})
    check_same_logits(gpt, hooked)
    return gpt.eval()


def _refuse(setting, why):
    raise NanoMarkovError(f"HookedTransformer with {setting} has no nanoMarkov equivalent: {why}")


def _check_expressible(cfg, params):
    """Refuse settings read by _gpt_config_of or known to change the computation; check_same_logits catches the rest."""
    if cfg.positional_embedding_type not in ("standard", "alibi"):
        _refuse(
            f"positional_embedding_type={cfg.positional_embedding_type!r}",
            "only learned absolute positions ('standard') or nanoMarkov's alibi are expressible",
        )
    for name, expected in [
        ("attention_dir", "causal"),
        ("gated_mlp", False),
        ("parallel_attn_mlp", False),
        ("final_rms", False),
        ("post_embedding_ln", False),
        ("use_qk_norm", False),
        ("scale_attn_by_inverse_layer_idx", False),
        ("use_local_attn", False),
        ("n_key_value_heads", None),
        ("num_experts", None),
        ("dtype", torch.float32),
    ]:
        if getattr(cfg, name, expected) != expected:
            _refuse(f"{name}={getattr(cfg, name)!r}", f"only {expected!r} is expressible")
    if cfg.normalization_type not in ("LN", "LNPre", None):
        _refuse(f"normalization_type={cfg.normalization_type!r}", "only LayerNorm (LN, LNPre) or none")
    if cfg.normalization_type and cfg.eps != LN_EPS:
        _refuse(f"eps={cfg.eps}", f"nanoMarkov's LayerNorm has eps {LN_EPS}")
    if cfg.d_vocab_out != cfg.d_vocab:
        _refuse(f"d_vocab_out={cfg.d_vocab_out} != d_vocab={cfg.d_vocab}", "the head predicts the input vocabulary")
    if cfg.attn_only:  # no MLP: its act_fn and d_mlp are unused, whatever they say
        return
    if cfg.act_fn not in TL_ACT_FN.values():
        _refuse(
            f"act_fn={cfg.act_fn!r}", f"the MLP filters are {', '.join(f'{v} ({k})' for k, v in TL_ACT_FN.items())}"
        )
    if cfg.d_mlp % cfg.d_model:
        _refuse(f"d_mlp={cfg.d_mlp}", f"the MLP width must be a multiple of d_model={cfg.d_model}")


def _holds(tensor, value):
    """Whether `tensor` (None: not built yet) equals `value` in shape and every entry."""
    return tensor is not None and tensor.shape == value.shape and torch.equal(tensor.cpu(), value)


def _is_stand_in(params, name, value):
    """Whether parameter `name` is a frozen stand-in written by to_hooked_transformer, all equal to `value`."""
    tensor = params[name].detach()
    return not params[name].requires_grad and torch.equal(tensor, value.to(tensor).expand_as(tensor))


def _gpt_config_of(cfg, params):
    """The GPTConfig whose switches the hooked model's shapes and frozen stand-ins stand for."""
    C, V, L = cfg.d_model, cfg.d_vocab, cfg.n_layers
    blocks = [f"blocks.{i}." for i in range(L)]
    zero = torch.tensor(0.0)
    attn_names = [p + "attn." + n for p in blocks for n in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O")]
    mlp_only = not cfg.attn_only and all(_is_stand_in(params, n, zero) for n in attn_names)
    if not mlp_only and (
        cfg.n_heads * cfg.d_head != C
        or not cfg.use_attn_scale
        or not math.isclose(cfg.attn_scale, math.sqrt(cfg.d_head))
    ):
        _refuse(
            f"n_heads={cfg.n_heads}, d_head={cfg.d_head}, attn_scale={cfg.attn_scale}",
            "heads must split d_model evenly and scores be divided by sqrt(d_head)",
        )
    identity_in = (
        not cfg.attn_only
        and cfg.d_mlp == C
        and L > 0
        and all(
            _is_stand_in(params, p + "mlp.W_in", torch.eye(C)) and _is_stand_in(params, p + "mlp.b_in", zero)
            for p in blocks
        )
    )
    ln_biases = [n for n in params if n.endswith(("ln1.b", "ln2.b", "ln_final.b"))]
    biases = [
        n
        for n in params
        if ".b_" in n
        and n != "unembed.b_U"
        and not (mlp_only and ".attn." in n)
        and not (identity_in and n.endswith("mlp.b_in"))
    ] + ln_biases
    return GPTConfig(
        n_layer=L,
        n_head=cfg.n_heads,
        n_embd=C,
        block_size=cfg.n_ctx,
        vocab_size=V,
        bias=not all(_is_stand_in(params, n, zero) for n in biases),
        use_ln=cfg.normalization_type is not None,
        pos_ape=cfg.positional_embedding_type == "standard" and not _is_stand_in(params, "pos_embed.W_pos", zero),
        alibi=cfg.positional_embedding_type == "alibi",
        mlp_only=mlp_only,
        attn_only=cfg.attn_only,
        # attn_only: what our export carried, else GPTConfig's defaults (unused without an MLP).
        mlp_ratio=cfg.d_mlp // C if cfg.d_mlp and cfg.d_mlp % C == 0 else GPTConfig.mlp_ratio,
        mlp_filter={v: k for k, v in TL_ACT_FN.items()}.get(cfg.act_fn, GPTConfig.mlp_filter),
        mlp_first_matrix_identity=identity_in,
        one_hot_embed=V <= C and _is_stand_in(params, "embed.W_E", torch.eye(V, C)),
        lm_head_tied=torch.equal(params["unembed.W_U"].detach(), params["embed.W_E"].detach().T),
        lm_head_bias=not _is_stand_in(params, "unembed.b_U", zero),
    )


def _gpt_state(w, config, normalization_type):
    """The inverse of _hooked_state's reshapes: a GPT state_dict (tensors the GPT does not have are left out)."""
    C = config.n_embd
    state = {"wte.weight": w["embed.W_E"], "lm_head.weight": w["unembed.W_U"].T, "lm_head.bias": w["unembed.b_U"]}
    if config.pos_ape:
        state["wpe.weight"] = w["pos_embed.W_pos"]
    norms = {"ln_f": "ln_final"}
    for i in range(config.n_layer):
        p = f"blocks.{i}."  # the same prefix in both models
        if not config.mlp_only:
            state[p + "attn.c_attn.weight"] = torch.cat(
                [w[p + f"attn.W_{x}"].transpose(1, 2).reshape(C, C) for x in "QKV"]
            )
            state[p + "attn.c_attn.bias"] = torch.cat([w[p + f"attn.b_{x}"].reshape(C) for x in "QKV"])
            state[p + "attn.c_proj.weight"] = w[p + "attn.W_O"].reshape(C, C).T
            state[p + "attn.c_proj.bias"] = w[p + "attn.b_O"]
            norms[p + "ln_1"] = p + "ln1"
        if not config.attn_only:
            state[p + "mlp.c_fc.weight"] = w[p + "mlp.W_in"].T
            state[p + "mlp.c_fc.bias"] = w[p + "mlp.b_in"]
            state[p + "mlp.c_proj.weight"] = w[p + "mlp.W_out"].T
            state[p + "mlp.c_proj.bias"] = w[p + "mlp.b_out"]
            norms[p + "ln_2"] = p + "ln2"
    for ours, theirs in norms.items():
        if normalization_type == "LN":
            state[ours + ".weight"], state[ours + ".bias"] = w[theirs + ".w"], w[theirs + ".b"]
        elif normalization_type == "LNPre":  # LayerNorm without its affine map
            state[ours + ".weight"], state[ours + ".bias"] = torch.ones(C), torch.zeros(C)
    return state
