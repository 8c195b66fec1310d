"""Weights-only snapshots: save_snapshot / list_snapshots / load_snapshot round-trip a model exactly,
name files by iteration and tokens, skip partial writes, and refuse a damaged file in one line."""

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from test_train import BATCH, SEQ_LEN, Stop, config, fail_at, make_data, one_thread, run  # noqa: F401 (autouse)

import nanomarkov
from nanomarkov import NanoMarkovError
from nanomarkov.checkpoint import export_safetensors, list_snapshots, load_snapshot, save_snapshot
from nanomarkov.model import GPT, GPTConfig
from nanomarkov.sweep.grid import expand_grid
from nanomarkov.train import snapshot_iters


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data") / "d")


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
    assert torch.equal(nanomarkov.load(path)(idx)[0], model(idx)[0])  # the package's front door opens it too


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


# ------------------------------------------------------------------ the series a run keeps


@pytest.mark.parametrize(
    "n, max_iters, expected",
    [
        (4, 10000, [0, 1, 10, 100, 1000, 10000]),  # 10000^(k/4)
        (3, 40, [0, 1, 3, 12, 40]),  # 40^(1/3) = 3.4, 40^(2/3) = 11.7
        (3, 3, [0, 1, 2, 3]),  # more asked than there are iterations: every one
        (5, 0, [0]),
        (0, 100, []),
    ],
)
def test_snapshot_iterations_are_log_spaced_with_the_first_and_the_last(n, max_iters, expected):
    assert snapshot_iters(n, max_iters) == expected


def test_snapshot_iterations_stay_distinct_where_rounding_would_merge_them():
    iters = snapshot_iters(30, 600)
    assert len(iters) == 32 and iters == sorted(set(iters)) and (iters[0], iters[-1]) == (0, 600)
    assert iters[-2] == round(600 ** (29 / 30))  # the late ones are the log-spaced points themselves


@pytest.mark.parametrize(
    "n, max_iters, every, expected",
    [
        (0, 40, 10, [0, 10, 20, 30, 40]),
        (0, 45, 10, [0, 10, 20, 30, 40, 45]),  # the last iteration too
        (0, 3, 1, [0, 1, 2, 3]),
        (0, 7, 7, [0, 7]),
        (3, 40, 15, [0, 1, 3, 12, 15, 30, 40]),  # the union with 0, 1, 3, 12, 40
        (3, 40, 0, [0, 1, 3, 12, 40]),
    ],
)
def test_snapshot_every_n_iterations_alone_and_with_the_log_spaced_ones(n, max_iters, every, expected):
    assert snapshot_iters(n, max_iters, every) == expected


def snapshot_counts(out_dir):
    return [(i, t) for i, t, _ in list_snapshots(out_dir)]


def test_a_run_keeps_its_series_and_a_resume_with_more_iters_follows_the_new_one(data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    tokens_per_iter = BATCH * (SEQ_LEN - 1)
    fail_at(monkeypatch, 23)  # after iter 22's snapshot, past the checkpoint of iter 20
    with pytest.raises(Stop):
        run(config(data, out, snapshots=6, snapshot_every=7))
    monkeypatch.undo()
    # 40^(k/6): 1, 1.8, 3.4, 6.3, 11.7, 21.6, 40; with every 7th: 7, 14, 21, 28, 35
    assert snapshot_counts(out) == [(i, i * tokens_per_iter) for i in (0, 1, 2, 3, 6, 7, 12, 14, 21, 22)]
    killed_21 = load_snapshot(list_snapshots(out)[-2][2])[0].state_dict()
    first, counts = load_snapshot(list_snapshots(out)[0][2])
    torch.manual_seed(42)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), GPT(first.config).state_dict().values()))
    run(config(data, out, snapshots=6, snapshot_every=7, init_from="resume", max_iters=60))
    # Kept up to the checkpoint (20), then 60^(k/6): 1, 2.0, 3.9, 7.7, 15.3, 30.3, 60 and every 7th to 56;
    # iter 22 is gone, 21 is written again (each file once: they are named by iteration).
    assert snapshot_counts(out) == [
        (i, i * tokens_per_iter) for i in (0, 1, 2, 3, 6, 7, 12, 14, 21, 28, 30, 35, 42, 49, 56, 60)
    ]
    again_21 = load_snapshot(list_snapshots(out)[8][2])[0].state_dict()
    assert all(torch.equal(again_21[name], killed_21[name]) for name in killed_21)  # the resume is exact on CPU
    last, counts = load_snapshot(list_snapshots(out)[-1][2])
    assert counts == {"iter": 60, "tokens": 60 * tokens_per_iter}
    final = torch.load(out / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(last.state_dict()[name], final[name]) for name in final)
    run(config(data, out), overwrite=True)  # a new run in the folder: the old series goes
    assert snapshot_counts(out) == []


def test_a_grid_passes_snapshots_attn_only_and_the_data_source_to_its_runs(tmp_path):
    grid = {
        "defaults": {
            "snapshots": 30,
            "snapshot_every": 10,
            "attn_only": True,
            "mlp_only": False,
            "data_source": "online",
        },
        "datasets": [{"n_states": 3, "train": 100, "val": 10}],
        "experiments": [{"seeds": [1]}, {"seeds": [2], "overrides": {"data_source": "fixed"}, "tag": "fixed"}],
    }
    configs = [spec.config() for spec in expand_grid(grid, tmp_path)]
    assert [(c.snapshots, c.snapshot_every, c.attn_only, c.data_source) for c in configs] == [
        (30, 10, True, "online"),
        (30, 10, True, "fixed"),
    ]
    with pytest.raises(NanoMarkovError, match="data_source must be"):
        expand_grid({**grid, "defaults": {"data_source": "live"}}, tmp_path)
