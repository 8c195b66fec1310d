"""Hugging Face: to_hf_gpt2 gives a GPT as a transformers GPT2LMHeadModel with the same logits, and
export_hf writes it as a folder that `AutoModelForCausalLM.from_pretrained(DIR)` loads with no custom
code (config.json, model.safetensors). transformers is the `hf` extra, imported only when called.

GPT-2 is our block with every part always present, so a switch that removes a part becomes
exact zeros or fixed tables there:
- pos_ape=False: wpe is all zeros;
- bias=False: every bias (Linear and LayerNorm) is zero; a LayerNorm weight stays ours;
- mlp_only=True: each block's attention has one head and all-zero weights and biases, so
  c_proj writes exactly 0 whatever the softmax gives (ln_1 is the identity LayerNorm, unused);
- attn_only=True: each block's MLP is one hidden unit wide (n_inner=1) with all-zero weights and
  biases, so its c_proj writes exactly 0 whatever the activation gives (ln_2 is the identity
  LayerNorm, unused); mlp_ratio and mlp_filter, unused by our model, are not carried;
- one_hot_embed / mlp_first_matrix_identity: the same fixed tables as values;
- lm_head_tied: tie_word_embeddings, as GPT-2 itself does;
- mlp_filter: GELU is the exact (erf) GELU, transformers' "gelu" (GPT-2's own default "gelu_new" is
  the tanh approximation); RELU is "relu", RELU2 is "relu2" (relu(x)**2).
What GPT-2 cannot hold is refused (gpt2_refusal says why): no LayerNorm, a head bias, alibi, RELU3.
"""

import dataclasses
import shutil
from pathlib import Path

import torch

from nanomarkov.errors import NanoMarkovError
from nanomarkov.files import (
    check_output_folder,
    follow_umask,
    new_build_folder,
    read_json_or_none,
    refuse_the_current_folder,
    swap_in,
    writer_lock,
)
from nanomarkov.interp.lens import LN_EPS, check_same_logits, float32_model

HF_INSTALL = 'pip install -e ".[hf]"'
HF_ACTIVATION = {"GELU": "gelu", "RELU": "relu", "RELU2": "relu2"}  # transformers' ACT2FN names
HF_FORMAT = "nanomarkov.GPT as GPT-2"  # config.json's "nanomarkov" field says what the folder is


