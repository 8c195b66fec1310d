"""Dataset folders on disk: write (streamed, atomic), validate, load (training batches: batches.py).

A dataset is a folder holding
  chain.npz   the process's arrays (its class's ARRAYS), read with allow_pickle=False:
              markov: transmat, startprob; korder: transitions, start;
              icl: concentration, startprob, support_size (and start, when stationary);
              hmm: transmat, emissions, startprob (state-emitting) or token_transitions, startprob
              (token-labelled)
  meta.json   parameters, counts, the exact theory (and the optimum at every position, compactly:
              compact_by_position; the process's stage_losses and stage_loss_errors), sha256 of each data file; "spec"
              where a spec gave the process
  train.bin   whole BOS-led sequences of seq_len tokens, flat, little-endian
  val.bin     the same, drawn independently
  val_beliefs.npy  hmm only: float32 (n_val, seq_len, H), the belief state after every val prefix
meta.json is written last: a folder without it is not a dataset, so a
generation killed at any moment leaves nothing that loads.
"""

import hashlib
import json
import math
import numbers
import os
import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nanomarkov.errors import NanoMarkovError
from nanomarkov.files import (
    LOCK_FILE,
    check_output_folder,
    check_own_files,
    format_bytes,
    holds_record,
    new_build_folder,
    open_regular,
    read_capped,
    refuse_the_current_folder,
    swap_in,
    write_json,
    writer_lock,
)
from nanomarkov.memory import check_fits, npz_bytes, npz_headers
from nanomarkov.processes import DEFAULT_PROCESS, PLUGINS_VARIABLE, PROCESSES, process_class
from nanomarkov.processes.markov import load_hmmlearn_chain
from nanomarkov.processes.numerics import CONCENTRATION_RANGE, token_dtype, valid_concentration
from nanomarkov.processes.spec import process_from_file, process_from_spec, spec_record

FORMAT_VERSION = 1
SPLITS = ("train", "val")
# Tokens per generated chunk: big enough that numpy's per-call overhead
# vanishes, small enough that memory stays flat (~40 MB of uniforms).
CHUNK_TOKENS = 1 << 22
# The parameters that define a dataset (with the process's own options, e.g. korder's
# `order`); two generations that agree on these produce the same bytes.
DEFINING_KEYS = (
    "process",
    "n_states",
    "seq_len",
    "dtype",
    "seed",
    "sparsity",
    "alpha",
    "train_sequences",
    "val_sequences",
    "source",
)
# Where a dataset came from but not what it is: not compared when a generation asks whether a
# folder already holds its dataset (the same spec read from another file is the same dataset).
PROVENANCE_KEYS = ("spec_file",)
# meta.json's optimum by position stops listing positions once every later one is this close
# (nats) to the entropy rate, its limit; expand_by_position puts the limit there.
BY_POSITION_TOLERANCE = 1e-6
# Where a process has hidden states (it has belief_states), the belief after every val prefix
# is saved beside val.bin, for probes of the residual stream; sha256 in meta.json like the .bin.
BELIEFS_FILE = "val_beliefs.npy"
# What every meta.json `generate` wrote holds (since the first format), and a user's own meta.json is unlikely to.
DATASET_MARKS = ("format_version", "vocab_size", "bos_token", "sha256", "theory", "train_tokens")
DATASET_FILES = ("chain.npz", "meta.json", "train.bin", "val.bin", BELIEFS_FILE)
# What load_dataset needs in meta.json, and of which type; anything else is a damaged or edited file.
META_KEYS = {
    "n_states": int,
    "vocab_size": int,
    "bos_token": int,
    "seq_len": int,
    "dtype": str,
    "seed": int,
    "train_sequences": int,
    "val_sequences": int,
    "train_tokens": int,
    "val_tokens": int,
    "sha256": dict,
    "theory": dict,
}


def default_seq_len(n_states):
    """The seed's block size: 128 tokens (BOS included) for K <= 10, else 256."""
    return 128 if n_states <= 10 else 256


def _checked_class(process, options):
    """The class of `process`, once every given option is one of its OPTIONS."""
    cls = process_class(process)
    names = cls.option_names()
    for name in options:
        if name not in names:
            valid = f"its options: {', '.join('--' + o for o in names)}" if names else "it has none"
            raise NanoMarkovError(f"--{name} is not an option of --process {process} ({valid})")
    return cls


def _given(options):
    """The options that were actually given (the CLI passes None for a flag left out)."""
    return {name: value for name, value in options.items() if value is not None}


def default_data_dir(n_states, sparsity=None, process=DEFAULT_PROCESS, **options):
    """The seed's folder names data/mm100, data/mm100-sparse-75; other processes name their own
    (k-th order chains data/mm5-order2[-sparse-75])."""
    options = _given(options)
    name = _checked_class(process, options).folder_name(n_states, **options)
    return Path("data") / (f"{name}-sparse-{sparsity:g}" if sparsity else name)


def generate_command(
    n_states,
    train_sequences=None,
    val_sequences=None,
    sparsity=None,
    out=None,
    extra="",
    process=DEFAULT_PROCESS,
    **options,
):
    """The exact `nanomarkov generate` command for a dataset, for error messages."""
    fixed = process in PROCESSES and PROCESSES[process].N_STATES  # a named process takes no K
    parts = ["nanomarkov generate"] + ([] if fixed else [str(n_states)])
    if process != DEFAULT_PROCESS:
        parts += ["--process", process]
    parts += [f"--{name} {value}" for name, value in _given(options).items()]
    if train_sequences is not None:
        parts += ["--train", str(train_sequences), "--val", str(val_sequences)]
    if sparsity:
        parts += ["--sparsity", f"{sparsity:g}"]
    if out is not None and Path(out) != default_data_dir(n_states, sparsity, process, **options):
        parts += ["--out", str(out)]
    return " ".join(parts) + extra


