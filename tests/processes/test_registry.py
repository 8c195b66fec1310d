"""The process contract and the registry: a process defined here, outside the package, runs the
whole pipeline through the `nanomarkov` command once NANOMARKOV_PROCESSES names this file."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from nanomarkov.errors import NanoMarkovError
from nanomarkov.processes import (
    PLUGINS_VARIABLE,
    PROCESSES,
    Option,
    Process,
    load_plugins,
    plugin_failure,
    process_class,
    register,
)
from nanomarkov.processes.numerics import entropy, token_dtype


class IIDProcess(Process):
    """Tokens drawn i.i.d. from one fixed distribution `probs`: the optimum is H(probs) at every position.

    A first-order chain whose rows are all `probs`, so eval's first-order metrics apply; its option `peak`
    is an attribute, which the base class's options() reads."""

    process = "iid"
    SUMMARY = "tokens i.i.d. from one distribution (a test process)"
    ARRAYS = ("probs",)
    OPTIONS = (Option("peak", float, None, "probability of state 0 (default: Dirichlet(alpha))"),)
    RECIPE = dict(n_layer=1, n_head=1, n_embd=12)
    METRICS = ("transition_fidelity", "markov_property", "optimal_fidelity")

    def __init__(self, probs):
        self.probs = np.array(probs, dtype=np.float64)
        self.peak = float(self.probs[0])

    @classmethod
    def random(cls, n_states, seed=42, alpha=1.0, sparsity=None, peak=None):
        if peak is None:
            return cls(np.random.default_rng(seed).dirichlet(np.full(n_states, alpha)))
        return cls(np.r_[peak, np.full(n_states - 1, (1 - peak) / (n_states - 1))])

    @property
    def n_states(self):
        return len(self.probs)

    def sample(self, n_sequences, seq_len, rng):
        draws = np.searchsorted(np.cumsum(self.probs)[:-1], rng.random((n_sequences, seq_len - 1)), side="right")
        out = np.full((n_sequences, seq_len), self.bos_token, dtype=token_dtype(self.vocab_size))
        out[:, 1:] = draws
        return out

    def optimal_log_probs(self, tokens):
        tokens = self.check_tokens(tokens)
        with np.errstate(divide="ignore"):
            return np.broadcast_to(np.log(self.probs), (tokens.shape[0], tokens.shape[1] - 1, self.n_states)).copy()

    def optimal_loss_by_position(self, seq_len):
        self.check_seq_len(seq_len)
        return np.full(seq_len - 1, float(entropy(self.probs))), np.zeros(seq_len - 1)

    def optimal_accuracy(self, seq_len):
        return float(self.probs.max())

    def entropy_rate(self):
        return float(entropy(self.probs))

    def unigram_loss(self):
        return float(entropy(self.probs))

    def transition_rows(self):
        return np.tile(self.probs, (self.n_states + 1, 1))  # after every state, and after BOS (row K)

    def stationary(self):
        return self.probs


if __name__ == "nanomarkov_plugin_test_registry":  # imported by the CLI through NANOMARKOV_PROCESSES
    register(IIDProcess)

PEAK = 0.7
PROBS = np.r_[PEAK, np.full(3, 0.1)]


@pytest.fixture
def registered():
    """IIDProcess in this process's registry for one test (the others see only the built-in four)."""
    register(IIDProcess)
    yield IIDProcess
    PROCESSES.pop("iid")


