"""nanomarkov/memory.py and the sites that call it: what a command is about to hold is checked against the
free memory from its sizes alone, and refused in one line with both numbers before anything is allocated.

The free memory is set by hand (monkeypatch) to a small number: no test allocates what it refuses."""

import dataclasses
import io
import json
import resource
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from test_cli import one_line_error

import nanomarkov
from nanomarkov import NanoMarkovError, memory
from nanomarkov.checkpoint import load_model
from nanomarkov.data import generate_dataset, load_dataset
from nanomarkov.model import GPT, GPTConfig
from nanomarkov.processes.korder import KOrderChain
from nanomarkov.processes.markov import MarkovChain
from nanomarkov.processes.spec import read_spec

GIB = 2**30


@pytest.fixture
def free_gib(monkeypatch):
    """Pretend this machine has 1 GiB free."""
    monkeypatch.setattr(memory, "free_memory", lambda: (GIB, "this machine"))


def folder_bytes(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_free_memory_is_meminfos_available_line():
    text = "MemTotal:       24683780 kB\nMemFree:         1000 kB\nMemAvailable:   5242880 kB\n"
    assert memory.kib_field(text, "MemAvailable") == 5242880 * 1024
    assert memory.kib_field("MemTotal: 1 kB\n", "MemAvailable") is None
    assert memory.free_memory()[0] > 0  # this machine says


def test_the_address_space_ulimit_leaves_is_its_limit_less_what_the_process_maps():
    assert memory.kib_field("Name:\tpython\nVmPeak:\t  9 kB\nVmSize:\t  2048 kB\n", "VmSize") == 2048 * 1024
    assert memory.kib_field("Name:\tpython\n", "VmSize") is None
    assert memory.address_space_left(3 * GIB, GIB) == 2 * GIB
    assert memory.address_space_left(GIB, 3 * GIB) == 0  # already past it: nothing more fits
    assert memory.address_space_left(resource.RLIM_INFINITY, GIB) is None
    assert memory.address_space_left(3 * GIB, None) is None


def test_a_memory_cgroup_leaves_its_limit_less_its_usage():
    assert memory.cgroup_room("4294967296\n", "1073741824\n") == 3 * GIB
    assert memory.cgroup_room("max\n", "1073741824\n") is None  # v2: no limit
    assert memory.cgroup_room("9223372036854771712\n", "5\n") is None  # v1: no limit
    assert memory.cgroup_room(None, "5") is None and memory.cgroup_room("5", None) is None


def test_the_tightest_limit_decides_and_is_named(tmp_path, monkeypatch):
    (tmp_path / "max").write_text(f"{2 * GIB}\n")
    (tmp_path / "current").write_text(f"{GIB}\n")
    (tmp_path / "status").write_text("VmSize:\t  1024 kB\n")
    cgroups = [(tmp_path / "max", tmp_path / "current"), (tmp_path / "absent", tmp_path / "current")]
    rooms = memory.process_limits(tmp_path / "status", cgroups)
    assert (GIB, "this process's memory cgroup") in rooms and len(rooms) in (1, 2)  # 2: under a ulimit -v
    monkeypatch.setattr(memory, "process_limits", lambda: rooms)
    monkeypatch.setattr(memory, "machine_available_bytes", lambda: 8 * GIB)
    with pytest.raises(NanoMarkovError, match="needs 1.5 GiB, this process's memory cgroup has 1.0 GiB free"):
        memory.check_fits(3 * GIB // 2, "a chain", "hold less")
    monkeypatch.setattr(memory, "machine_available_bytes", lambda: None)
    monkeypatch.setattr(memory, "process_limits", lambda: [])
    memory.check_fits(100 * GIB, "a chain", "hold less")  # nothing says: only the fixed caps hold


def test_generate_under_ulimit_v_is_refused_naming_the_limit(tmp_path):
    """A real `ulimit -v`: K = 8000's chain (2.4 GiB) does not fit in 1.5 GiB of address space, though the
    machine may have it free."""
    script = f"ulimit -v {3 * 2**19} && exec {sys.executable} -m nanomarkov generate 8000 --out {tmp_path / 'g'}"
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "the address space ulimit -v leaves has" in done.stderr, done.stderr
    assert not (tmp_path / "g").exists()


def test_a_size_that_does_not_fit_is_refused_naming_both_numbers(free_gib):
    memory.check_fits(GIB, "one GiB", "hold less")
    with pytest.raises(NanoMarkovError) as error:
        memory.check_fits(3 * GIB, "three GiB", "hold less")
    assert str(error.value) == "three GiB needs 3.0 GiB, this machine has 1.0 GiB free; hold less"
    with pytest.raises(NanoMarkovError, match="needs 2.0 GiB, the GPU has 512.0 MiB free"):
        memory.check_fits(2 * GIB, "a model", "hold less", free_bytes=GIB // 2, where="the GPU")


def test_a_chain_too_big_for_the_free_memory_is_refused_before_it_is_drawn(free_gib, capsys, tmp_path):
    # 5 matrices of 8 * 6000^2 bytes: 1.3 GiB, over the 1 GiB free though one matrix (0.27 GiB) fits.
    error = one_line_error(capsys, ["generate", "6000", "--out", str(tmp_path / "mm6000")])
    assert "K = 6000's chain and its theory" in error and "1.0 GiB free" in error and "use a smaller K" in error
    assert not any(tmp_path.iterdir())
    first = np.zeros(6000)
    first[0] = 1.0
    with pytest.raises(NanoMarkovError, match="K = 6000's chain"):  # a chain given by its arrays, before a copy
        MarkovChain(np.broadcast_to(first, (6000, 6000)), first)
    with pytest.raises(NanoMarkovError, match="a k-th order chain with K=80, order=3"):
        KOrderChain.random(80, order=3)  # 6 tables of 80^4 entries: 1.8 GiB


def test_theory_tables_too_big_for_the_free_memory_are_refused(free_gib):
    chain = MarkovChain.random(3, seed=0)
    with pytest.raises(NanoMarkovError, match="the exact theory of --seq_len 20000000 with K = 3"):
        chain.theory(20_000_000)  # 3 tables of 3 * 2e7 float64: 1.3 GiB


@pytest.fixture
def small_dataset(tmp_path):
    generate_dataset(tmp_path / "mm3", 3, 8, 4, seq_len=8, seed=0)
    return tmp_path / "mm3"


@pytest.mark.parametrize(
    "flags, named", [(["--batch_size=100000000"], "on batches of 100000000"), (["--n_embd=100000"], "n_embd 100000")]
)
def test_training_too_big_is_refused_before_the_model_is_built(small_dataset, capsys, tmp_path, flags, named):
    out = tmp_path / "run"
    argv = [
        "train",
        str(small_dataset),
        f"--out_dir={out}",
        "--device=cpu",
        "--max_iters=1",
        "--warmup_iters=0",
        *flags,
    ]
    error = one_line_error(capsys, argv)
    assert named in error and "this machine has" in error and "use a smaller --batch_size" in error
    assert not out.exists()


def huge_npz_header(entries):
    """An .npz whose member claims each {name: shape} in its header but holds no data."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, shape in entries.items():
            header = io.BytesIO()
            np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": shape})
            archive.writestr(f"{name}.npy", header.getvalue())
    return buffer.getvalue()


def test_an_npz_spec_is_checked_by_its_headers_before_reading(tmp_path, free_gib):
    huge = tmp_path / "huge.npz"
    huge.write_bytes(huge_npz_header({"transmat": (200000, 200000), "startprob": (200000,)}))
    with pytest.raises(NanoMarkovError, match=r"huge.npz: entry transmat.npy holds 40,000,000,000 entries"):
        read_spec(huge)
    big = tmp_path / "big.npz"  # each entry under MAX_TABLE_ENTRIES, together over the 1 GiB free
    big.write_bytes(huge_npz_header({"transmat": (12000, 12000), "startprob": (12000,)}))
    with pytest.raises(NanoMarkovError, match=r"the arrays of .*big.npz needs 1.1 GiB, this machine has 1.0 GiB"):
        read_spec(big)


def test_a_datasets_chain_npz_is_checked_by_its_headers_before_reading(small_dataset, free_gib):
    (small_dataset / "chain.npz").write_bytes(huge_npz_header({"transmat": (200000, 200000), "startprob": (3,)}))
    meta = json.loads((small_dataset / "meta.json").read_text())
    del meta["sha256"]["chain.npz"]  # as a dataset written before chain.npz was hashed
    (small_dataset / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(NanoMarkovError, match=r"chain.npz needs 298.0 GiB, this machine has 1.0 GiB free"):
        load_dataset(small_dataset)


def edited_checkpoint(tmp_path, **model_args):
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=4, vocab_size=3))
    args = dataclasses.asdict(model.config) | model_args
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "model_args": args, "data_dir": "d"}, path)
    return path


def test_a_checkpoint_whose_model_args_were_edited_is_refused_before_the_model_is_built(tmp_path, capsys):
    path = edited_checkpoint(tmp_path, n_embd=10**6)
    before = folder_bytes(tmp_path)
    for load in (load_model, nanomarkov.load):
        with pytest.raises(NanoMarkovError, match=r"ckpt.pt: the model it describes \(.* weights, n_embd 1000000"):
            load(path)
    error = one_line_error(capsys, ["export", str(path), "--out", str(tmp_path / "export")])
    assert "needs" in error and "this machine has" in error
    assert folder_bytes(tmp_path) == before


def test_an_npz_spec_is_refused_by_the_estimate_of_the_process_it_builds_before_reading(tmp_path, free_gib):
    # 8000 x 8000 floats are 488 MiB to read, within the 1 GiB free; the chain and its theory hold five
    # of them (MarkovChain.check_memory, as `generate 8000` estimates), 2.4 GiB: refused before reading.
    spec = tmp_path / "bomb.npz"
    spec.write_bytes(huge_npz_header({"transmat": (8000, 8000), "startprob": (8000,)}))
    with pytest.raises(NanoMarkovError, match=r"bomb.npz: K = 8000's chain and its theory .* needs 2.4 GiB, this"):
        read_spec(spec)
    tokens = tmp_path / "tokens.npz"  # (K, H, H) token matrices: five copies of 3 x 6000 x 6000 floats, 4.0 GiB
    tokens.write_bytes(huge_npz_header({"token_transitions": (3, 6000, 6000)}))
    with pytest.raises(NanoMarkovError, match=r"tokens.npz: entry token_transitions.npy .* needs 4.0 GiB, this"):
        read_spec(tokens)
