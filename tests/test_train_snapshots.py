"""Weights-only snapshots: save_snapshot / list_snapshots / load_snapshot round-trip a model exactly,
name files by iteration and tokens, skip partial writes, and refuse a damaged file in one line."""

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nanomarkov import NanoMarkovError
from nanomarkov.checkpoint import export_safetensors, list_snapshots, load_snapshot, save_snapshot
from nanomarkov.model import GPT, GPTConfig


def random_model(tied=True, seed=0):
    """A small GPT whose every trainable tensor is random, so nothing round-trips by luck."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=4, vocab_size=5, lm_head_tied=tied))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("tied", [True, False])
def test_a_snapshot_round_trips_weights_config_and_counts(tmp_path, tied):
    model = random_model(tied)
    path = save_snapshot(model, tmp_path, 120, 7680)
    assert path == tmp_path / "snapshots" / "iter0000120-tokens7680.safetensors"
    loaded, counts = load_snapshot(path)
    assert counts == {"iter": 120, "tokens": 7680}
    assert loaded.config == model.config and not loaded.training
    idx = torch.tensor([[4, 0, 1, 3]])
    assert torch.equal(loaded(idx)[0], model(idx)[0])
    assert (loaded.lm_head.weight is loaded.wte.weight) == tied


def test_snapshot_tensors_and_metadata_are_those_of_the_export(tmp_path):
    model = random_model(tied=True)
    export_safetensors(model, tmp_path / "export")
    path = save_snapshot(model, tmp_path, 0, 0)
    with safe_open(tmp_path / "export" / "model.safetensors", framework="pt") as f:
        exported = set(f.keys())
    with safe_open(path, framework="pt") as f:
        assert set(f.keys()) == exported
        metadata = f.metadata()
    assert metadata["format"] == "nanomarkov.GPT" and (metadata["iter"], metadata["tokens"]) == ("0", "0")
    assert json.loads(metadata["config"]) == dataclasses.asdict(model.config)


def test_list_snapshots_sorts_by_iteration_and_ignores_other_files(tmp_path):
    assert list_snapshots(tmp_path) == []
    model = random_model()
    for iter_num, tokens in [(1000, 64000), (3, 192), (0, 0)]:
        save_snapshot(model, tmp_path, iter_num, tokens)
    folder = tmp_path / "snapshots"
    (folder / "iter0000050-tokens3200.safetensors.partial").write_bytes(b"half")
    (folder / "notes.txt").write_text("x")
    listed = list_snapshots(tmp_path)
    assert [(i, t) for i, t, _ in listed] == [(0, 0), (3, 192), (1000, 64000)]
    assert all(p.parent == folder and p.is_file() for _, _, p in listed)


def damage(path, how):
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    elif how == "text":
        path.write_text("hello\n")
    elif how == "foreign":
        save_file({"w": torch.zeros(2)}, path)
    elif how in ("bad config", "wrong weights"):
        with safe_open(path, framework="pt") as f:
            metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        if how == "bad config":
            metadata["config"] = json.dumps({"n_layer": 1})
        else:
            tensors["wte.weight"] = torch.zeros(3, 3)
        save_file(tensors, path, metadata=metadata)


@pytest.mark.parametrize(
    "how, needle",
    [
        ("truncated", "not a readable safetensors file"),
        ("text", "not a readable safetensors file"),
        ("foreign", "not a nanoMarkov snapshot"),
        ("bad config", "not nanoMarkov's GPTConfig"),
        ("wrong weights", "mis-shaped: wte.weight"),
        ("missing", "no snapshot there"),
    ],
)
def test_a_damaged_snapshot_is_refused_in_one_line(tmp_path, how, needle):
    path = save_snapshot(random_model(), tmp_path, 5, 320)
    if how == "missing":
        path.unlink()
    else:
        damage(path, how)
    with pytest.raises(NanoMarkovError) as error:
        load_snapshot(path)
    message = str(error.value)
    assert needle in message and str(path) in message and "\n" not in message
    assert "--snapshots" in message