def _regenerate_command(meta, path):
    if meta.get("spec"):  # a process given by a spec: the file it was read from, where there was one
        spec_file = meta.get("spec_file") or {"path": f"SPEC.json (the spec of sha256 {meta['spec'].get('sha256')})"}
        return (
            f"nanomarkov generate --spec {spec_file['path']} --train {meta['train_sequences']} --val "
            f"{meta['val_sequences']} --seq_len {meta['seq_len']} --seed {meta['seed']} --out {path} --force"
        )
    source = meta.get("source")
    if source:  # a chain imported from a file, not a random one
        return (
            f"nanomarkov import-hmmlearn {source['path']} --trust-pickle --out {path} --train {meta['train_sequences']} "
            f"--val {meta['val_sequences']} --seq_len {meta['seq_len']} --seed {meta['seed']} --force"
        )
    process = meta.get("process", DEFAULT_PROCESS)
    options = {name: meta.get(name) for name in (PROCESSES[process].option_names() if process in PROCESSES else ())}
    return generate_command(
        meta["n_states"],
        meta["train_sequences"],
        meta["val_sequences"],
        meta.get("sparsity"),
        path,
        extra=f" --seq_len {meta['seq_len']}"
        + ("" if meta.get("alpha") is None else f" --alpha {meta['alpha']:g}")
        + f" --seed {meta['seed']} --force",
        process=process,
        **options,
    )


