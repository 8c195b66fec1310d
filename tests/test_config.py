import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanomarkov import NanoMarkovError
from nanomarkov.config import (
    FIELDS,
    MODEL_FIELDS,
    PRESETS,
    TrainConfig,
    format_config_file,
    load_config_file,
    merge_settings,
    parse_mm_id,
    parse_overrides,
    preset,
    preset_file,
    process_recipe,
)
from nanomarkov.model import GPT, GPTConfig
from nanomarkov.processes.registry import PROCESSES

ROOT = Path(__file__).resolve().parent.parent
EXTRAS = [f"c{i}" for i in range(1, 13)]


def write(tmp_path, text, name="cfg.py"):
    path = tmp_path / name
    path.write_text(text)
    return path


# ---- config files -----------------------------------------------------------


@pytest.mark.parametrize("name", ["default", "seed", *EXTRAS])
@pytest.mark.parametrize("n_states, sparsity", [(100, None), (100, 75), (10, None)])
def test_every_preset_round_trips_through_a_config_file(tmp_path, name, n_states, sparsity):
    cfg = preset(name, n_states, sparsity, seed=7)
    path = write(tmp_path, format_config_file(cfg, header=f"{name}\nsecond line"))
    assert path.read_text().startswith(f"# {name}\n# second line\n")
    assert load_config_file(path) == cfg


def test_partial_dict_round_trips(tmp_path):
    cfg = {"max_iters": 10, "learning_rate": 0.003, "wandb_run_name": "x'y\"z", "compile": "auto", "use_ln": False}
    assert load_config_file(write(tmp_path, format_config_file(cfg))) == cfg


def test_format_rejects_unknown_keys():
    with pytest.raises(NanoMarkovError, match="bogus"):
        format_config_file({"bogus": 1}, "h")


def test_seed_style_file_loads_with_legacy_keys(tmp_path):
    text = "\n".join(
        [
            '"""A seed-style file: comments, helpers, arithmetic."""',
            "_private = 5",
            "_k = 100",
            "out_dir = 'trainings/MM/MM-100/MM-100-1'",
            "dataset = 'openwebtext'",
            "eval_iters = 50",
            "data_dir = f'data/mm{_k}'",
            "vocab_size = 101",
            "block_size = 256",
            "decay_lr = True",
            "n_layer = _private - 3",
            "learning_rate = 5e-3",
            "weight_decay = 1",
            "gradient_accumulation_steps = 40",
            "train_seed = 1",
        ]
    )
    got = load_config_file(write(tmp_path, text))
    assert got == {
        "out_dir": "trainings/MM/MM-100/MM-100-1",
        "data_dir": "data/mm100",
        "decay_lr": True,
        "n_layer": 2,
        "learning_rate": 0.005,
        "weight_decay": 1.0,
        "grad_accum_steps": 40,
        "seed": 1,
    }
    assert isinstance(got["weight_decay"], float)
    TrainConfig.from_dict(got)


def test_unknown_key_in_file_lists_the_valid_ones(tmp_path):
    with pytest.raises(NanoMarkovError) as err:
        load_config_file(write(tmp_path, "max_iter = 5\n"))
    msg = str(err.value)
    assert "'max_iter'" in msg and "did you mean 'max_iters'" in msg
    assert all(key in msg for key in ("grad_accum_steps", "lm_head_tied", "wandb_run_name"))
    assert "\n" not in msg


def test_conflicting_seed_and_train_seed(tmp_path):
    with pytest.raises(NanoMarkovError, match="seed"):
        load_config_file(write(tmp_path, "seed = 1\ntrain_seed = 2\n"))
    assert load_config_file(write(tmp_path, "seed = 3\ntrain_seed = 3\n")) == {"seed": 3}


