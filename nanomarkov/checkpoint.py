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
import re
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from nanomarkov.errors import NanoMarkovError
from nanomarkov.files import (
    check_output_folder,
    check_own_files,
    json_text,
    read_capped,
    read_json_or_none,
    write_atomic,
    write_atomic_together,
    writer_lock,
)
from nanomarkov.gpt_config import ADDED_FIELDS, FLOAT32_BYTES, GPTConfig, weight_count
from nanomarkov.memory import check_fits
from nanomarkov.model import GPT

FORMAT = "nanomarkov.GPT"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
EXPORT_FILES = (WEIGHTS_FILE, CONFIG_FILE)
CHECKPOINT = "ckpt.pt"
SNAPSHOTS = "snapshots"  # a run's folder of weights-only snapshots (save_snapshot)
SNAPSHOT_NAME = re.compile(r"^iter(\d{7,})-tokens(\d+)\.safetensors$")


def save_checkpoint(path, state):
    """Replace ckpt.pt all at once (files.write_atomic): a kill or a full disk mid-write leaves the previous one."""
    buffer = io.BytesIO()  # serialised first: a torch.save that fails half-way never touches the disk
    torch.save(state, buffer)
    write_atomic(path, buffer.getbuffer(), what="checkpoint")


# What every refusal of a checkpoint suggests instead.
CHECKPOINT_FIX = "give a ckpt.pt that `nanomarkov train` wrote (trainings/.../ckpt.pt), or train again"
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since torch 1.6 is a zip archive


def _not_a_torch_file(head: bytes) -> str:
    """What a file whose first bytes are `head` looks like, when it is not torch.save's zip archive."""
    if not head:
        return "an empty file"
    if head[:1] == b"\x80":
        return "a raw pickle, not torch.save's format (nanoMarkov never unpickles code)"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return "not torch.save's format"
    return f"a text file (it starts {head[:20].decode('utf-8')!r})"


def _cause_without_advice(error: Exception) -> str:
    """torch's weights-only failures advise weights_only=False, which would run the file's code: keep only the cause."""
    text = str(error)
    unsafe = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if unsafe:
        return f"it holds a pickled object ({unsafe.group(1)}) beyond tensors and plain data, never run here"
    first_line = text.strip().splitlines()[0] if text.strip() else ""
    if first_line and "weights_only" not in first_line and "Weights only" not in first_line:
        return first_line
    return f"{type(error).__name__}: torch's restricted loader refused it"


def checkpoint_path(path):
    """The checkpoint file `path` names: a run folder stands for its ckpt.pt."""
    path = Path(path)
    return path / "ckpt.pt" if path.is_dir() else path


