"""safetensors export and nanomarkov.load: same logits, ties kept, no pickle ever run."""

import dataclasses
import importlib.metadata
import json
import pathlib

import pytest
import torch

import nanomarkov
from nanomarkov import NanoMarkovError
from nanomarkov.checkpoint import export_safetensors, load
from nanomarkov.cli import main
from nanomarkov.config import PRESETS, TrainConfig, preset
from nanomarkov.files import writer_lock
from nanomarkov.model import GPT, GPTConfig

V = 101  # MM-100: 100 states + BOS
try:  # the installed TransformerLens's major version (0: none), for the interop tests' skips
    TL_MAJOR = int(importlib.metadata.version("transformer_lens").split(".")[0])
except importlib.metadata.PackageNotFoundError:
    TL_MAJOR = 0


def trained_looking(config, seed=0):
    """A GPT whose trainable tensors (biases and norms too) are all random, so nothing round-trips by luck."""
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


# Switches no preset sets, as cases beside the presets in the conversion tests: "c9+attn_only" is
# preset c9 with attn_only=True (c2: LayerNorm, positions, RELU unused; c9: no LayerNorm, no positions, one-hot).
VARIANTS = ("c2+attn_only", "c9+attn_only")


def preset_config(name):
    base, *switches = name.split("+")
    config = TrainConfig.from_dict(preset(base, 100)).gpt_config(V, 16)
    return dataclasses.replace(config, **dict.fromkeys(switches, True))


def inputs(config, n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, config.vocab_size - 1, (n, config.block_size), generator=g)
    idx[:, 0] = config.vocab_size - 1  # BOS-led, as the model always sees them
    return idx


def write_ckpt(model, path):
    torch.save(
        {
            "model": model.state_dict(),
            "model_args": dataclasses.asdict(model.config),
            "iter": 7,
            "data_dir": "data/mm100",
        },
        path,
    )
    return path


@pytest.mark.parametrize("name", PRESETS + VARIANTS)
def test_round_trip_gives_identical_logits_for_every_preset(name, tmp_path):
    model = trained_looking(preset_config(name))
    export_safetensors(model, tmp_path / "export")
    loaded = nanomarkov.load(tmp_path / "export")
    assert not loaded.training and loaded.config == model.config
    idx = inputs(model.config)
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], model(idx)[0])
    # Frozen tensors stay frozen: the rebuilt model trains like the original would.
    assert [p.requires_grad for p in loaded.parameters()] == [p.requires_grad for p in model.parameters()]


@pytest.mark.parametrize("tied", [True, False])
def test_tied_head_is_saved_once_and_tied_again(tied, tmp_path):
    model = trained_looking(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=11, lm_head_tied=tied))
    export_safetensors(model, tmp_path)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "model.safetensors")
    config = json.loads((tmp_path / "config.json").read_text())
    assert ("lm_head.weight" in saved) == (not tied)
    assert config["tied_weights"] == ({"lm_head.weight": "wte.weight"} if tied else {})
    loaded = load(tmp_path)
    assert (loaded.lm_head.weight is loaded.wte.weight) == tied
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight, rtol=0, atol=0)


@pytest.mark.parametrize("tied", [True, False])
def test_head_bias_round_trips_and_older_files_without_the_added_fields_still_load(tied, tmp_path):
    model = trained_looking(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=11, lm_head_bias=True))
    export_safetensors(model, tmp_path / "new")
    loaded = load(tmp_path / "new")
    assert loaded.config.lm_head_bias and torch.equal(loaded.lm_head.bias, model.lm_head.bias)
    # Files written before the fields existed: neither in config.json nor in model_args (named here, not read
    # from gpt_config.ADDED_FIELDS, so that a field left out of it fails this test).
    added = ("lm_head_bias", "attn_only", "alibi", "alibi_trained")
    old = trained_looking(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=11, lm_head_tied=tied))
    export_safetensors(old, tmp_path / "old")
    config_file = tmp_path / "old" / "config.json"
    config_file.write_text(json.dumps({k: v for k, v in json.loads(config_file.read_text()).items() if k not in added}))
    ckpt = write_ckpt(old, tmp_path / "ckpt.pt")
    saved = torch.load(ckpt)
    saved["model_args"] = {k: v for k, v in saved["model_args"].items() if k not in added}
    torch.save(saved, ckpt)
    idx = inputs(old.config)
    for source in (tmp_path / "old", ckpt):
        again = load(source)
        assert again.config == old.config and again.lm_head.bias is None and again.blocks[0].mlp is not None
        with torch.no_grad():
            assert torch.equal(again(idx)[0], old(idx)[0])