def nanomarkov(args, cwd, plugins=__file__):
    exe = shutil.which("nanomarkov", path=str(Path(sys.executable).parent))
    command = [exe] if exe else [sys.executable, "-m", "nanomarkov"]
    env = {**os.environ, PLUGINS_VARIABLE: plugins}
    return subprocess.run([*command, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


def test_a_process_defined_in_this_file_runs_generate_theory_train_eval_through_the_cli(tmp_path):
    generated = nanomarkov(["generate", "4", "--process", "iid", "--peak", str(PEAK), "--train", "64", "--val", "16",
                            "--seq_len", "9"], tmp_path)  # fmt: skip
    assert generated.returncode == 0, generated.stderr
    data = tmp_path / "data" / "iid4-peak0.7"  # the base class's folder name, with the option
    meta = json.loads((data / "meta.json").read_text())
    exact = float(entropy(PROBS))
    assert meta["process"] == "iid" and meta["peak"] == PEAK
    assert meta["theory"]["optimal_loss"] == pytest.approx(exact, abs=1e-12)
    assert meta["theory"]["entropy_rate"] == meta["theory"]["unigram_loss"] == pytest.approx(exact, abs=1e-12)
    assert meta["theory"]["optimal_accuracy"] == pytest.approx(PEAK)
    assert not any(key.endswith("_se") for key in meta["theory"])  # exact theory: no errors

    theory = nanomarkov(["theory", str(data), "--json"], tmp_path)
    assert theory.returncode == 0, theory.stderr
    (row,) = json.loads(theory.stdout)
    assert row["process"] == "iid" and row["options"] == {"peak": PEAK}
    assert row["optimal_loss"] == pytest.approx(exact, abs=1e-12) and row["uniform_loss"] == pytest.approx(np.log(4))

    trained = nanomarkov(["train", str(data), "--max_iters=4", "--warmup_iters=1", "--eval_interval=2", "--log_interval=2",
                          "--device=cpu"], tmp_path)  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    run_dir = tmp_path / "trainings" / "iid4-peak0.7" / "iid4-peak0.7-42"
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["n_layer"], config["n_head"], config["n_embd"]) == (1, 1, 12)  # the class's RECIPE

    evaluated = nanomarkov(["eval", str(run_dir / "ckpt.pt")], tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["cross_entropy"]["optimal_loss"] == pytest.approx(exact, abs=1e-12)
    assert result["optimal_fidelity"]["mean_kl"] >= 0 and result["run"]["process"] == "iid"
    assert result["transition_fidelity"]["mean_kl"] >= 0 and result["markov_property"]["mean_spread"] >= 0
    assert result["korder_fidelity"] is None and set(result["skipped"]) == {"korder_fidelity"}


def test_a_dataset_of_an_unregistered_process_names_the_variable(tmp_path):
    assert nanomarkov(["generate", "4", "--process", "iid", "--train", "8", "--val", "4", "--seq_len", "5",
                       "--out", "d"], tmp_path).returncode == 0  # fmt: skip
    result = nanomarkov(["theory", "d"], tmp_path, plugins="")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and PLUGINS_VARIABLE in result.stderr and "'iid'" in result.stderr


def test_a_plugin_that_cannot_be_imported_is_one_line_naming_the_variable(tmp_path):
    result = nanomarkov(["theory", "d"], tmp_path, plugins=str(tmp_path / "missing.py"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert PLUGINS_VARIABLE in result.stderr and "missing.py" in result.stderr
    with pytest.raises(NanoMarkovError, match="no_such_module"):
        load_plugins("no_such_module")


def test_generate_flags_and_hints_come_from_the_registered_classes(tmp_path, registered):
    from nanomarkov.cli import build_parser
    from nanomarkov.data import default_data_dir, load_dataset

    args = build_parser().parse_args(["generate", "4", "--process", "iid", "--peak", "0.5"])
    assert (args.process, args.peak) == ("iid", 0.5)
    assert default_data_dir(4, 25, "iid", peak=0.5) == Path("data/iid4-peak0.5-sparse-25")
    with pytest.raises(NanoMarkovError, match="nanomarkov generate 4 --process iid --peak 0.5 --train 10000"):
        load_dataset(tmp_path / "iid4-peak0.5")
    with pytest.raises(NanoMarkovError, match="nanomarkov generate 5 --process korder --order 3 .*--sparsity 50"):
        load_dataset(tmp_path / "mm5-order3-sparse-50")
    with pytest.raises(NanoMarkovError, match="nanomarkov generate 3 --process hmm --preset mess3 "):
        load_dataset(tmp_path / "mess3")


def test_the_process_declares_the_recipe_and_the_metrics(registered):
    from nanomarkov.config import process_recipe

    assert process_recipe("iid") == IIDProcess.RECIPE and process_recipe("markov") == {}
    assert process_class("hmm").RECIPE == process_class("icl").RECIPE
    chain = IIDProcess(PROBS)
    assert chain.skipped_metrics() == {"korder_fidelity": "defined for k-th order chains (process korder)"}
    assert process_class("markov").random(3).skipped_metrics().keys() == {"optimal_fidelity", "korder_fidelity"}


def test_the_base_class_gives_vocabulary_checks_true_loss_and_theory():
    chain = IIDProcess(PROBS)
    assert (chain.bos_token, chain.vocab_size, chain.uniform_loss()) == (4, 5, pytest.approx(np.log(4)))
    tokens = chain.sample(30, 6, np.random.default_rng(0))
    expected = -np.log(PROBS[tokens[:, 1:].astype(int)]).mean()
    assert chain.true_loss(tokens) == pytest.approx(expected, rel=1e-12)
    assert chain.theory(6) == {
        "entropy_rate": pytest.approx(entropy(PROBS)),
        "optimal_loss": pytest.approx(entropy(PROBS)),
        "optimal_accuracy": PEAK,
        "uniform_loss": pytest.approx(np.log(4)),
        "unigram_loss": pytest.approx(entropy(PROBS)),
    }
    assert IIDProcess(**chain.arrays()).options() == {"peak": PEAK}
    with pytest.raises(NanoMarkovError, match="BOS"):
        chain.true_loss(tokens[:, 1:])
    with pytest.raises(NanoMarkovError, match="seq_len"):
        chain.theory(1)
    assert IIDProcess.parse_folder_name("iid7-peak0.25") == (7, {"peak": 0.25})
    assert IIDProcess.parse_folder_name("mm7") is None


def test_register_refuses_a_nameless_class_and_a_taken_name():
    class Nameless(Process):
        pass

    class Impostor(Process):
        process = "markov"

    with pytest.raises(NanoMarkovError, match="no `process` name"):
        register(Nameless)
    with pytest.raises(NanoMarkovError, match="already registered"):
        register(Impostor)
    assert register(PROCESSES["markov"]) is PROCESSES["markov"]


@pytest.mark.parametrize("name", ["markov", "korder", "icl", "hmm"])
def test_every_builtin_process_follows_the_contract(name):
    cls = process_class(name)
    chain = cls.random(3, seed=1)
    rebuilt = cls(**chain.arrays())
    assert rebuilt.options() == chain.options()
    losses, errors = chain.optimal_loss_by_position(6)
    assert losses.shape == errors.shape == (5,) and np.all(errors >= 0)
    theory = chain.theory(6)
    assert theory["optimal_loss"] == pytest.approx(losses.mean(), abs=3 * errors.mean() + 1e-12)
    assert theory["uniform_loss"] == chain.uniform_loss() == pytest.approx(np.log(3))
    assert all(key.removesuffix("_se") in theory for key in theory if key.endswith("_se"))
    tokens = chain.sample(20, 6, np.random.default_rng(2))
    assert chain.optimal_log_probs(tokens).shape == (20, 5, 3)
    assert isinstance(chain.true_loss(tokens), float) and isinstance(chain.entropy_rate(), float)
    assert isinstance(chain.unigram_loss(), float) and 0 < chain.optimal_accuracy(6) <= 1
    folder = cls.folder_name(3, **{k: v for k, v in chain.options().items() if v is not None})
    parsed = cls.parse_folder_name(folder)
    assert parsed is not None and parsed[0] == 3


@pytest.mark.parametrize(
    ("body", "raised"),
    [("import sys\nsys.exit(0)\n", "SystemExit (it called sys.exit(0))"),
     ("raise SystemExit('bye')\n", "sys.exit('bye')"),
     ("raise ValueError('bad\\nthing')\n", "ValueError: bad thing"),
     ("def broken(:\n", "SyntaxError"),
     ("import no_such_module_of_a_plugin\n", "ModuleNotFoundError: No module named 'no_such_module_of_a_plugin'"),
     ("raise GeneratorExit('closed')\n", "GeneratorExit: closed"),
     ("class Gone(BaseException):\n    pass\nraise Gone('away')\n", "Gone: away"),
     ("raise KeyboardInterrupt\n", "KeyboardInterrupt")],  # raised by the plugin: no Ctrl-C arrived
)  # fmt: skip
def test_a_plugin_that_raises_anything_at_import_is_refused_in_one_line(tmp_path, monkeypatch, capsys, body, raised):
    from nanomarkov.cli import main

    plugin = tmp_path / "plugin.py"
    plugin.write_text(body)
    monkeypatch.setenv(PLUGINS_VARIABLE, str(plugin))
    assert main(["theory", "d"]) == 2  # not 0: a plugin's sys.exit(0) no longer ends every command silently
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert PLUGINS_VARIABLE in err and "plugin.py" in err and raised in err


def test_ctrl_c_during_a_plugin_import_is_the_users(tmp_path, monkeypatch, capsys):
    from nanomarkov.cli import main

    plugin = tmp_path / "interrupted.py"
    plugin.write_text("import os, signal, time\nos.kill(os.getpid(), signal.SIGINT)\ntime.sleep(5)\n")
    monkeypatch.setenv(PLUGINS_VARIABLE, str(plugin))
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own, whatever the runner set
    try:
        assert main(["theory", "d"]) == 130
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back after the import
    finally:
        signal.signal(signal.SIGINT, before)
    assert capsys.readouterr().err.startswith("stopped by SIGINT")  # the user's stop, not a broken plugin


def test_what_a_plugin_prints_at_import_goes_to_stderr(tmp_path, capsys):
    plugin = tmp_path / "chatty.py"
    plugin.write_text("print('loading my process')\n")
    load_plugins(str(plugin))
    out, err = capsys.readouterr()
    assert out == "" and err == "loading my process\n"  # a command's stdout (theory --json) stays its own


# A plugin's process whose one method (BODY) is broken; registered by the CLI when NANOMARKOV_PROCESSES names it.
BROKEN_PLUGIN = """
from nanomarkov.processes import register
from test_registry import IIDProcess


def helper():
    return 1 / 0


class Broken(IIDProcess):
    process = "broken"
{body}

register(Broken)
"""


@pytest.fixture
def broken_plugin(tmp_path, monkeypatch):
    """Writes BROKEN_PLUGIN with a method's body and names it in the variable; the registry restored after."""
    before = dict(PROCESSES)

    def write(body):
        path = tmp_path / "broken.py"
        path.write_text(BROKEN_PLUGIN.format(body=textwrap.indent(textwrap.dedent(body), "    ")))
        monkeypatch.setenv(PLUGINS_VARIABLE, str(path))
        return path

    yield write
    PROCESSES.clear()
    PROCESSES.update(before)


@pytest.mark.parametrize(
    ("body", "raised"),
    [("@classmethod\ndef random(cls, *args, **kwargs):\n    raise ValueError('no seed')", "ValueError: no seed in random() ("),
     ("def sample(self, n, seq_len, rng):\n    return {}['key']", "KeyError: 'key' in sample() ("),
     ("def sample(self, n, seq_len, rng):\n    return helper()", "ZeroDivisionError: division by zero in helper() ("),
     ("def sample(self, n, seq_len, rng):\n    return self.sample(n, seq_len, rng)", "RecursionError: maximum recursion"),
     ("def sample(self, n, seq_len, rng):\n    raise SystemExit(0)", "SystemExit (it called sys.exit(0)) in sample() ("),
     ("def optimal_log_probs(self, tokens):\n    raise GeneratorExit", "GeneratorExit in optimal_log_probs() ("),
     ("def optimal_accuracy(self, seq_len):\n    return float(self.probs[9])", "IndexError: index 9 is out of bounds"),
     # raised by the plugin, no Ctrl-C arrived: not "stopped by SIGINT ... run the same command again"
     ("@classmethod\ndef random(cls, *args, **kwargs):\n    raise KeyboardInterrupt", "KeyboardInterrupt in random() ("),
     ("def sample(self, n, seq_len, rng):\n    raise KeyboardInterrupt('x')", "KeyboardInterrupt: x in sample() ("),
     ("def optimal_log_probs(self, tokens):\n    raise KeyboardInterrupt", "KeyboardInterrupt in optimal_log_probs(")],
)  # fmt: skip
def test_a_plugin_that_raises_anything_when_called_is_one_line_naming_it(tmp_path, broken_plugin, capsys, body, raised):
    from nanomarkov.cli import main

    plugin = broken_plugin(body)
    argv = ["generate", "4", "--process", "broken", "--train", "8", "--val", "4", "--seq_len", "6", "--out", "d"]
    assert main([*argv[:-1], str(tmp_path / "d")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("error: process broken (Broken, module ")
    assert raised in err and "nanomarkov_plugin_broken" in err and "fix the process" in err
    assert f"({plugin}:" in err or "RecursionError" in err  # the line of the plugin's file that raised
    assert not (tmp_path / "d").exists()


def test_ctrl_c_while_a_plugins_process_runs_is_the_users(tmp_path, broken_plugin, capsys):
    from nanomarkov.cli import main

    broken_plugin("def sample(self, n, seq_len, rng):\n    import os, signal, time\n"
                  "    os.kill(os.getpid(), signal.SIGINT)\n    time.sleep(5)")  # fmt: skip
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own, whatever the runner set
    try:
        argv = ["generate", "4", "--process", "broken", "--train", "8", "--val", "4", "--seq_len", "6", "--out"]
        assert main([*argv, str(tmp_path / "d")]) == 130
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back after the command
    finally:
        signal.signal(signal.SIGINT, before)
    assert capsys.readouterr().err.startswith("stopped by SIGINT")  # a real Ctrl-C inside the plugin's code


def test_a_failure_in_no_plugin_is_not_blamed_on_one():
    from nanomarkov.data import compact_by_position

    with pytest.raises(TypeError) as failed:
        compact_by_position([1.0], [0.0], limit="not a number")  # raised in the package's own code
    assert plugin_failure(failed.value) is None  # a traceback, to be reported as the package's bug


class Miscounted(IIDProcess):
    """A process whose random() does not make what was asked: n_states told by the class attribute `told`."""

    process = "miscounted"
    told = 0
    n_states = property(lambda self: self.told)


@pytest.mark.parametrize(
    ("attributes", "made"),
    [({"told": 0}, "a process of 0 states"),
     ({"told": 10**12}, "a process of 1000000000000 states"),
     ({"told": "four"}, "a process whose n_states is 'four', not an integer"),
     ({"random": classmethod(lambda cls, *args, **kwargs: None)}, "returned a NoneType")],
)  # fmt: skip
def test_a_random_process_that_is_not_what_was_asked_is_refused_naming_it(tmp_path, attributes, made):
    from nanomarkov.data import generate_dataset

    register(type("Miscounted", (Miscounted,), attributes))
    try:
        with pytest.raises(NanoMarkovError) as refused:
            generate_dataset(tmp_path / "d", 4, 8, 4, seq_len=6, process="miscounted")
    finally:
        PROCESSES.pop("miscounted")
    assert "process miscounted (Miscounted, module test_registry)" in str(refused.value)
    assert made in str(refused.value) and not (tmp_path / "d").exists()


@pytest.mark.parametrize(
    ("missing", "attributes", "named"),
    [(("random",), {}, "random (the least a process provides)"),
     (("optimal_log_probs", "entropy_rate"), {}, "optimal_log_probs, entropy_rate (the least"),
     (("n_states",), {}, "n_states"),
     (("transition_rows", "stationary"), {"METRICS": ("transition_fidelity",)},
      "transition_rows, stationary (transition_fidelity in METRICS)"),
     ((), {"METRICS": ("korder_fidelity",)}, "context_order, first_order_rows (korder_fidelity in METRICS)"),
     ((), {"BELIEF_STATES": True}, "belief_states, n_hidden (BELIEF_STATES = True)"),
     ((), {"OPTIONS": (Option("width", int, 2, "a width"),)}, "width (an attribute named as in OPTIONS")],
)  # fmt: skip
def test_a_class_missing_a_method_of_the_contract_is_refused_when_registered(missing, attributes, named):
    incomplete = type("Partial", (Process,), {**vars(IIDProcess), "process": "partial", **attributes})
    for name in missing:
        delattr(incomplete, name)  # now the base class's stub: what a plugin that never wrote it has
    with pytest.raises(NanoMarkovError) as refused:
        register(incomplete)
    message = str(refused.value)
    assert "Partial" in message and __name__ in message and named in message
    assert "partial" not in PROCESSES


def test_an_unknown_metric_family_is_refused_when_registered():
    misspelt = type("Misspelt", (IIDProcess,), {"process": "misspelt", "METRICS": ("transition_fidelty",)})
    with pytest.raises(NanoMarkovError, match="Misspelt .*'transition_fidelty'.* no metric family"):
        register(misspelt)


class FirstOrder(Process):
    """A first-order chain through the contract alone: transition_rows and stationary, no transmat attribute."""

    process = "first_order"
    METRICS = ("transition_fidelity", "markov_property")

    def __init__(self, chain):
        self.chain = chain

    n_states = property(lambda self: self.chain.n_states)
    sample = property(lambda self: self.chain.sample)
    optimal_log_probs = property(lambda self: self.chain.optimal_log_probs)
    optimal_loss_by_position = property(lambda self: self.chain.optimal_loss_by_position)
    optimal_accuracy = property(lambda self: self.chain.optimal_accuracy)
    entropy_rate = property(lambda self: self.chain.entropy_rate)
    unigram_loss = property(lambda self: self.chain.unigram_loss)
    transition_rows = property(lambda self: self.chain.transition_rows)
    stationary = property(lambda self: self.chain.stationary)

    @classmethod
    def random(cls, n_states, seed=42, alpha=1.0, sparsity=None):
        return cls(PROCESSES["markov"].random(n_states, seed))


def test_transition_fidelity_needs_only_what_the_contract_declares(tmp_path):
    from nanomarkov.data import generate_dataset, load_dataset
    from nanomarkov.evaluate import evaluate_models

    register(FirstOrder)
    try:
        generate_dataset(tmp_path / "d", 3, 8, 4, seq_len=6)
        markov = load_dataset(tmp_path / "d")
        dataset = dataclasses.replace(markov, chain=FirstOrder(markov.chain))
        rows = dataset.chain.transition_rows()
        table = torch.nn.functional.pad(torch.log(torch.as_tensor(rows)), (0, 1), value=-1e9)  # BOS never next
        model = type("Table", (torch.nn.Module,), {"forward": lambda self, idx: (table[idx], None)})()
        result = evaluate_models({"true": model}, dataset)["true"]
    finally:
        PROCESSES.pop("first_order")
    assert result["transition_fidelity"]["mean_kl"] < 1e-9 and result["transition_fidelity"]["start_kl"] < 1e-9


def test_eval_runs_the_first_order_metrics_of_a_plugin_through_the_contract_alone(tmp_path, registered):
    from nanomarkov.data import generate_dataset, load_dataset
    from nanomarkov.evaluate import evaluate_models
    from nanomarkov.model import GPT, GPTConfig

    meta = generate_dataset(tmp_path / "d", 4, 16, 16, seq_len=6, process="iid", peak=PEAK)
    assert meta["peak"] == PEAK  # the base class's options(), from the attribute
    dataset = load_dataset(tmp_path / "d")
    torch.manual_seed(0)
    tiny = GPT(GPTConfig(block_size=5, vocab_size=5, n_layer=1, n_head=1, n_embd=8))
    exact = torch.nn.functional.pad(torch.log(torch.as_tensor(np.tile(PROBS, (5, 1)))), (0, 1), value=-1e9)
    table = type("Table", (torch.nn.Module,), {"forward": lambda self, idx: (exact[idx], None)})()
    results = evaluate_models({"tiny": tiny.eval(), "exact": table}, dataset)
    assert (
        results["exact"]["transition_fidelity"]["mean_kl"] < 1e-12 > results["exact"]["markov_property"]["mean_spread"]
    )
    # The tiny model's transition KL on the prompts [BOS, s], recomputed here from its logits.
    prompts = torch.stack([torch.full((4,), 4), torch.arange(4)], dim=1)
    with torch.no_grad():
        learned = torch.softmax(tiny(prompts)[0][:, 1, :4].double(), -1).numpy()
    expected = np.mean([np.sum(PROBS * np.log(PROBS / row)) for row in learned])
    assert results["tiny"]["transition_fidelity"]["mean_kl"] == pytest.approx(expected, rel=1e-5)
    assert results["tiny"]["skipped"] == {"korder_fidelity": "defined for k-th order chains (process korder)"}


def test_skip_notes_come_from_what_the_class_declares():
    listed_none = type("Unlisted", (FirstOrder,), {"process": "unlisted", "METRICS": ("optimal_fidelity",)})
    notes = listed_none(PROCESSES["markov"].random(3)).skipped_metrics()
    assert notes["transition_fidelity"] == (
        "process unlisted provides transition_rows and stationary but does not list transition_fidelity in METRICS"
    )
    assert "not a first-order chain" not in " ".join(notes.values())
    members = {
        name: member for name, member in vars(IIDProcess).items() if name not in ("transition_rows", "stationary")
    }
    plain = type("Plain", (Process,), {**members, "process": "plain", "METRICS": ("optimal_fidelity",)})
    assert "process plain provides no transition_rows()" in plain(PROBS).skipped_metrics()["markov_property"]