def load_checkpoint(path):
    """The dict in a checkpoint (a ckpt.pt, or a run folder holding one), read without running any pickled
    code; one clear error if it can't be."""
    path = checkpoint_path(path)
    if not path.is_file():
        raise NanoMarkovError(f"{path}: no checkpoint there; {CHECKPOINT_FIX}")
    try:
        with path.open("rb") as f:
            head = f.read(len(ZIP_MAGIC))
    except OSError as e:
        raise NanoMarkovError(f"{path}: cannot read it ({e.strerror or e})") from None
    if head != ZIP_MAGIC:
        raise NanoMarkovError(f"{path}: not a nanoMarkov checkpoint: {_not_a_torch_file(head)}; {CHECKPOINT_FIX}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols: the error below says what matters
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for truncated, foreign or unsafe files
        raise NanoMarkovError(
            f"{path}: not a readable nanoMarkov checkpoint ({_cause_without_advice(e)}); {CHECKPOINT_FIX}"
        ) from None
    if not isinstance(ckpt, dict):
        raise NanoMarkovError(
            f"{path}: not a nanoMarkov checkpoint (it holds a {type(ckpt).__name__}); {CHECKPOINT_FIX}"
        )
    return ckpt


def _model_config(ckpt, path, fix=CHECKPOINT_FIX) -> GPTConfig:
    """The GPTConfig a checkpoint's model_args describe, refusing args that are not exactly GPTConfig's fields."""
    args = ckpt["model_args"]
    if not isinstance(args, dict):
        raise NanoMarkovError(f"{path}: model_args is a {type(args).__name__}, not a dict; {fix}")
    fields = [f.name for f in dataclasses.fields(GPTConfig)]
    foreign = [str(name) for name in args if name not in fields]
    missing = [name for name in fields if name not in args and name not in ADDED_FIELDS]
    if foreign or missing:
        what = "; ".join(
            part
            for part in (foreign and f"unknown field(s) {', '.join(foreign)}", missing and f"no {', '.join(missing)}")
            if part
        )
        raise NanoMarkovError(f"{path}: model_args are not nanoMarkov's GPTConfig ({what}); {fix}")
    try:
        return GPTConfig(**args)  # a field of ADDED_FIELDS it lacks takes its default
    except (NanoMarkovError, TypeError, ValueError) as e:
        raise NanoMarkovError(f"{path}: invalid model_args ({e}); {fix}") from None


def build_checked(config, path, fix) -> GPT:
    """GPT(config) for the file `path`, refused before it is built when its weights do not fit in memory
    (a file whose model_args were edited to n_embd = 10**6 must not take the machine down)."""
    count = weight_count(config)
    check_fits(
        count * FLOAT32_BYTES,
        f"{path}: the model it describes ({count:,} weights, n_embd {config.n_embd}, n_layer {config.n_layer})",
        f"open it where more memory is free, or {fix}",
    )
    return GPT(config)


def _listed(names, limit=3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _weights_mismatch(state, model) -> str:
    """Which weights of `state` do not fit `model` (missing, extra, mis-shaped); '' when all fit."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        return "the weights are not a dict of tensors"
    expected = model.state_dict()
    missing = [name for name in expected if name not in state]
    extra = [str(name) for name in state if name not in expected]
    misshaped = [
        f"{name} {tuple(state[name].shape)} where the model has {tuple(tensor.shape)}"
        for name, tensor in expected.items()
        if name in state and state[name].shape != tensor.shape
    ]
    parts = [(missing, "missing"), (extra, "extra"), (misshaped, "mis-shaped")]
    return "; ".join(f"{label}: {_listed(names)}" for names, label in parts if names)


def load_model(ckpt_path):
    """(model in eval mode, checkpoint dict) from a ckpt.pt, without running pickled code."""
    ckpt_path = checkpoint_path(ckpt_path)
    ckpt = load_checkpoint(ckpt_path)
    for key in ("model", "model_args", "data_dir"):
        if key not in ckpt:
            raise NanoMarkovError(f"{ckpt_path}: not a nanoMarkov checkpoint (no '{key}'); {CHECKPOINT_FIX}")
    model = build_checked(_model_config(ckpt, ckpt_path), ckpt_path, CHECKPOINT_FIX)
    mismatch = _weights_mismatch(ckpt["model"], model)
    if mismatch:
        raise NanoMarkovError(
            f"{ckpt_path}: its weights do not fit its model_args ({mismatch}); the file is damaged or "
            f"not nanoMarkov's: {CHECKPOINT_FIX}"
        )
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt


def model_and_source(ckpt_or_model):
    """(GPT, provenance dict) from a GPT or a path that `load` accepts."""
    if isinstance(ckpt_or_model, GPT):
        return ckpt_or_model, {}
    if isinstance(ckpt_or_model, (str, os.PathLike)):
        path = Path(ckpt_or_model)
        if path.is_file() and SNAPSHOT_NAME.match(path.name):
            model, counts = load_snapshot(path)
            return model, {"snapshot": str(path), **counts}
        if path.is_file() and path.name != WEIGHTS_FILE:
            model, ckpt = load_model(path)
            return model, {"checkpoint": str(path), "iter": ckpt.get("iter"), "data_dir": ckpt.get("data_dir")}
        return load(path), {"export": str(path)}
    raise NanoMarkovError(f"expected a GPT or a path to a ckpt.pt, got {type(ckpt_or_model).__name__}")


def nonfinite_weights(model) -> list:
    """The names of the model's weights holding a NaN or an infinity (none: an empty list)."""
    return [name for name, tensor in model.state_dict().items() if not torch.isfinite(tensor).all()]


def check_finite_weights(model, source, what="export"):
    """Refuse a model whose weights hold NaN or inf: nothing computed from it means anything."""
    broken = nonfinite_weights(model)
    if broken:
        named = source.get("checkpoint") or source.get("snapshot") or source.get("export") or "the model"
        raise NanoMarkovError(
            f"{named}: its weights are not finite (NaN or inf in {_listed(broken)}), so there is no model to "
            f"{what}; use an earlier checkpoint or snapshot, or retrain (e.g. with a lower learning rate)"
        )


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


def is_export_folder(folder) -> bool:
    """Whether `folder` holds an export of nanoMarkov (its config.json says the format)."""
    config = read_json_or_none(Path(folder) / CONFIG_FILE)
    return config is not None and config.get("format") == FORMAT


def export_safetensors(ckpt_or_model, out_dir, force=False):
    """Write `out_dir/model.safetensors` and `out_dir/config.json` for a GPT or a ckpt.pt; return out_dir.

    `out_dir` is new, empty or an earlier export, or `force` (files.check_output_folder).

    config.json holds every GPTConfig field at the top level, plus "format",
    "format_version", "tied_weights" and "source" (the checkpoint, its iter and
    dataset, when exported from one). Existing files of these two names are
    replaced together (files.write_atomic_together): an interrupted export or a full
    disk leaves the previous export as it was, never new weights beside an old config.
    """
    check_output_folder(out_dir, "model export", is_export_folder, force=force, writes=(*EXPORT_FILES, "*.partial"))
    check_own_files(out_dir, EXPORT_FILES, "model export")
    model, source = model_and_source(ckpt_or_model)
    check_finite_weights(model, source)
    tensors, tied = _unique_tensors(model.state_dict())
    config = {
        **dataclasses.asdict(model.config),
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tied_weights": tied,
        "source": source,
    }
    out = Path(out_dir)
    # Bytes written by us rather than safetensors' save_file, whose files ignore the umask (mode 0600).
    weights = save(tensors, metadata={"format": "pt", "nanomarkov_format": FORMAT})
    with writer_lock(out, "export"):  # a second export into the folder is refused, never interleaved
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
        config = json.loads(read_capped(path))
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
    missing = [name for name in fields if name not in config and name not in ADDED_FIELDS]
    if missing:
        raise NanoMarkovError(f"{path}: GPTConfig field(s) {', '.join(missing)} missing; export the model again")
    return GPTConfig(**{name: config[name] for name in fields if name in config}), config.get("tied_weights") or {}


def _load_export(folder):
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
    model = build_checked(gpt_config, folder, "export the model again")
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
    """A GPT in eval mode from an export folder (model.safetensors + config.json), a ckpt.pt or a snapshot.

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


def snapshot_path(run_folder, iter_num: int, tokens_seen: int) -> Path:
    """Where the snapshot of a run at `iter_num`, after `tokens_seen` training tokens, lives."""
    return Path(run_folder) / SNAPSHOTS / f"iter{iter_num:07d}-tokens{tokens_seen}.safetensors"


def save_snapshot(model, run_folder, iter_num: int, tokens_seen: int) -> Path:
    """Write the model's weights (export_safetensors' tensor names) to RUN/snapshots/iter...-tokens....safetensors.

    Weights only, no optimizer: a snapshot is for looking at a model mid-training, and is
    small enough to keep dozens. The safetensors metadata holds "format", "iter", "tokens",
    "config" (the GPTConfig as JSON) and "tied_weights"; the file appears whole or not at all.
    """
    tensors, tied = _unique_tensors(model.state_dict())
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "iter": str(int(iter_num)),
        "tokens": str(int(tokens_seen)),
        "config": json_text(dataclasses.asdict(model.config), indent=None),
        "tied_weights": json_text(tied, indent=None),
    }
    path = snapshot_path(run_folder, iter_num, tokens_seen)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise NanoMarkovError(f"cannot write a snapshot to {path.parent} ({e.strerror or e})") from None
    return write_atomic(path, save(tensors, metadata=metadata), what="snapshot")


def list_snapshots(run_folder) -> list:
    """[(iter_num, tokens_seen, path)] of a run's snapshots, by iteration (partial writes and other files ignored)."""
    folder = Path(run_folder) / SNAPSHOTS
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = SNAPSHOT_NAME.match(path.name)
        if match and path.is_file():
            found.append((int(match.group(1)), int(match.group(2)), path))
    return sorted(found)


SNAPSHOT_FIX = "give a file that `nanomarkov train --snapshots N` wrote under RUN/snapshots/, or train again"


def _snapshot_metadata(path: Path) -> dict:
    """The checked metadata of a snapshot file: format, iter and tokens as ints, config and tied_weights as dicts."""
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise NanoMarkovError(f"{path}: not a readable safetensors file ({e}); {SNAPSHOT_FIX}") from None
    if metadata.get("format") != FORMAT:
        raise NanoMarkovError(f"{path}: not a nanoMarkov snapshot (format is not {FORMAT!r}); {SNAPSHOT_FIX}")
    try:
        checked = {"iter": int(metadata["iter"]), "tokens": int(metadata["tokens"])}
        checked["config"] = json.loads(metadata["config"])
        checked["tied_weights"] = json.loads(metadata.get("tied_weights", "{}"))
    except (KeyError, ValueError) as e:
        raise NanoMarkovError(f"{path}: damaged snapshot metadata ({type(e).__name__}: {e}); {SNAPSHOT_FIX}") from None
    if not isinstance(checked["config"], dict) or not isinstance(checked["tied_weights"], dict):
        raise NanoMarkovError(f"{path}: damaged snapshot metadata (config is not a JSON object); {SNAPSHOT_FIX}")
    return checked


def snapshot_config(path) -> GPTConfig:
    """A snapshot's GPTConfig, from its metadata alone (no weights read)."""
    return _model_config({"model_args": _snapshot_metadata(Path(path))["config"]}, path, SNAPSHOT_FIX)


def load_snapshot(path):
    """(GPT in eval mode, {"iter": ..., "tokens": ...}) from a file save_snapshot wrote; one clear error if damaged."""
    path = Path(path)
    if not path.is_file():
        raise NanoMarkovError(f"{path}: no snapshot there; {SNAPSHOT_FIX}")
    metadata = _snapshot_metadata(path)
    config = _model_config({"model_args": metadata["config"]}, path, SNAPSHOT_FIX)
    try:
        state = load_file(path)
    except (SafetensorError, OSError) as e:
        raise NanoMarkovError(f"{path}: not a readable safetensors file ({e}); {SNAPSHOT_FIX}") from None
    for alias, name in metadata["tied_weights"].items():
        if name not in state:
            raise NanoMarkovError(f"{path}: tied weight {alias} refers to {name}, which is not there; {SNAPSHOT_FIX}")
        state[alias] = state[name]
    model = build_checked(config, path, SNAPSHOT_FIX)
    mismatch = _weights_mismatch(state, model)
    if mismatch:
        raise NanoMarkovError(f"{path}: its weights do not fit its config ({mismatch}); {SNAPSHOT_FIX}")
    model.load_state_dict(state)
    return model.eval(), {"iter": metadata["iter"], "tokens": metadata["tokens"]}
