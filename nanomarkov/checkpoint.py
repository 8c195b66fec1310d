"""Saving and loading a model: the training checkpoint (ckpt.pt), and a trained GPT as
`model.safetensors` + `config.json` and back, with no pickle anywhere.

A checkpoint (ckpt.pt) carries the optimizer, RNG state and training config, and
is read with torch's restricted unpickler. Interpretability tools want less and
want it safer: the weights in safetensors (a flat, code-free tensor format) and
the GPTConfig as plain JSON, so a model can be rebuilt with nothing but this
package's model.py.

safetensors refuses two names for one storage, and a tied head is exactly that
(lm_head.weight is wte.weight). So each tensor is saved once, under its first
name, and config.json records the other names in "tied_weights"; rebuilding
GPT(config) re-creates the tie itself, and `load` checks that it did.
"""

import dataclasses
import io
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save

from nanomarkov.errors import NanoMarkovError
from nanomarkov.files import json_text, write_atomic, write_atomic_together
from nanomarkov.model import GPT, GPTConfig

FORMAT = "nanomarkov.GPT"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMATS = ("safetensors",)
CHECKPOINT = "ckpt.pt"


def save_checkpoint(path, state):
    """Replace ckpt.pt all at once (files.write_atomic): a kill or a full disk mid-write leaves the previous one."""
    buffer = io.BytesIO()  # serialised first: a torch.save that fails half-way never touches the disk
    torch.save(state, buffer)
    write_atomic(path, buffer.getbuffer(), what="checkpoint")


def load_checkpoint(path):
    """Read a checkpoint without running any pickled code; one clear error if it can't be read."""
    path = Path(path)
    if not path.is_file():
        raise NanoMarkovError(f"{path}: no checkpoint there")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for truncated, foreign or unsafe files
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise NanoMarkovError(f"{path}: not a readable nanoMarkov checkpoint ({first_line})") from None


def load_model(ckpt_path):
    """(model in eval mode, checkpoint dict) from a ckpt.pt, without running pickled code."""
    ckpt = load_checkpoint(ckpt_path)
    for key in ("model", "model_args", "data_dir"):
        if key not in ckpt:
            raise NanoMarkovError(f"{ckpt_path}: not a nanoMarkov checkpoint (no '{key}')")
    model = GPT(GPTConfig(**ckpt["model_args"]))
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt


def model_and_source(ckpt_or_model):
    """(GPT, provenance dict) from a GPT or a path that `load` accepts."""
    if isinstance(ckpt_or_model, GPT):
        return ckpt_or_model, {}
    if isinstance(ckpt_or_model, (str, os.PathLike)):
        path = Path(ckpt_or_model)
        if path.is_file() and path.name != WEIGHTS_FILE:
            model, ckpt = load_model(path)
            return model, {"checkpoint": str(path), "iter": ckpt.get("iter"), "data_dir": ckpt.get("data_dir")}
        return load(path), {"export": str(path)}
    raise NanoMarkovError(f"expected a GPT or a path to a ckpt.pt, got {type(ckpt_or_model).__name__}")


def _unique_tensors(state):
    """(tensors saved once each, {alias: saved name}) for a state_dict whose entries may share storage."""
    unique, tied, first_name = {}, {}, {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if key in first_name:
            tied[name] = first_name[key]
        else:
            first_name[key] = name
            # contiguous CPU copies: safetensors writes raw bytes and wants them in one block.
            unique[name] = tensor.detach().to("cpu").contiguous()
    return unique, tied


def export_safetensors(ckpt_or_model, out_dir):
    """Write `out_dir/model.safetensors` and `out_dir/config.json` for a GPT or a ckpt.pt; return out_dir.

    config.json holds every GPTConfig field at the top level, plus "format",
    "format_version", "tied_weights" and "source" (the checkpoint, its iter and
    dataset, when exported from one). Existing files of these two names are
    replaced together (files.write_atomic_together): an interrupted export or a full
    disk leaves the previous export as it was, never new weights beside an old config.
    """
    model, source = model_and_source(ckpt_or_model)
    tensors, tied = _unique_tensors(model.state_dict())
    config = {
        **dataclasses.asdict(model.config),
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tied_weights": tied,
        "source": source,
    }
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise NanoMarkovError(f"cannot write the export to {out} ({e.strerror or e}); choose another --out") from None
    # Bytes written by us rather than safetensors' save_file, whose files ignore the umask (mode 0600).
    weights = save(tensors, metadata={"format": "pt", "nanomarkov_format": FORMAT})
    write_atomic_together({out / WEIGHTS_FILE: weights, out / CONFIG_FILE: json_text(config)}, what="export")
    return out


def _read_config(folder):
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise NanoMarkovError(
            f"{folder}: no {CONFIG_FILE}; export a checkpoint there with "
            f"`nanomarkov export CKPT --format safetensors --out {folder}`"
        )
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NanoMarkovError(f"{path}: not readable JSON ({e}); export the model again") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise NanoMarkovError(f"{path}: not a nanoMarkov export (format is not {FORMAT!r})")
    if not isinstance(config.get("format_version"), int) or config["format_version"] > FORMAT_VERSION:
        raise NanoMarkovError(
            f"{path}: format_version {config.get('format_version')!r} is newer than this "
            f"nanoMarkov reads ({FORMAT_VERSION}); upgrade nanomarkov"
        )
    fields = [f.name for f in dataclasses.fields(GPTConfig)]
    missing = [name for name in fields if name not in config]
    if missing:
        raise NanoMarkovError(f"{path}: GPTConfig field(s) {', '.join(missing)} missing; export the model again")
    return GPTConfig(**{name: config[name] for name in fields}), config.get("tied_weights") or {}


def _load_export(folder):
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    gpt_config, tied = _read_config(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise NanoMarkovError(f"{folder}: no {WEIGHTS_FILE}; export the model again")
    try:
        state = load_file(weights)
    except (SafetensorError, OSError) as e:
        raise NanoMarkovError(f"{weights}: not a readable safetensors file ({e}); export the model again") from None
    for alias, name in tied.items():
        if name not in state:
            raise NanoMarkovError(f"{folder}: tied weight {alias} refers to {name}, which is not in {WEIGHTS_FILE}")
        state[alias] = state[name]
    model = GPT(gpt_config)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first_line = str(e).strip().splitlines()[0]
        raise NanoMarkovError(
            f"{weights} does not match its {CONFIG_FILE} ({first_line}); export the model again"
        ) from None
    if gpt_config.lm_head_tied and model.lm_head.weight is not model.wte.weight:
        raise NanoMarkovError(f"{folder}: the head lost its tie to the embedding; this is a bug, please report it")
    return model


def load(path):
    """A GPT in eval mode from an export folder (model.safetensors + config.json) or a ckpt.pt.

    Nothing pickled is ever executed: a folder is read with safetensors and
    json, a checkpoint with torch.load(weights_only=True). The model is on the
    CPU in float32; move it with .to(device).
    """
    path = Path(path)
    if path.is_dir():
        return _load_export(path).eval()
    if path.is_file() and path.name == WEIGHTS_FILE:
        return _load_export(path.parent).eval()
    if path.is_file():
        return model_and_source(path)[0].eval()
    raise NanoMarkovError(
        f"{path}: nothing there; give an export folder (model.safetensors + config.json) or a ckpt.pt"
    )