def _create_command_for(path):
    """A best guess at the command that creates the dataset a path names (each process parses its folder names)."""
    name, _, sparsity = Path(path).name.partition("-sparse-")
    for process, cls in PROCESSES.items():
        parsed = cls.parse_folder_name(name)
        if parsed is not None and (not sparsity or re.fullmatch(r"\d+(?:\.\d+)?", sparsity)):
            n_states, options = parsed
            train = 10000 if n_states <= 10 else 50000
            sparsity = float(sparsity) if sparsity else None
            return generate_command(n_states, train, train // 10, sparsity, path, process=process, **options)
    return f"nanomarkov generate K --train N --val M --out {path}"


# ------------------------------------------------------------------ writing


def generate_dataset(
    out_dir,
    n_states,
    train_sequences,
    val_sequences,
    *,
    force=False,
    progress=None,
    chunk_tokens=CHUNK_TOKENS,
    fix=None,
    **choices,
):
    """Build a random process (or take the given `chain`, or a `spec`'s) and write a dataset folder; returns its meta dict.

    `choices` are plan_dataset's keywords (sparsity, alpha, seq_len, seed, dtype, chain, source, spec,
    process and the process's options), checked there before anything is written. This
    dataset is left as it is, any other folder (files.check_output_folder) replaced only with `force`,
    whole and at once (_write_dataset); `progress(n_tokens)` after each chunk. `fix`: the way out a
    refusal names, for a caller that has no --force or --out (the demo)."""
    chain, params, dtype = plan_dataset(n_states, train_sequences, val_sequences, **choices)
    out_dir = check_output_folder(out_dir, "dataset", is_dataset_folder, force=force, fix=fix, writes=DATASET_FILES)
    check_own_files(out_dir, DATASET_FILES, "dataset")
    with writer_lock(out_dir, "generation"):  # a second writer is refused, never interleaved
        if not force and _holds_this_dataset(out_dir, _existing_meta(out_dir), params, fix):
            return _existing_meta(out_dir)
        return _write_dataset(out_dir, chain, params, dtype, progress, chunk_tokens)


def plan_dataset(
    n_states,
    train_sequences,
    val_sequences,
    *,
    sparsity=None,
    alpha=1.0,
    seq_len=None,
    seed=42,
    dtype=None,
    chain=None,
    source=None,
    spec=None,
    process=DEFAULT_PROCESS,
    **options,
):
    """Every check generate_dataset makes before it writes, and what it then writes from: (the process, the
    dataset's parameters, the token dtype). A sweep calls it to refuse, before any work, what `generate` would.

    `process` names a registered class, `options` its own generation options (None: not given).
    With `chain`, sparsity and alpha are null and `source` (JSON: where the chain came from) joins
    the dataset's identity; `spec` is a spec dict or file (docs/specs.md), recorded in meta.json.
    Train and val come from their own streams of `seed`, so val does not change with --train."""
    options, spec_params = _given(options), {}
    if spec is not None:
        chain, spec_params = _process_of_spec(spec, chain, process, options, sparsity, alpha)
    if chain is not None:
        if n_states not in (None, chain.n_states):
            raise NanoMarkovError(f"n_states {n_states} does not match the given chain's {chain.n_states} states")
        process, n_states, sparsity, alpha = chain.process, chain.n_states, None, None
    cls = _checked_class(process, options)
    seq_len = default_seq_len(n_states) if seq_len is None else seq_len
    sparsity = sparsity or None
    _check_generate_args(n_states, train_sequences, val_sequences, sparsity, alpha, seq_len)
    dtype = _token_type(dtype, n_states)
    if chain is None:  # built before the identity check: the options' defaults are the chain's to say
        chain = cls.random(n_states, seed=seed, alpha=alpha, sparsity=sparsity, **options)
        _check_random(cls, chain, n_states)
    chain.check_seq_len(seq_len)  # refused from the sizes alone, before theory allocates anything
    params = dict(
        process=process,
        n_states=n_states,
        seq_len=seq_len,
        dtype=dtype.name,
        seed=seed,
        sparsity=sparsity,
        alpha=None if alpha is None else float(alpha),
        train_sequences=train_sequences,
        val_sequences=val_sequences,
    )
    params.update(chain.options(), **({} if source is None else {"source": source}), **spec_params)
    return chain, params, dtype


def _check_random(cls, chain, n_states):
    """Refuse what cls.random(n_states, ...) returned unless it is an instance of cls with those K states (a plugin's
    random() may return anything)."""
    if not isinstance(chain, cls):
        made = f"a {type(chain).__name__}"
    elif isinstance(chain.n_states, bool) or not isinstance(chain.n_states, (int, np.integer)):
        made = f"a process whose n_states is {chain.n_states!r}, not an integer"
    elif chain.n_states != n_states:
        made = f"a process of {chain.n_states} states"
    else:
        return
    raise NanoMarkovError(
        f"process {cls.process} ({cls.__name__}, module {cls.__module__}): random({n_states}, ...) returned {made}, "
        f"not a {cls.__name__} of {n_states} states; nothing was written: fix random() or n_states"
    )


def _process_of_spec(spec, chain, process, options, sparsity, alpha):
    """(the process, its meta.json keys) of a spec dict or of the path of a spec file; refused beside
    anything else that gives the process (a chain, process, option, sparsity or alpha)."""
    if chain is not None or process != DEFAULT_PROCESS or options or sparsity or alpha != 1.0:
        raise NanoMarkovError(
            "a spec gives the whole process: pass no chain, process, options, sparsity or alpha with it"
        )
    if not isinstance(spec, (str, os.PathLike)):
        return process_from_spec(spec), {"spec": spec_record(spec)}
    path = Path(spec)
    spec, process = process_from_file(path)
    return process, {"spec": spec_record(spec), "spec_file": {"path": str(path), "sha256": _file_sha256(path)}}


def _token_type(dtype, n_states):
    """The token dtype asked for (default: the smallest that fits K + 1 ids), checked."""
    dtype = np.dtype(dtype) if dtype is not None else token_dtype(n_states + 1)
    if dtype not in (np.dtype(np.uint16), np.dtype(np.uint32)):
        raise NanoMarkovError(f"dtype must be uint16 or uint32, got {dtype}")
    if n_states + 1 > np.iinfo(dtype).max + 1:
        raise NanoMarkovError(f"K = {n_states} needs {n_states + 1} token ids, more than {dtype} holds; use uint32")
    return dtype


def _holds_this_dataset(out_dir, existing, params, fix=None):
    """True when out_dir already holds the dataset of `params` (intact); raises when it holds another."""
    if existing is not None:
        keys = DEFINING_KEYS + tuple(k for k in params if k not in DEFINING_KEYS + PROVENANCE_KEYS)
        changed = [f"{k} {existing.get(k)!r} -> {params.get(k)!r}" for k in keys if existing.get(k) != params.get(k)]
        if not changed:
            load_dataset(out_dir)  # raises if the files were damaged since
            return True
        raise NanoMarkovError(
            f"{out_dir} already holds a different dataset ({', '.join(changed)}); "
            f"{fix or 'pass --force to replace it, or --out to write elsewhere'}"
        )
    return False


def is_dataset_folder(folder) -> bool:
    """Whether `folder` holds a dataset of nanoMarkov: a meta.json that `generate` wrote (its other files
    damaged or not), not a user's own meta.json."""
    return holds_record(folder, "meta.json", DATASET_MARKS)


def _write_dataset(out_dir, chain, params, dtype, progress, chunk_tokens):
    """Write the whole dataset into a hidden folder beside out_dir, then swap the two folders in one step.

    So at every instant out_dir holds the old dataset or the new one, whole (a kill at any moment
    included); files of out_dir that are not part of a dataset (the seed's model.pkl, say) move
    across. A build left by a killed generation is removed by the next one. Returns the meta dict.
    """
    refuse_the_current_folder(out_dir, "generate", "a dataset")
    check_free_space(out_dir, chain, params, dtype)
    # The exact theory can take minutes in one numpy call, where a stop may have to end the process
    # outright (progress.StopDeadline): done before the build folder exists, such a stop leaves none.
    theory = theory_record(chain, params["seq_len"])
    try:
        build = new_build_folder(out_dir)  # a killed generation's build removed first
    except OSError as e:
        raise NanoMarkovError(f"cannot write beside {out_dir} ({e.strerror or e}); choose another --out") from None
    try:
        meta = _write_files(build, chain, params, dtype, progress, chunk_tokens, theory)
        swap_in(build, out_dir)
        for other in build.iterdir():  # now the old folder: what a user kept beside the dataset stays
            if other.name not in (*DATASET_FILES, LOCK_FILE):
                os.replace(other, out_dir / other.name)
    except OSError as e:
        raise NanoMarkovError(
            f"cannot write the dataset to {out_dir} ({e.strerror or e}); free some space or choose another --out"
        ) from None
    finally:
        shutil.rmtree(build, ignore_errors=True)  # the unfinished build, or after the swap the old dataset
    return meta


def check_free_space(out_dir, chain, params, dtype):
    """Refuse, before writing a byte, a dataset (plan_dataset's chain, params and dtype) bigger than the free space
    where out_dir is or will be (its nearest folder that exists: a sweep's dry run plans folders not made yet)."""
    tokens = (params["train_sequences"] + params["val_sequences"]) * params["seq_len"]
    needed = tokens * dtype.itemsize
    if chain.BELIEF_STATES:
        needed += params["val_sequences"] * params["seq_len"] * chain.n_hidden * 4
    existing = next(folder for folder in Path(out_dir).absolute().parents if folder.is_dir())
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise NanoMarkovError(
            f"the dataset needs {format_bytes(needed)} and {out_dir.parent} has {format_bytes(free)} free; "
            "ask for fewer --train/--val sequences, or free some space or choose another --out"
        )


def theory_record(chain, seq_len):
    """meta.json's theory keys of `chain` at `seq_len`, checked (check_theory) before anything else reads them."""
    record = {"theory": check_theory(chain, chain.theory(seq_len), seq_len)}
    losses, errors = chain.optimal_loss_by_position(seq_len)
    record["optimal_loss_by_position"] = compact_by_position(
        losses, errors, record["theory"]["entropy_rate"], record["theory"].get("entropy_rate_se")
    )
    record["stage_losses"] = chain.stage_losses(seq_len)  # from theory's sample where estimated: free here
    record["stage_loss_errors"] = chain.stage_loss_errors(seq_len)
    return record


def _write_files(folder, chain, params, dtype, progress, chunk_tokens, theory):
    """chain.npz, the splits, the beliefs where the process has them, and meta.json (last) into `folder`;
    `theory` is theory_record's."""
    seq_len, seed = params["seq_len"], params["seed"]
    with open(folder / "chain.npz", "wb") as f:  # a file object, so savez adds no extension
        np.savez(f, **chain.arrays())
    meta = dict(
        params,
        format_version=FORMAT_VERSION,
        vocab_size=chain.vocab_size,
        bos_token=chain.bos_token,
        sha256={"chain.npz": _file_sha256(folder / "chain.npz")},
        **theory,
    )
    for split_index, split in enumerate(SPLITS, start=1):
        n = params[f"{split}_sequences"]
        rng = np.random.default_rng([seed, split_index])
        digest, loss_sum = _write_split(
            folder / f"{split}.bin", chain, n, seq_len, dtype, rng, max(1, chunk_tokens // seq_len), progress, split
        )
        meta["sha256"][f"{split}.bin"] = digest
        meta[f"{split}_tokens"] = n * seq_len
        if split == "val":
            meta["theory"]["true_loss_val"] = loss_sum / (n * (seq_len - 1))
    if chain.BELIEF_STATES:
        meta["sha256"][BELIEFS_FILE] = _write_val_beliefs(folder, chain, params["val_sequences"], seq_len, dtype)
    write_json(folder / "meta.json", meta, what="dataset record")
    return meta


# Rounding a float64 theory may show past a bound that holds for every process; an estimated number may
# also stray by THEORY_SIGMAS of its standard errors.
THEORY_ROUNDING = 1e-9
THEORY_SIGMAS = 4
# The optimal predictor is checked against the sampler on sequences sample() draws: at least CHECKED_SEQUENCES[0] of
# them (the spread of their losses estimates its own error) and at most CHECKED_SEQUENCES[1], their first positions
# cut so that the predictor's table holds at most CHECKED_ENTRIES numbers (2 MiB).
CHECKED_SEQUENCES = (64, 256)
CHECKED_ENTRIES = 2**18
# Their mean loss may exceed the stated optimum by this many standard errors before the two are called inconsistent:
# a one-sided test (a loss is right-skewed, so its mean strays far above only with a spread that widens its error),
# and five rather than four because a false refusal is not noise here: the same process is refused every time.
SAMPLE_SIGMAS = 5
LOSS_KEYS = ("entropy_rate", "optimal_loss", "unigram_loss")
THEORY_KEYS = (*LOSS_KEYS, "optimal_accuracy", "uniform_loss")


def process_label(chain):
    """A process in a message: its name, class and module (a plugin's author finds their code by these)."""
    return f"process {chain.process} ({type(chain).__name__}, module {type(chain).__module__})"


def theory_bounds(theory, n_states):
    """(what, holds) for each bound every process's theory obeys, whatever its start: losses between 0 and
    log K, the entropy rate at most the unigram loss (H(x_t | past) <= H(x_t) in the stationary regime),
    the argmax accuracy between 1/K and 1; each with the slack of its numbers' errors. Not among them: an
    optimal loss below the entropy rate, right for a chain started away from its stationary law
    (the sampler-predictor check of check_theory refuses an optimum below what the predictor reaches)."""
    log_k = math.log(n_states)

    def slack(*names):
        return THEORY_ROUNDING + THEORY_SIGMAS * sum(theory.get(f"{name}_se") or 0.0 for name in names)

    bounds = [(f"{name} = {theory[name]:.6g} is negative", theory[name] >= -slack(name)) for name in LOSS_KEYS]
    bounds += [
        (f"{name} = {theory[name]:.6g} is above log K = {log_k:.6g}", theory[name] <= log_k + slack(name))
        for name in LOSS_KEYS
    ]
    accuracy = theory["optimal_accuracy"]
    return bounds + [
        (
            f"entropy_rate = {theory['entropy_rate']:.6g} is above unigram_loss = {theory['unigram_loss']:.6g}",
            theory["entropy_rate"] <= theory["unigram_loss"] + slack("entropy_rate", "unigram_loss"),
        ),
        (
            f"optimal_accuracy = {accuracy:.6g} is outside [1/K, 1]",
            1 / n_states - slack("optimal_accuracy") <= accuracy <= 1 + slack("optimal_accuracy"),
        ),
    ]


def check_theory(chain, theory, seq_len):
    """Refuse theory that cannot be right (a plugin's wrong probabilities, say) before the dataset is written, naming
    the process: a number of THEORY_KEYS (or an error of one) that is not a finite number or breaks a bound of
    theory_bounds; an optimum by position of the wrong shape; a sample() that is not BOS-led tokens of the asked
    shape (check_sample); optimal_log_probs that are not probabilities summing to 1 on them, or whose loss on them
    is far above the stated optimum. Returns theory with those numbers as floats."""
    values = {key: value for key, value in theory.items() if key.removesuffix("_se") in THEORY_KEYS}
    broken = [
        f"{key} = {value!r} is not a finite number"
        for key, value in values.items()
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
    ]
    broken += [f"it gives no {key}" for key in THEORY_KEYS if key not in theory]
    if not broken:
        theory = {**theory, **{key: float(value) for key, value in values.items()}}
        broken = [what for what, holds in theory_bounds(theory, chain.n_states) if not holds]
    if not broken:
        broken = predictor_problems(chain, seq_len)
    if broken:
        raise NanoMarkovError(
            f"{process_label(chain)} gives theory that cannot be right: {'; '.join(broken)}; nothing was written: "
            "fix the process (its probabilities, entropies, sampler or optimal predictor)"
        )
    return theory


def checked_sizes(chain, seq_len):
    """(sequences, their length) of check_theory's sample: CHECKED_SEQUENCES within CHECKED_ENTRIES where they fit."""
    fewest, most = CHECKED_SEQUENCES
    per_sequence = (seq_len - 1) * chain.n_states
    n_sequences = min(most, max(fewest, CHECKED_ENTRIES // per_sequence))
    return n_sequences, min(seq_len, max(2, CHECKED_ENTRIES // (n_sequences * chain.n_states) + 1))


def predictor_problems(chain, seq_len):
    """What is wrong with the optimum by position, or with the optimal predictor on sequences sample() draws (at
    their first positions, checked_sizes): [] when nothing is."""
    losses, errors = (np.asarray(part, dtype=np.float64) for part in chain.optimal_loss_by_position(seq_len))
    if losses.shape != (seq_len - 1,) or errors.shape != (seq_len - 1,):
        return [
            f"optimal_loss_by_position({seq_len}) gives shapes {losses.shape}, {errors.shape}, not ({seq_len - 1},)"
        ]
    if not (np.isfinite(losses).all() and np.isfinite(errors).all() and (errors >= 0).all()):
        return ["optimal_loss_by_position gives a loss that is not finite, or a negative error"]
    n_sequences, length = checked_sizes(chain, seq_len)
    tokens = check_sample(chain, chain.sample(n_sequences, seq_len, np.random.default_rng(0)), n_sequences, seq_len)
    tokens = np.asarray(tokens[:, :length], dtype=np.int64)
    log_probs = np.asarray(chain.optimal_log_probs(tokens))
    expected_shape = (n_sequences, length - 1, chain.n_states)
    if log_probs.shape != expected_shape or not np.issubdtype(log_probs.dtype, np.floating):
        return [
            f"optimal_log_probs on {tokens.shape} tokens gives {log_probs.dtype} {log_probs.shape}, not {expected_shape}"
        ]
    with np.errstate(invalid="ignore", over="ignore"):
        total = np.exp(log_probs).sum(axis=-1)
    if np.isnan(log_probs).any() or (log_probs > THEORY_ROUNDING).any() or np.abs(total - 1).max() > 1e-6:
        return ["optimal_log_probs gives probabilities outside [0, 1] or rows that do not sum to 1"]
    picked = np.take_along_axis(log_probs, tokens[:, 1:, None], axis=2)[..., 0]
    if np.isneginf(picked).any():
        return ["optimal_log_probs gives probability 0 to a token that sample() drew"]
    per_sequence = -picked.mean(axis=1)
    mean, error = float(per_sequence.mean()), float(per_sequence.std(ddof=1) / math.sqrt(n_sequences))
    # se(mean of estimates) <= mean of their errors, whatever their correlation: the bound is conservative.
    stated, stated_error = float(losses[: length - 1].mean()), float(errors[: length - 1].mean())
    if mean > stated + SAMPLE_SIGMAS * math.hypot(error, stated_error) + THEORY_ROUNDING:
        return [
            f"its optimal predictor's loss on {n_sequences} sequences sample() drew is {mean:.6g} (standard error "
            f"{error:.2g}) over positions 1..{length - 1}, far above the optimal loss it states there, {stated:.6g} "
            "(optimal_loss_by_position): sample() and optimal_log_probs() disagree, or that optimum is too low"
        ]
    return []


def check_sample(chain, tokens, n_sequences, seq_len):
    """What sample(n_sequences, seq_len, rng) returned, as an array, once it is integer tokens of shape (n_sequences,
    seq_len), BOS first and states 0..K-1 after; else refused naming the process (a dataset written from it would
    be refused when loaded, or train on nonsense)."""
    tokens, k = np.asarray(tokens), chain.n_states
    if tokens.shape != (n_sequences, seq_len):
        problem = f"shape {tokens.shape}, not ({n_sequences}, {seq_len})"
    elif not np.issubdtype(tokens.dtype, np.integer):
        problem = f"{tokens.dtype} values, not integer tokens"
    elif (tokens[:, 0] != chain.bos_token).any():
        problem = f"a sequence that does not start with BOS = {chain.bos_token}"
    elif tokens[:, 1:].min() < 0 or tokens[:, 1:].max() >= k:
        problem = f"a token outside the states 0..{k - 1} after BOS"
    else:
        return tokens
    raise NanoMarkovError(
        f"{process_label(chain)}: sample({n_sequences}, {seq_len}, rng) returned {problem}; nothing was written: fix "
        "sample() (nanomarkov/processes/base.py says what it returns)"
    )


def compact_by_position(losses, errors, limit, limit_se=None, tolerance=BY_POSITION_TOLERANCE):
    """meta.json's record of the optimum at every position: the losses up to where they have
    converged to `limit` (the entropy rate), then nothing, since every later position is within
    `tolerance` nats of the limit.

    {"values": losses[:n], "se": errors[:n] (null where every error is 0: exact), "limit",
    "limit_se" (null: exact), "converged_at": n + 1 (the first position the limit stands for;
    null when none does within the sequence), "tolerance"}. A loss whose error is not 0 counts
    as converged only when its error bound is within tolerance too, so an estimate is never cut.
    """
    losses, errors = np.asarray(losses, dtype=np.float64), np.asarray(errors, dtype=np.float64)
    close = np.abs(losses - limit) + 4 * errors <= tolerance
    # n: the number of leading positions kept, the smallest with every later one close to the limit.
    n = len(losses) - int(np.argmin(close[::-1])) if not close.all() else 0
    exact = not errors.any()
    return {
        "values": losses[:n].tolist(),
        "se": None if exact else errors[:n].tolist(),
        "limit": float(limit),
        "limit_se": None if not limit_se else float(limit_se),
        "converged_at": n + 1 if n < len(losses) else None,
        "tolerance": tolerance,
    }


def expand_by_position(record, seq_len):
    """(losses, errors), two (seq_len - 1,) arrays, from compact_by_position's record: the values,
    then the limit (its error limit_se, else 0) at every later position."""
    positions, kept = seq_len - 1, len(record["values"])
    if kept > positions:
        raise NanoMarkovError(f"optimal_loss_by_position holds {kept} positions, more than seq_len - 1 = {positions}")
    losses = np.full(positions, record["limit"], dtype=np.float64)
    losses[:kept] = record["values"]
    errors = np.full(positions, record.get("limit_se") or 0.0, dtype=np.float64)
    errors[:kept] = record["se"] if record.get("se") is not None else 0.0
    return losses, errors


def optimal_loss_by_position(dataset):
    """(losses, errors) of the optimal predictor at positions 1..L-1 of a loaded dataset: from
    meta.json, or from its process for a dataset written before meta.json recorded them."""
    record = dataset.meta.get("optimal_loss_by_position")
    if record is None:
        return dataset.chain.optimal_loss_by_position(dataset.seq_len)
    return expand_by_position(record, dataset.seq_len)


def stage_losses(dataset):
    """The process's stage losses (Process.stage_losses) for a loaded dataset: from meta.json, or from
    its process for a dataset written before meta.json recorded them (an estimate's sample is drawn again)."""
    record = dataset.meta.get("stage_losses")
    return dataset.chain.stage_losses(dataset.seq_len) if record is None else record


def stage_loss_errors(dataset):
    """The standard errors of stage_losses(dataset) (0.0 where exact): from meta.json, or from its process."""
    record = dataset.meta.get("stage_loss_errors")
    return dataset.chain.stage_loss_errors(dataset.seq_len) if record is None else record


def _check_generate_args(n_states, train_sequences, val_sequences, sparsity, alpha, seq_len):
    def is_int(x):
        return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

    if not is_int(n_states) or n_states < 2:
        raise NanoMarkovError(f"the number of states K must be an integer >= 2, got {n_states!r}")
    for name, count in (("--train", train_sequences), ("--val", val_sequences)):
        if not is_int(count) or count < 1:
            raise NanoMarkovError(f"{name} must be a positive number of sequences, got {count!r}")
    if sparsity is not None and not 0 <= sparsity < 100:
        raise NanoMarkovError(f"--sparsity must be a percentage in [0, 100), got {sparsity:g}")
    if alpha is not None and not valid_concentration(alpha):
        raise NanoMarkovError(
            f"--alpha must be a finite number {CONCENTRATION_RANGE}, the concentration; got {alpha:g}"
        )
    if not is_int(seq_len) or seq_len < 2:
        raise NanoMarkovError(f"--seq_len must be >= 2 (BOS plus at least one state), got {seq_len!r}")


def _write_split(path, chain, n_sequences, seq_len, dtype, rng, chunk_sequences, progress, split):
    """Stream n_sequences into path; returns (sha256, summed true loss: val only, 0.0 for train)."""
    digest = hashlib.sha256()
    loss_sum = 0.0
    with open(path, "wb") as f:
        for lo in range(0, n_sequences, chunk_sequences):
            size = min(chunk_sequences, n_sequences - lo)
            chunk = check_sample(chain, chain.sample(size, seq_len, rng), size, seq_len)
            chunk = np.ascontiguousarray(chunk, dtype=dtype.newbyteorder("<"))
            buffer = memoryview(chunk).cast("B")
            f.write(buffer)
            digest.update(buffer)
            if split == "val":  # meta.json's true_loss_val; the train split's would go unused
                loss_sum += chain.true_loss(chunk) * chunk.shape[0] * (seq_len - 1)
            if progress is not None:
                progress(chunk.size)
        f.flush()
        os.fsync(f.fileno())
    return digest.hexdigest(), loss_sum


def _write_val_beliefs(folder, chain, n_sequences, seq_len, dtype):
    """The belief states of folder's val.bin sequences into BELIEFS_FILE; returns its sha256."""
    val = np.memmap(folder / "val.bin", dtype=dtype.newbyteorder("<"), mode="r", shape=(n_sequences, seq_len))
    path = folder / BELIEFS_FILE
    beliefs = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n_sequences, seq_len, chain.n_hidden))
    step = max(1, CHUNK_TOKENS // seq_len)
    for lo in range(0, n_sequences, step):
        beliefs[lo : lo + step] = chain.belief_states(np.asarray(val[lo : lo + step]))
    beliefs.flush()
    del beliefs, val
    return _file_sha256(path)


def _file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def load_val_beliefs(dataset):
    """The saved belief states of a dataset's val split, (n_val, seq_len, H) float32, checked against meta.json:
    one row per sequence of dataset.val (a dataset cut to its first n val sequences gets their n rows)."""
    path = dataset.path / BELIEFS_FILE
    expected = dataset.meta["sha256"].get(BELIEFS_FILE)
    if expected is None:
        raise NanoMarkovError(
            f"{dataset.path}: a {dataset.meta.get('process', 'markov')} dataset has no hidden "
            f"states, so no belief states (only hmm datasets save {BELIEFS_FILE})"
        )
    fix = _regenerate_command(dataset.meta, dataset.path)
    if not path.is_file():
        raise not_a_file(path, fix)
    if _file_sha256(path) != expected:
        raise NanoMarkovError(f"{path}: modified (sha256 does not match meta.json); regenerate with: {fix}")
    beliefs = np.load(path, mmap_mode="r", allow_pickle=False)
    if beliefs.shape != (dataset.meta["val_sequences"], dataset.seq_len, dataset.chain.n_hidden):
        raise NanoMarkovError(f"{path}: shape {beliefs.shape} does not match val.bin; regenerate with: {fix}")
    return beliefs[: dataset.val.shape[0]]


def _existing_meta(folder):
    """meta.json's object; None where there is no meta.json; {} where it is unreadable or not an object
    (a dataset of unknown parameters, so never silently reused)."""
    try:
        meta = json.loads(read_capped(Path(folder) / "meta.json"))
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


# ------------------------------------------------------------------ loading


@dataclass(frozen=True)
class Dataset:
    """A loaded dataset: its meta, its chain and memory-mapped (n, seq_len) splits."""

    path: Path
    meta: dict
    chain: object  # an instance of a PROCESSES class
    train: np.ndarray
    val: np.ndarray

    @property
    def seq_len(self):
        return self.meta["seq_len"]

    @property
    def vocab_size(self):
        return self.meta["vocab_size"]


def load_dataset(path, verify=True):
    """Open and validate a dataset folder; every failure names the file and the fix.

    Sizes and shapes are always checked. With `verify` (the default) every
    token is checked (BOS at each sequence start, states after it) and the
    sha256 of each .bin is compared with meta.json, reading in chunks so
    memory stays flat.
    """
    path = Path(path)
    if not path.is_dir():
        raise NanoMarkovError(f"{path}: no such dataset folder; create it with: {_create_command_for(path)}")
    meta = _existing_meta(path)
    if meta is None:
        raise NanoMarkovError(
            f"{path}: no meta.json, so this is not a dataset (an interrupted generation leaves none); "
            f"create it with: {_create_command_for(path)} --force"
        )
    if not meta or meta.get("format_version") != FORMAT_VERSION:
        raise NanoMarkovError(
            f"{path / 'meta.json'}: unreadable, not a JSON object, or of an unknown format version "
            f"({meta.get('format_version') if meta else 'none'}; this nanoMarkov reads {FORMAT_VERSION}); "
            f"regenerate with: {_create_command_for(path)} --force"
        )
    missing = [key for key, kind in META_KEYS.items() if not isinstance(meta.get(key), kind)]
    missing += [] if meta.get("dtype") in ("uint16", "uint32") else ["dtype (uint16 or uint32)"]
    if missing:
        raise NanoMarkovError(
            f"{path / 'meta.json'}: {', '.join(missing)} missing or of the wrong type (edited or damaged); "
            f"regenerate with: {_create_command_for(path)} --force"
        )
    fix = _regenerate_command(meta, path)
    process = meta.get("process", DEFAULT_PROCESS)
    if process not in PROCESSES:
        raise NanoMarkovError(
            f"{path / 'meta.json'}: process {process!r} is not registered (known: {', '.join(PROCESSES)}); "
            f"name the module or .py file that registers it in {PLUGINS_VARIABLE}"
        )
    chain = _load_chain(path, PROCESSES[process], meta, fix)
    if chain.n_states != meta["n_states"]:
        raise NanoMarkovError(
            f"{path / 'chain.npz'}: has {chain.n_states} states, meta.json says {meta['n_states']}; regenerate with: {fix}"
        )
    for name, value in chain.options().items():
        if value != meta.get(name):
            raise NanoMarkovError(
                f"{path / 'chain.npz'}: has {name} {value}, meta.json says {meta.get(name)}; regenerate with: {fix}"
            )

    splits = {split: _load_split(path, split, meta, chain, verify, fix) for split in SPLITS}
    return Dataset(path, meta, chain, splits["train"], splits["val"])


def not_a_file(path, fix):
    """The error for a dataset's file that is not a regular file: missing, a link to nothing, a folder, or a
    device or FIFO (which generate will not replace either: it is moved away first)."""
    if not os.path.lexists(path):
        return NanoMarkovError(f"{path}: missing; regenerate with: {fix}")
    if not os.path.exists(path):
        what = f"a link to {os.readlink(path)}, which does not exist"
    else:
        what = "a folder, not a file" if os.path.isdir(path) else "not a regular file (a FIFO, a device or a socket)"
    return NanoMarkovError(f"{path}: {what}; move it away, then regenerate with: {fix}")


def _load_chain(path, cls, meta, fix):
    """The process in chain.npz, its sha256 checked against meta.json first (datasets written before
    nanoMarkov hashed chain.npz have no such entry and are read as they are)."""
    file = path / "chain.npz"
    expected = meta["sha256"].get("chain.npz")
    if not file.is_file():
        raise not_a_file(file, fix)
    if expected is not None and _file_sha256(file) != expected:
        raise NanoMarkovError(
            f"{file}: sha256 does not match meta.json (the chain was replaced or modified); regenerate with: {fix}"
        )
    try:
        with open_regular(file) as opened:
            check_fits(npz_bytes(npz_headers(opened)), f"the arrays of {file}", f"regenerate with: {fix}")
            opened.seek(0)
            with np.load(opened, allow_pickle=False) as npz:
                return cls.from_arrays(npz)
    except (OSError, EOFError, zipfile.BadZipFile, ValueError):
        raise NanoMarkovError(
            f"{file}: not a readable .npz archive of the process's arrays; regenerate with: {fix}"
        ) from None
    except KeyError as e:
        raise NanoMarkovError(f"{file}: lacks the array {e}; regenerate with: {fix}") from None
    except NanoMarkovError as e:
        raise NanoMarkovError(f"{file}: {e}; regenerate with: {fix}") from None


def _load_split(path, split, meta, chain, verify, fix):
    """One split memory-mapped as (n, seq_len), its size checked (and with `verify` its tokens and sha256)."""
    seq_len, dtype = meta["seq_len"], np.dtype(meta["dtype"]).newbyteorder("<")
    file = path / f"{split}.bin"
    if not file.is_file():
        raise not_a_file(file, fix)
    size = file.stat().st_size
    expected = meta[f"{split}_tokens"] * dtype.itemsize
    if size % (seq_len * dtype.itemsize) or size != expected:
        raise NanoMarkovError(
            f"{file}: {size} bytes, expected {expected} ({meta[f'{split}_sequences']} sequences of "
            f"{seq_len} {dtype.name} tokens): truncated or replaced; regenerate with: {fix}"
        )
    tokens = np.memmap(file, dtype=dtype, mode="r", shape=(meta[f"{split}_sequences"], seq_len))
    if verify:
        _verify_split(file, tokens, chain, meta["sha256"][f"{split}.bin"], fix)
    return tokens


def _verify_split(file, tokens, chain, expected_sha256, fix):
    digest = hashlib.sha256()
    step = max(1, CHUNK_TOKENS // tokens.shape[1])
    for lo in range(0, tokens.shape[0], step):
        chunk = np.asarray(tokens[lo : lo + step])
        bad_start = np.flatnonzero(chunk[:, 0] != chain.bos_token)
        if bad_start.size:
            raise NanoMarkovError(
                f"{file}: sequence {lo + bad_start[0]} does not start with BOS = {chain.bos_token}; regenerate with: {fix}"
            )
        bad = np.argwhere(chunk[:, 1:] >= chain.n_states)
        if bad.size:
            seq, pos = bad[0]
            raise NanoMarkovError(
                f"{file}: token {chunk[seq, pos + 1]} at sequence {lo + seq}, position {pos + 1} is not a state "
                f"(0..{chain.n_states - 1}); regenerate with: {fix}"
            )
        digest.update(memoryview(np.ascontiguousarray(chunk)).cast("B"))
    if digest.hexdigest() != expected_sha256:
        raise NanoMarkovError(
            f"{file}: sha256 does not match meta.json (the file was modified); regenerate with: {fix}"
        )


def learnable_fraction(loss, theory):
    """The share of the learnable structure a model with this val loss has captured: how far it has come
    from the uniform predictor (knowing nothing, 0) to the true process on the same val sequences (1).

    Uniform rather than unigram is the start because it is what an untrained model predicts and needs no
    estimate; and unlike true_loss_val / loss ("% of optimum"), which gives a uniform predictor 85 % and more, it
    puts a model that learned nothing at 0."""
    return (theory["uniform_loss"] - loss) / (theory["uniform_loss"] - theory["true_loss_val"])


def estimate_text(theory, key):
    """A theory number as printed: six decimals, and "±error" where it is estimated (a nonzero "<key>_se")."""
    error = theory.get(f"{key}_se")
    return f"{theory[key]:.6f}" + (f"±{error:.1g}" if error else "")


def headline(record):
    """A run's result in one phrase: its excess in nats over the floor it is measured against, and the
    learnable structure captured (a record of done.json's keys; an older one without the share omits it)."""
    captured = record.get("learnable_fraction")
    share = "" if captured is None else f", {100 * captured:.1f} % of the learnable structure captured"
    return (
        f"val {record['val_loss']:.6f}, excess {record['excess']:+.6f} nats over true_loss_val "
        f"{record['true_loss_val']:.6f}{share}"
    )


def dataset_theory(dataset):
    """The exact theory of a loaded dataset, recomputed from its chain and val split."""
    theory = dataset.chain.theory(dataset.seq_len)
    theory["true_loss_val"] = dataset.chain.true_loss(dataset.val)
    return theory


def import_hmmlearn(
    path,
    out_dir,
    *,
    trust_pickle=False,
    train_sequences=10000,
    val_sequences=1000,
    seq_len=None,
    seed=42,
    force=False,
    progress=None,
):
    """Write a dataset folder (chain.npz, train/val, meta.json with theory) for a pickled hmmlearn chain.

    meta.json has process "markov", sparsity and alpha null, and
    source = {"format": "hmmlearn-pickle", "path", "sha256"} naming the file;
    `seed` drives only the sampling. Returns the meta dict.
    """
    chain = load_hmmlearn_chain(path, trust_pickle)
    path = Path(path)
    source = {
        "format": "hmmlearn-pickle",
        "path": str(path.resolve()),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }
    return generate_dataset(
        out_dir,
        None,
        train_sequences,
        val_sequences,
        seq_len=seq_len,
        seed=seed,
        force=force,
        progress=progress,
        chain=chain,
        source=source,
    )