@pytest.mark.parametrize(
    "text, needle",
    [
        ("n_layer = (\n", "line 1"),
        ("a = 1\nn_layer = undefined_name\n", "line 2"),
        ("n_layer = 2\nn_layer += 'x'\n", "line 2: operator Add on a string"),
        ("n_embd = 2 ** 100\n", "line 1: an exponent beyond 64"),
        ("n_embd = 1 // 0\n", "line 1: arithmetic error"),
        ("wandb_run_name = 'x' * 3\n", "line 1: operator Mult on a string"),
        ("wandb_run_name = f'{1:>9999}'\n", "line 1: a format spec"),
        ("n_layer, n_head = 1, 2\n", "line 1: assigning to anything but plain names"),
        ("n_layer = [2]\n", "line 1: list is not allowed"),
        ("data_dir = b'x'\n", "line 1: a bytes literal is not allowed"),
        ('"""a docstring"""\nn_layer = 2\n5\n', "line 3: a bare value"),
        ("n_layer = 'two'\n", "n_layer must be an integer"),
        ("use_ln = 1\n", "use_ln must be True or False"),
    ],
)
def test_broken_files(tmp_path, text, needle):
    with pytest.raises(NanoMarkovError, match=needle):
        load_config_file(write(tmp_path, text))


HOSTILE_LINES = [
    "import os; os.system('touch PWNED')",
    "from os import system",
    "n_layer = __import__('os').system('touch PWNED')",
    "n_layer = (1).__class__",
    "data_dir = open('PWNED', 'w').name",
    "n_layer = [open('PWNED', 'w') for _ in range(1)][0]",
    "data_dir = f\"{__import__('os').system('touch PWNED')}\"",
    'data_dir = f\'{open("PWNED", "w")!r}\'',
    "n_layer = (lambda: open('PWNED', 'w'))()",
    "def f(): pass",
    "class C: pass",
    "if True: n_layer = 1",
    "with open('PWNED', 'w'): pass",
    'exec(\'open("PWNED", "w")\')',
]


@pytest.mark.parametrize("line", HOSTILE_LINES)
def test_config_files_run_nothing(tmp_path, monkeypatch, line):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, f"n_head = 1\n{line}\n")
    with pytest.raises(
        NanoMarkovError, match=r"line 2: .* is not allowed; a config file holds only assignments"
    ) as err:
        load_config_file(path)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "PWNED").exists()