def _transformers():
    """(GPT2Config, GPT2LMHeadModel, ACT2CLS), or a clear error."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
        from transformers.activations import ACT2CLS
    except ImportError:
        raise NanoMarkovError(
            f"Hugging Face transformers is not installed; install the hf extra: {HF_INSTALL}"
        ) from None
    return GPT2Config, GPT2LMHeadModel, ACT2CLS


def gpt2_refusal(config) -> str:
    """Why GPT-2 cannot compute what a GPTConfig describes, or '' when it can."""
    if not config.use_ln:
        return (
            "use_ln=False: GPT-2 has a LayerNorm before every sublayer and the head, and a LayerNorm is "
            "never the identity (it centres and rescales); open it in TransformerLens or nanoMarkov instead"
        )
    if config.lm_head_bias:
        return (
            "lm_head_bias=True: GPT-2's lm_head is a Linear without bias, and no exact rewrite adds one "
            "(a constant residual coordinate would change every LayerNorm's mean and variance)"
        )
    if config.alibi:
        return (
            "alibi=True: GPT-2's attention has no bias by distance; open it in nanoMarkov or nnsight instead "
            "(or TransformerLens 3, where it has no pos_ape)"
        )
    if config.mlp_filter not in HF_ACTIVATION and not config.attn_only:
        return f"mlp_filter={config.mlp_filter}: transformers has no activation relu(x)**3"
    return ""


def gpt2_mlp(config) -> tuple:
    """(GPT-2's n_inner, activation_function) for a GPTConfig: attn_only's stand-in MLP is the smallest
    GPT-2 has, one unit wide, with the exact GELU (it only ever sees 0)."""
    if config.attn_only:
        return 1, HF_ACTIVATION["GELU"]
    return config.mlp_ratio * config.n_embd, HF_ACTIVATION[config.mlp_filter]


def gpt2_config(model, source, GPT2Config):
    """The GPT2Config of a GPT, with a "nanomarkov" field naming what it is and where it comes from."""
    c = model.config
    data_dir = source.get("data_dir")
    meta = read_json_or_none(Path(data_dir) / "meta.json") if data_dir else None
    n_inner, activation = gpt2_mlp(c)
    return GPT2Config(
        vocab_size=c.vocab_size,
        n_positions=c.block_size,
        n_embd=c.n_embd,
        n_layer=c.n_layer,
        n_head=1 if c.mlp_only else c.n_head,
        n_inner=n_inner,
        activation_function=activation,
        resid_pdrop=c.dropout,
        embd_pdrop=c.dropout,
        attn_pdrop=c.dropout,
        layer_norm_epsilon=LN_EPS,
        tie_word_embeddings=c.lm_head_tied,
        # The vocabulary is the K states 0..K-1 and BOS = K, which starts every sequence; no EOS, no padding.
        bos_token_id=c.vocab_size - 1,
        eos_token_id=None,
        pad_token_id=None,
        nanomarkov={
            "format": HF_FORMAT,
            "gpt_config": dataclasses.asdict(c),
            "source": source,
            "process": meta.get("process") if isinstance(meta, dict) else None,
            "note": f"tokens 0..{c.vocab_size - 2} are the process's states, {c.vocab_size - 1} is BOS",
        },
    )


def gpt2_state(model) -> dict:
    """GPT2LMHeadModel's state_dict for a GPT; a part the GPT lacks is zeros (or the identity LayerNorm)."""
    c = model.config
    C = c.n_embd
    ours = {name: tensor.detach() for name, tensor in model.state_dict().items()}
    zeros, ones = torch.zeros(C), torch.ones(C)
    hidden = gpt2_mlp(c)[0]
    state = {
        "transformer.wte.weight": ours["wte.weight"],
        "transformer.wpe.weight": ours.get("wpe.weight", torch.zeros(c.block_size, C)),
        "transformer.ln_f.weight": ours["ln_f.weight"],
        "transformer.ln_f.bias": ours.get("ln_f.bias", zeros),
        "lm_head.weight": ours["lm_head.weight"],
    }
    # GPT-2's Conv1D stores (in, out): the transpose of our Linear's (out, in).
    linears = {"attn.c_attn": 3 * C, "attn.c_proj": C, "mlp.c_fc": hidden, "mlp.c_proj": C}
    for i in range(c.n_layer):
        p, h = f"blocks.{i}.", f"transformer.h.{i}."
        for name, out_features in linears.items():
            default = torch.zeros(out_features, C if name != "mlp.c_proj" else hidden)
            state[h + name + ".weight"] = ours.get(p + name + ".weight", default).T
            state[h + name + ".bias"] = ours.get(p + name + ".bias", torch.zeros(out_features))
        for norm in ("ln_1", "ln_2"):
            state[h + norm + ".weight"] = ours.get(p + norm + ".weight", ones)
            state[h + norm + ".bias"] = ours.get(p + norm + ".bias", zeros)
    return {name: tensor.to(model.wte.weight.device) for name, tensor in state.items()}


def to_hf_gpt2(ckpt_or_model):
    """A transformers GPT2LMHeadModel (eval mode, float32, on the GPT's device) with the same logits.

    From a GPT, a ckpt.pt or an export folder. NanoMarkovError when GPT-2 cannot express
    the architecture (gpt2_refusal) or the logits differ by more than 1e-4.
    """
    model, source = float32_model(ckpt_or_model)
    why = gpt2_refusal(model.config)
    if why:
        raise NanoMarkovError(f"GPT-2 (Hugging Face) cannot express this model: {why}")
    GPT2Config, GPT2LMHeadModel, activations = _transformers()
    activation = gpt2_mlp(model.config)[1]
    if activation not in activations:
        raise NanoMarkovError(f"this transformers has no {activation!r} activation; upgrade it: {HF_INSTALL}")
    hf = GPT2LMHeadModel(gpt2_config(model, source, GPT2Config)).to(model.wte.weight.device)
    missing, unexpected = hf.load_state_dict(gpt2_state(model), strict=False)
    # GPT-2 keeps no persistent buffers, and a tied lm_head.weight is the same tensor as wte.
    if [name for name in missing if name != "lm_head.weight"] or unexpected:
        raise NanoMarkovError(
            f"this transformers lays out GPT-2 differently (missing {missing}, unexpected {unexpected}); "
            f"install the one the hf extra allows: {HF_INSTALL}"
        )
    check_same_logits(model, hf)
    return hf.eval()


def export_hf(ckpt_or_model, out_dir):
    """Write a Hugging Face GPT-2 folder (config.json, model.safetensors, generation_config.json); return it.

    The folder is written whole beside `out_dir` and swapped in (files.swap_in), so an interrupted
    export leaves the previous one (and its build is removed by the next export); an existing folder
    that is not such an export is never replaced, and a second export into it is refused meanwhile.
    """
    # No force: the folder is replaced whole, so a folder of anything else would be lost with it.
    out = check_output_folder(out_dir, "Hugging Face export", is_hf_export, force=None)
    refuse_the_current_folder(out, "export --format hf", "its")
    hf = to_hf_gpt2(ckpt_or_model)
    with writer_lock(out, "Hugging Face export"):
        build = None
        try:
            build = new_build_folder(out)
            save_quietly(hf, build)
            follow_umask(build)  # transformers writes the weights 0600; the user's umask decides, as for every file
            swap_in(build, out)
        except OSError as e:
            raise NanoMarkovError(
                f"cannot write the export to {out} ({e.strerror or e}); choose another --out"
            ) from None
        finally:  # the unfinished build (an interrupt, a failure), or after the swap the previous export
            if build is not None:
                shutil.rmtree(build, ignore_errors=True)
    return out


def save_quietly(hf, folder):
    """hf.save_pretrained(folder) without transformers' "Writing model shards" bar on stderr; the bar's
    setting is transformers' global, so it is put back as it was. OSError where the weights cannot be
    written (safetensors reports a full disk as its own error, not as an OSError)."""
    from safetensors import SafetensorError
    from transformers.utils import logging as transformers_logging

    was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        hf.save_pretrained(folder)
    except SafetensorError as e:
        raise OSError(str(e).rpartition("I/O error: ")[2] or str(e)) from None
    finally:
        if was_enabled:
            transformers_logging.enable_progress_bar()


def is_hf_export(folder) -> bool:
    """Whether `folder` holds a folder export_hf wrote (its config.json says so)."""
    config = read_json_or_none(Path(folder) / "config.json")
    marker = config.get("nanomarkov") if isinstance(config, dict) else None
    return isinstance(marker, dict) and marker.get("format") == HF_FORMAT