def test_config_json_carries_every_gpt_field_and_the_format(tmp_path):
    model = trained_looking(preset_config("c9"))
    export_safetensors(write_ckpt(model, tmp_path / "ckpt.pt"), tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert {k: config[k] for k in dataclasses.asdict(model.config)} == dataclasses.asdict(model.config)
    assert config["format"] == "nanomarkov.GPT" and config["format_version"] == 1
    assert config["source"] == {"checkpoint": str(tmp_path / "ckpt.pt"), "iter": 7, "data_dir": "data/mm100"}


def test_load_reads_a_checkpoint_and_the_weights_file_itself(tmp_path):
    model = trained_looking(preset_config("default"))
    ckpt = write_ckpt(model, tmp_path / "ckpt.pt")
    idx = inputs(model.config)
    with torch.no_grad():
        expected = model(idx)[0]
        assert torch.equal(nanomarkov.load(ckpt)(idx)[0], expected)
        export_safetensors(ckpt, tmp_path / "out")
        assert torch.equal(load(tmp_path / "out" / "model.safetensors")(idx)[0], expected)


class Bomb:
    """Unpickling this creates a file: the evidence that pickled code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_pickle_bearing_files_are_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    model = trained_looking(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=11))
    evil_ckpt = tmp_path / "ckpt.pt"
    torch.save(
        {
            "model": model.state_dict(),
            "model_args": dataclasses.asdict(model.config),
            "data_dir": "d",
            "payload": Bomb(marker),
        },
        evil_ckpt,
    )
    with pytest.raises(NanoMarkovError, match="not a readable nanoMarkov checkpoint"):
        load(evil_ckpt)
    # The same pickle dressed as an export folder's weights.
    export_safetensors(model, tmp_path / "export")
    (tmp_path / "export" / "model.safetensors").write_bytes(evil_ckpt.read_bytes())
    with pytest.raises(NanoMarkovError, match="not a readable safetensors file"):
        load(tmp_path / "export")
    assert not marker.exists()


def test_broken_exports_name_what_to_do(tmp_path):
    with pytest.raises(NanoMarkovError, match="nothing there"):
        load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NanoMarkovError, match="nanomarkov export CKPT"):
        load(tmp_path / "empty")
    model = trained_looking(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=11))
    export_safetensors(model, tmp_path / "out")
    config_file = tmp_path / "out" / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(NanoMarkovError, match="upgrade nanomarkov"):
        load(tmp_path / "out")
    config_file.write_text(json.dumps({**config, "n_embd": 32}))
    with pytest.raises(NanoMarkovError, match="does not match its config.json"):
        load(tmp_path / "out")


def test_cli_export_and_its_one_line_errors(tmp_path, capsys):
    model = trained_looking(preset_config("c12"))
    ckpt = write_ckpt(model, tmp_path / "ckpt.pt")
    assert main(["export", str(ckpt), "--format", "safetensors", "--out", str(tmp_path / "out")]) == 0
    assert "model.safetensors" in capsys.readouterr().out
    idx = inputs(model.config)
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "out")(idx)[0], model(idx)[0])
    # A run folder stands for its ckpt.pt, as eval takes it.
    assert main(["export", str(tmp_path), "--format", "safetensors", "--out", str(tmp_path / "out2")]) == 0
    assert (tmp_path / "out2" / "model.safetensors").is_file()
    capsys.readouterr()

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for argv, needle in [
        (["export", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "x")], "no checkpoint there"),
        (["export", str(ckpt), "--format", "onnx", "--out", str(tmp_path / "x")], "invalid choice"),
        (["export", str(ckpt), "--out", str(blocker / "sub")], "a_file is a file, not a folder"),
        (["export", str(ckpt)], "--out"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1, err


def test_a_second_export_into_a_folder_being_written_is_refused_and_the_first_kept(tmp_path):
    model = trained_looking(preset_config("c12"))
    export_safetensors(model, tmp_path / "export")
    before = {path.name: path.read_bytes() for path in (tmp_path / "export").iterdir()}
    with writer_lock(tmp_path / "export", "export"):  # another export, midway
        with pytest.raises(NanoMarkovError, match="another export is writing here"):
            export_safetensors(model, tmp_path / "export")
    assert {path.name: path.read_bytes() for path in (tmp_path / "export").iterdir()} == before