def test_train_with_a_hostile_config_file_runs_nothing(tmp_path):
    path = write(tmp_path, "n_layer = 1\nimport os; os.system('touch PWNED')\n")
    done = subprocess.run(
        [sys.executable, "-m", "nanomarkov", "train", str(path)], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "line 2: import is not allowed" in done.stderr
    assert not (tmp_path / "PWNED").exists()


def test_config_file_arithmetic_on_earlier_names(tmp_path):
    text = "_k = 100\nmax_iters = 10 * _k\nlr_decay_iters = max_iters\nlearning_rate = -(-3e-3)\nmin_lr = 1e-4\n"
    text += "n_embd = 2 ** 7\nwarmup_iters = 7 // 2 + 7 % 2\nwandb_run_name = 'mm' + f'-{_k}-{max_iters!r}'\n"
    text += "n_layer = 1\nn_layer *= 3\n"
    assert load_config_file(write(tmp_path, text)) == {
        "max_iters": 1000,
        "lr_decay_iters": 1000,
        "learning_rate": 3e-3,
        "min_lr": 1e-4,
        "n_embd": 128,
        "warmup_iters": 4,
        "wandb_run_name": "mm-100-1000",
        "n_layer": 3,
    }


def test_config_file_not_utf8(tmp_path):
    path = tmp_path / "cfg.py"
    path.write_bytes("wandb_run_name = 'caf\u00e9'\n".encode("latin-1"))
    with pytest.raises(NanoMarkovError, match="is not UTF-8 text .*; save it as UTF-8") as err:
        load_config_file(path)
    assert "\n" not in str(err.value)


def test_block_size_must_agree_with_the_dataset(tmp_path):
    from nanomarkov.data import generate_dataset

    generate_dataset(tmp_path / "d", 3, 4, 2, seq_len=16)
    seed_style = f"data_dir = {str(tmp_path / 'd')!r}\nvocab_size = 4\n"
    for agreeing in (16, 15):  # the seed wrote seq_len; the model's context is seq_len-1
        got = load_config_file(write(tmp_path, seed_style + f"block_size = {agreeing}\n"))
        assert got == {"data_dir": str(tmp_path / "d")}
    with pytest.raises(NanoMarkovError, match="has seq_len 16, so block_size is 15; .*--seq_len 65") as err:
        load_config_file(write(tmp_path, seed_style + "block_size = 64\n"))
    assert "\n" not in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(NanoMarkovError, match="cannot read"):
        load_config_file(tmp_path / "nope.py")


# ---- overrides ---------------------------------------------------------------


def test_overrides_parse_and_type_check():
    got = parse_overrides(
        [
            "--max_iters=100",
            "--learning_rate=1",
            "--min_lr=1e-5",
            "--wandb_log=True",
            "--out_dir=runs/a b",
            "--wandb_run_name=2024",
            "--mlp_filter='RELU2'",
            "--compile=auto",
            "--device=cuda:1",
            "--train_seed=9",
            "--data_dir=x=y",
        ]
    )
    assert got == {
        "max_iters": 100,
        "learning_rate": 1.0,
        "min_lr": 1e-5,
        "wandb_log": True,
        "out_dir": "runs/a b",
        "wandb_run_name": "2024",
        "mlp_filter": "RELU2",
        "compile": "auto",
        "device": "cuda:1",
        "seed": 9,
        "data_dir": "x=y",
    }
    assert type(got["learning_rate"]) is float
    assert parse_overrides(["--compile=False"]) == {"compile": False}
    assert parse_overrides([]) == {}


@pytest.mark.parametrize(
    "arg, needle",
    [
        ("--wandb_log=true", "wandb_log must be True or False"),
        ("--wandb_log=1", "wandb_log must be True or False"),
        ("--max_iters=1.5", "max_iters must be an integer"),
        ("--max_iters=True", "max_iters must be an integer"),
        ("--learning_rate=fast", "learning_rate must be a finite number"),
        ("--grad_clip=1e999", "grad_clip must be a finite number"),
        ("--compile=yes", "compile must be"),
        ("--compile=1", "compile must be"),
        ("--max_iterz=5", "did you mean 'max_iters'"),
        ("--vocab_size=50", "read from the dataset"),
        ("max_iters=5", "--key=value"),
        ("--max_iters", "--key=value"),
    ],
)
def test_bad_overrides(arg, needle):
    with pytest.raises(NanoMarkovError, match=needle) as err:
        parse_overrides([arg])
    assert "\n" not in str(err.value)


def test_unknown_override_lists_valid_keys():
    with pytest.raises(NanoMarkovError) as err:
        parse_overrides(["--foo=1"])
    assert "valid keys: " + ", ".join(FIELDS) in str(err.value)


# ---- TrainConfig ---------------------------------------------------------------


def test_model_fields_are_gptconfig_fields_minus_dataset_ones():
    gpt_fields = {f.name: f.default for f in dataclasses.fields(GPTConfig)}
    assert set(MODEL_FIELDS) == set(gpt_fields) - {"vocab_size", "block_size"}
    defaults = TrainConfig()
    assert all(getattr(defaults, k) == gpt_fields[k] for k in MODEL_FIELDS)
    assert set(MODEL_FIELDS) <= set(FIELDS)


def test_gpt_config_takes_vocab_and_block_from_the_dataset():
    g = TrainConfig(n_layer=1, mlp_filter="RELU3").gpt_config(vocab_size=11, block_size=127)
    assert (g.vocab_size, g.block_size, g.n_layer, g.mlp_filter) == (11, 127, 1, "RELU3")


def test_to_dict_from_dict_round_trip():
    c = TrainConfig(max_iters=3, warmup_iters=1, compile=True)
    assert TrainConfig.from_dict(c.to_dict()) == c
    with pytest.raises(NanoMarkovError, match="valid keys"):
        TrainConfig.from_dict({"max_iters": 3, "eval_iters": 5})


@pytest.mark.parametrize(
    "bad, needle",
    [
        (dict(min_lr=0.1, learning_rate=0.01), "min_lr"),
        (dict(learning_rate=0.0), "learning_rate"),
        (dict(beta1=1.0), "beta1"),
        (dict(beta2=-0.1), "beta2"),
        (dict(batch_size=0), "batch_size"),
        (dict(grad_accum_steps=0), "grad_accum_steps"),
        (dict(max_iters=-1), "max_iters"),
        (dict(warmup_iters=100, lr_decay_iters=50), "lr_decay_iters"),
        (dict(grad_clip=-1.0), "grad_clip"),
        (dict(device="tpu"), "device"),
        (dict(device="cuda:x"), "device"),
        (dict(dtype="float64"), "dtype"),
        (dict(compile="yes"), "compile"),
        (dict(init_from="gpt2"), "init_from"),
        (dict(n_embd=100, n_head=8), "divisible"),
        (dict(mlp_first_matrix_identity=True), "mlp_ratio"),
        (dict(mlp_filter="tanh"), "mlp_filter"),
        (dict(out_dir=""), "out_dir"),
        (dict(seed=-1), "seed"),
        (dict(eval_interval=0), "eval_interval"),
        (dict(snapshots=-1), "snapshots"),
        (dict(snapshot_every=-1), "snapshot_every must be >= 0"),
        (dict(snapshot_every=11, max_iters=10), r"snapshot_every \(11\) is more than max_iters \(10\)"),
        (dict(attn_only=True, mlp_only=True), "attn_only and mlp_only together"),
        (dict(data_source="stream"), "data_source must be 'fixed' or 'online'"),
        (dict(threads=0), "threads must be 'auto' or an integer >= 1, got 0"),
        (dict(threads="two"), "threads must be 'auto' or an integer >= 1"),
        (dict(threads=True), "threads must be 'auto' or an integer >= 1"),
    ],
)
def test_invalid_train_configs(bad, needle):
    with pytest.raises(NanoMarkovError, match=needle):
        TrainConfig(**bad)


# ---- presets -------------------------------------------------------------------

# The seed's configs/mm_config.py, written out by hand: K -> (n_layer, n_embd, batch, max_iters)
SEED_TABLE = {
    2: (2, 128, 16, 1000),
    10: (2, 128, 16, 1000),
    11: (2, 256, 8, 5000),
    100: (2, 256, 8, 5000),
    1000: (4, 512, 8, 5000),
    1001: (4, 768, 8, 5000),
}


@pytest.mark.parametrize("k", list(SEED_TABLE))
def test_seed_preset_matches_the_seed(k):
    p = preset("seed", k, seed=3)
    n_layer, n_embd, batch, iters = SEED_TABLE[k]
    assert (p["n_layer"], p["n_embd"], p["batch_size"], p["max_iters"]) == (n_layer, n_embd, batch, iters)
    assert p["lr_decay_iters"] == iters
    expected = dict(
        n_head=8,
        learning_rate=5e-3,
        warmup_iters=200,
        min_lr=1e-4,
        weight_decay=0.1,
        dropout=0.0,
        bias=False,
        grad_accum_steps=40,
        decay_lr=True,
        eval_interval=500,
        log_interval=10,
        seed=3,
        lm_head_tied=True,
        use_ln=True,
        pos_ape=True,
        mlp_only=False,
        mlp_ratio=4,
        mlp_filter="GELU",
        one_hot_embed=False,
        beta1=0.9,
        beta2=0.95,
        grad_clip=1.0,
        compile=False,
        data_dir=f"data/mm{k}",
        out_dir=f"trainings/MM/MM-{k}/MM-{k}-3",
        wandb_run_name=f"MM-{k}-3",
    )
    assert {key: p[key] for key in expected} == expected


def test_presets_are_complete_and_valid():
    for name in PRESETS:
        p = preset(name, 100)
        assert list(p) == list(FIELDS)
        assert TrainConfig(**p).to_dict() == p


@pytest.mark.parametrize(
    "k, expected",
    [
        (10, dict(n_layer=1, pos_ape=True, n_embd=32, batch_size=64, learning_rate=3e-3, max_iters=600)),
        (
            100,
            dict(
                n_layer=0,
                pos_ape=False,
                n_embd=128,
                batch_size=64,
                learning_rate=1e-2,
                max_iters=6000,
                warmup_iters=50,
                min_lr=1e-4,
                lr_decay_iters=6000,
                data_source="online",
            ),
        ),
        (1000, dict(n_layer=0, pos_ape=False, n_embd=1024, batch_size=256, max_iters=3000, data_source="online")),
    ],
)
def test_default_preset(k, expected):
    p = preset("default", k)
    assert {key: p[key] for key in expected} == pytest.approx(expected)
    assert p["grad_accum_steps"] == 1 and p["lr_decay_iters"] == p["max_iters"]
    assert p["min_lr"] == pytest.approx(p["learning_rate"] / 100)
    # The measured recipe: no attention, square MLP, untied head, no weight decay; full rank for K+1 logits.
    assert p["mlp_only"] and p["mlp_ratio"] == 1 and not p["lm_head_tied"] and p["weight_decay"] == 0
    assert p["n_embd"] >= min(k + 1, 1024)


@pytest.mark.parametrize("k", [2, 11, 50, 1000])
@pytest.mark.parametrize("name", sorted(PROCESSES))
def test_a_process_recipe_with_blocks_keeps_a_sense_of_position(name, k):
    # Above K = 10 the first-order rows drop position embeddings; a block that reads the history needs them,
    # or alibi's distances in their place.
    p = {**preset("default", k), **process_recipe(name)}
    assert p["n_layer"] == 0 or p["pos_ape"] or p["alibi"]


# c1..c12 as the seed's descriptions put them: (n_layer, n_head, n_embd, max_iters, switches)
ONE_HOT_RELU = dict(one_hot_embed=True, mlp_filter="RELU")
EXTRA_TABLE = {
    "c1": (1, 2, 256, 3000, {}),
    "c2": (1, 1, 128, 3000, dict(mlp_filter="RELU")),
    "c3": (1, 1, 101, 5000, ONE_HOT_RELU),
    "c4": (1, 1, 101, 5000, dict(ONE_HOT_RELU, mlp_ratio=1)),
    "c5": (1, 1, 101, 5000, dict(ONE_HOT_RELU, mlp_only=True)),
    "c6": (1, 1, 101, 5000, dict(one_hot_embed=True, mlp_ratio=1, mlp_only=True)),
    "c7": (1, 1, 101, 5000, dict(ONE_HOT_RELU, mlp_ratio=1, pos_ape=False)),
    "c8": (1, 1, 101, 5000, dict(ONE_HOT_RELU, mlp_ratio=1, use_ln=False)),
    "c9": (1, 1, 101, 5000, dict(ONE_HOT_RELU, mlp_ratio=1, use_ln=False, pos_ape=False)),
    "c10": (
        1,
        1,
        101,
        5000,
        dict(ONE_HOT_RELU, mlp_ratio=1, use_ln=False, pos_ape=False, mlp_first_matrix_identity=True),
    ),
    "c11": (1, 1, 101, 5000, dict(ONE_HOT_RELU, mlp_ratio=1, use_ln=False, pos_ape=False, mlp_only=True)),
    "c12": (
        1,
        1,
        101,
        5000,
        dict(ONE_HOT_RELU, mlp_ratio=1, use_ln=False, pos_ape=False, mlp_first_matrix_identity=True, mlp_only=True),
    ),
}
SWITCH_DEFAULTS = dict(
    one_hot_embed=False,
    mlp_filter="GELU",
    mlp_ratio=4,
    mlp_only=False,
    use_ln=True,
    pos_ape=True,
    mlp_first_matrix_identity=False,
)


@pytest.mark.parametrize("name", EXTRAS)
def test_extra_presets_match_the_seed_and_build(name):
    p = preset(name, 100, seed=5)
    n_layer, n_head, n_embd, iters, switches = EXTRA_TABLE[name]
    assert (p["n_layer"], p["n_head"], p["n_embd"], p["max_iters"]) == (n_layer, n_head, n_embd, iters)
    assert {k: p[k] for k in SWITCH_DEFAULTS} == {**SWITCH_DEFAULTS, **switches}
    common = dict(
        batch_size=8,
        learning_rate=5e-3,
        warmup_iters=400,
        min_lr=1e-4,
        weight_decay=0.1,
        lr_decay_iters=iters,
        grad_accum_steps=40,
        dropout=0.0,
        bias=False,
        lm_head_tied=True,
        seed=5,
        data_dir="data/mm100",
        out_dir=f"trainings/MM/MM-100-extra/MM-100-extra-{name}-s5",
        wandb_run_name=f"MM-extra-{name}-s5",
    )
    assert {k: p[k] for k in common} == common
    model = GPT(TrainConfig(**p).gpt_config(vocab_size=101, block_size=255))
    assert model(torch.zeros(1, 255, dtype=torch.long))[0].shape == (1, 255, 101)


def test_c10_follows_the_description_not_the_seed_file():
    assert preset("c10", 100)["use_ln"] is False


def test_sparse_names():
    assert preset("seed", 100, 75, 42)["out_dir"] == "trainings/MM/MM-100-sparse-75/MM-100-sparse-75-42"
    assert preset("seed", 100, 75)["data_dir"] == "data/mm100-sparse-75"
    p = preset("c4", 100, 75, 42)
    assert p["out_dir"] == "trainings/MM/MM-100-sparse-75-extra/MM-100-sparse-75-extra-c4-s42"
    assert p["data_dir"] == "data/mm100-sparse-75"


def test_one_hot_presets_follow_the_vocabulary():
    assert preset("c3", 20)["n_embd"] == 21 and preset("c1", 20)["n_embd"] == 256


@pytest.mark.parametrize(
    "args, needle",
    [
        (("c13", 100), "unknown preset"),
        (("default", 0), "n_states"),
        (("default", True), "n_states"),
        (("default", 100, 100), "sparsity"),
        (("default", 100, 0), "sparsity"),
        (("default", 100, None, -1), "seed"),
    ],
)
def test_bad_preset_arguments(args, needle):
    with pytest.raises(NanoMarkovError, match=needle):
        preset(*args)


def test_parse_mm_id():
    assert parse_mm_id("100") == (100, None) and parse_mm_id("100-sparse-75") == (100, 75)
    for bad in ("", "x", "100-sparse-", "100-sparse", "-5", "100-dense-3"):
        with pytest.raises(NanoMarkovError):
            parse_mm_id(bad)


# ---- configs/ scripts --------------------------------------------------------


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "script, argv, expected",
    [
        ("mm_config", ["100", "42"], ("seed", 100, None, 42)),
        ("mm_config", ["100-sparse-75", "7"], ("seed", 100, 75, 7)),
        ("mm_config", ["10", "--preset", "default"], ("default", 10, None, 42)),
        ("mm_config_extra", ["c4", "42"], ("c4", 100, None, 42)),
        ("mm_config_extra", ["C12", "3", "-sparse-75"], ("c12", 100, 75, 3)),
    ],
)
def test_config_scripts_print_the_preset(tmp_path, capsys, script, argv, expected):
    assert load_script(script).main(argv) == 0
    out = capsys.readouterr().out
    assert out == preset_file(*expected)
    assert load_config_file(write(tmp_path, out)) == preset(*expected)


@pytest.mark.parametrize(
    "script, argv",
    [
        ("mm_config", []),
        ("mm_config", ["abc"]),
        ("mm_config", ["100", "x"]),
        ("mm_config", ["100", "--preset", "nope"]),
        ("mm_config", ["100", "--preset"]),
        ("mm_config_extra", []),
        ("mm_config_extra", ["c99"]),
        ("mm_config_extra", ["c1", "1", "-dense"]),
    ],
)
def test_config_scripts_reject_bad_input(script, argv):
    with pytest.raises(NanoMarkovError):
        load_script(script).main(argv)


def test_config_script_runs_from_anywhere_and_exits_2_on_bad_input(tmp_path):
    # One process only (torch's import dominates): reaching the SEED check proves the
    # package was importable from a foreign working directory.
    bad = subprocess.run(
        [sys.executable, str(ROOT / "configs" / "mm_config.py"), "100", "oops"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and bad.stdout == ""
    assert len(bad.stderr.strip().splitlines()) == 1 and "SEED" in bad.stderr


def test_dataset_preset_takes_k_and_the_process_from_the_folder(tmp_path):
    from nanomarkov.config import dataset_preset, preset, process_recipe
    from nanomarkov.data import generate_dataset

    generate_dataset(tmp_path / "chain", 4, 4, 2, seq_len=8)
    generate_dataset(tmp_path / "k2", 4, 4, 2, seq_len=8, process="korder", order=2)
    first = dataset_preset("default", tmp_path / "chain", seed=3)
    expected = preset("default", 4, None, 3)
    assert {k: v for k, v in first.items() if k not in ("data_dir", "out_dir", "wandb_run_name")} == {
        k: v for k, v in expected.items() if k not in ("data_dir", "out_dir", "wandb_run_name")
    }
    assert first["data_dir"] == str(tmp_path / "chain") and first["out_dir"] == "trainings/chain/chain-3"
    korder = dataset_preset("default", tmp_path / "k2")
    assert korder["mlp_only"] is False and korder["n_head"] == process_recipe("korder")["n_head"]
    c3 = dataset_preset("c3", tmp_path / "k2")
    assert c3["mlp_only"] == preset("c3", 4)["mlp_only"]  # presets are as named
    assert c3["out_dir"] == "trainings/k2/k2-c3-42" and korder["out_dir"] == "trainings/k2/k2-42"  # never the same run
    with pytest.raises(NanoMarkovError, match="meta.json: not a readable dataset"):
        dataset_preset("default", tmp_path / "nothing")


def test_run_folder_names_the_seeds_runs_and_a_dataset_folders_runs():
    from nanomarkov.config import run_folder

    assert run_folder("default", 42, chain="100") == "MM-100/MM-100-42"
    assert run_folder("seed", 7, chain="100-sparse-75") == "MM-100-sparse-75/MM-100-sparse-75-7"
    assert run_folder("c4", 42, chain="100") == "MM-100-extra/MM-100-extra-c4-s42"
    assert run_folder("default", 5, dataset="mess3") == "mess3/mess3-5"
    assert run_folder("c2", 5, dataset="mess3") == "mess3/mess3-c2-5"
    for wrong in ({}, {"chain": "100", "dataset": "mess3"}):
        with pytest.raises(NanoMarkovError, match="either chain or dataset"):
            run_folder("default", 42, **wrong)


def test_config_changes_lists_what_differs_except_what_a_resume_may_change():
    from nanomarkov.config import RESUMABLE_CHANGES, config_changes

    cfg = TrainConfig()
    saved = {**cfg.to_dict(), "n_embd": 64, "max_iters": 10, "device": "cuda"}
    assert config_changes(saved, cfg) == ["n_embd 64 -> 128"]
    assert config_changes(cfg.to_dict(), cfg) == []
    assert config_changes(saved, cfg, ignore=()) == [
        "n_embd 64 -> 128",
        "max_iters 10 -> 1500",
        "device 'cuda' -> 'auto'",
    ]
    assert config_changes(saved, cfg, RESUMABLE_CHANGES | {"n_embd"}) == []
    del saved["learning_rate"]  # a config saved before a field existed
    assert config_changes(saved, cfg) == ["n_embd 64 -> 128", "learning_rate None -> 0.01"]
    # A field added since (ADDED_FIELDS) means its default where an older run's config lacks it.
    del saved["lm_head_bias"], saved["attn_only"], saved["alibi"], saved["alibi_trained"]
    del saved["snapshot_every"], saved["threads"]
    assert config_changes(saved, cfg) == ["n_embd 64 -> 128", "learning_rate None -> 0.01"]
    assert "lm_head_bias False -> True" in config_changes(saved, TrainConfig(lm_head_bias=True))
    assert "attn_only False -> True" in config_changes(saved, TrainConfig(attn_only=True))
    assert "alibi False -> True" in config_changes(saved, TrainConfig(alibi=True))


def test_train_accepts_a_dataset_folder(tmp_path):
    from nanomarkov.data import generate_dataset

    generate_dataset(tmp_path / "data" / "k2", 3, 8, 4, seq_len=8, process="korder", order=2)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "nanomarkov",
            "train",
            "data/k2",
            "--max_iters=2",
            "--warmup_iters=1",
            "--eval_interval=2",
            "--batch_size=4",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    config = (tmp_path / "trainings" / "k2" / "k2-42" / "config.json").read_text()
    assert '"mlp_only": false' in config and '"data_dir": "data/k2"' in config
    bad = subprocess.run(
        [sys.executable, "-m", "nanomarkov", "train", "data/k2", "--sparse", "75"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "its sparsity is its own" in bad.stderr


def test_a_config_too_big_or_too_deeply_nested_is_one_line(tmp_path):
    from nanomarkov.config import load_config_file

    long = tmp_path / "long.py"
    long.write_text("x = " + "+".join(["1"] * 100_000) + "\n")
    with pytest.raises(NanoMarkovError, match="more than a config file's"):
        load_config_file(long)
    nested = tmp_path / "nested.py"
    nested.write_text("n_layer = " + "-" * 5000 + "1\n")
    with pytest.raises(NanoMarkovError, match="too deeply nested"):
        load_config_file(nested)
    chained = tmp_path / "chained.py"
    chained.write_text("n_layer = " + "*".join(["1"] * 20_000) + "\n")
    with pytest.raises(NanoMarkovError, match="too deeply nested"):
        load_config_file(chained)


RECIPE = {"max_iters": 600, "lr_decay_iters": 600, "warmup_iters": 50, "out_dir": "nowhere"}


@pytest.mark.parametrize(
    "given, max_iters, decay",
    [
        ({"max_iters": 8000}, 8000, 8000),  # alone: the decay ends with the run
        ({"max_iters": 8000, "lr_decay_iters": 1000}, 8000, 1000),  # both: as given
        ({"learning_rate": 1e-3}, 600, 600),  # neither: the recipe's
        ({"lr_decay_iters": 300}, 600, 300),
    ],
)
def test_the_schedule_follows_the_run(given, max_iters, decay):
    merged = merge_settings(RECIPE, given)
    assert (merged["max_iters"], merged["lr_decay_iters"]) == (max_iters, decay)
    assert TrainConfig.from_dict({k: v for k, v in merged.items() if k != "out_dir"}).lr_decay_iters == decay


def test_a_config_file_with_max_iters_alone_decays_with_the_run(tmp_path):
    path = write(tmp_path, "max_iters = 8000\nwarmup_iters = 100\n")
    assert merge_settings({}, load_config_file(path))["lr_decay_iters"] == 8000
    assert merge_settings(merge_settings({}, load_config_file(path)), {"max_iters": 90})["lr_decay_iters"] == 90


def test_a_resumed_run_keeps_the_decay_it_was_trained_with(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"lr_decay_iters": 6}))
    resumed = merge_settings({**RECIPE, "out_dir": str(tmp_path)}, {"max_iters": 9, "init_from": "resume"})
    assert (resumed["max_iters"], resumed["lr_decay_iters"]) == (9, 6)
    given = merge_settings(RECIPE, {"init_from": "resume", "lr_decay_iters": 7, "out_dir": str(tmp_path)})
    assert given["lr_decay_iters"] == 7


@pytest.mark.parametrize(
    "settings, needle",
    [
        (dict(max_iters=0), "max_iters = 0 trains nothing"),
        (dict(max_iters=60, warmup_iters=200), r"warmup_iters \(200\) is longer than the run \(max_iters 60\)"),
    ],
)
def test_a_run_that_trains_nothing_is_refused(settings, needle):
    with pytest.raises(NanoMarkovError, match=needle):
        TrainConfig(**settings)


def test_a_constant_learning_rate_has_no_warm_up_to_outlast():
    assert TrainConfig(max_iters=60, warmup_iters=200, lr_decay_iters=200, decay_lr=False).max_iters == 60
