"""Everything a training run needs, in one dataclass, and the three ways to fill it.

- `preset(name, n_states, ...)`: a recipe (ours, the seed's, or one of the seed's
  ablations c1..c12) as a complete dict of TrainConfig fields; `dataset_preset(name,
  data_dir)` the same for a dataset folder of any process;
- `load_config_file(path)`: a config file of Python assignments, the seed's style,
  read as data with `ast` (nothing in it runs);
- `parse_overrides(["--key=value", ...])`: command-line overrides.

Each gives a plain dict; `TrainConfig.from_dict(d)` checks it and builds the config.
`run_folder(...)` names a run's folder (every recipe and the sweep use it), and
`config_changes(saved, cfg)` says how a config differs from a run's saved one.
`format_config_file(d, header)` writes a dict back as a config file.

The model's vocab_size and block_size are not here: they come from the dataset
(vocab_size = K+1, block_size = seq_len-1), see `TrainConfig.gpt_config`.
"""

import ast
import dataclasses
import difflib
import json
import math
import operator
from dataclasses import dataclass
from pathlib import Path

from nanomarkov.errors import NanoMarkovError
from nanomarkov.files import read_capped, read_json_or_none
from nanomarkov.gpt_config import ADDED_FIELDS as MODEL_ADDED_FIELDS
from nanomarkov.gpt_config import GPTConfig
from nanomarkov.processes import DEFAULT_PROCESS, process_class

# Where training sequences come from: the dataset's train split, or fresh from its process.
DATA_SOURCES = ("fixed", "online")


@dataclass
class TrainConfig:
    # I/O
    data_dir: str = "data/mm100"  # dataset folder written by `nanomarkov generate`
    out_dir: str = "trainings/MM/MM-100/MM-100-42"  # run folder: config.json, log.jsonl, ckpt.pt, done.json
    init_from: str = "scratch"  # 'scratch' starts afresh; 'resume' continues from out_dir/ckpt.pt
    always_save_checkpoint: bool = True  # checkpoint at every eval, not only when val loss improves
    eval_interval: int = 250  # iterations between evaluations (and checkpoints)
    log_interval: int = 10  # iterations between train-loss log lines
    snapshots: int = 0  # weights-only snapshots at log-spaced iterations in out_dir/snapshots/ (0: none)
    snapshot_every: int = 0  # also a snapshot every N iterations, and at max_iters (0: none)
    wandb_log: bool = False  # log to Weights & Biases (wandb is imported only then)
    wandb_project: str = "MM-experiments"  # wandb project name
    wandb_run_name: str = ""  # wandb run name; '' means the name of out_dir
    # Model (see GPTConfig; vocab_size and block_size come from the dataset)
    n_layer: int = 2  # residual blocks
    n_head: int = 8  # attention heads per block
    n_embd: int = 128  # residual stream width
    dropout: float = 0.0  # dropout probability, in [0, 1)
    bias: bool = False  # biases in Linear and LayerNorm layers
    use_ln: bool = True  # LayerNorms on (all of them, final one included)
    pos_ape: bool = True  # learned absolute position embeddings
    alibi: bool = False  # attention scores fall with distance, by 2**-h a token in head h (not with mlp_only)
    alibi_trained: bool = False  # alibi's bias trained: a table per layer, head and distance (needs alibi)
    mlp_only: bool = False  # no attention sublayer at all
    attn_only: bool = False  # no MLP (nor its LayerNorm) at all; mlp_ratio and mlp_filter are unused
    mlp_ratio: int = 4  # MLP hidden width / n_embd
    mlp_filter: str = "GELU"  # GELU | RELU | RELU2 | RELU3
    mlp_first_matrix_identity: bool = False  # MLP's first matrix is a frozen identity (mlp_ratio 1)
    one_hot_embed: bool = False  # frozen one-hot token embedding (n_embd >= K+1)
    lm_head_tied: bool = True  # head shares the token embedding
    lm_head_bias: bool = False  # a learned bias on the head's logits
    # Training
    batch_size: int = 32  # sequences per micro-batch
    grad_accum_steps: int = 1  # micro-batches per optimizer step; tokens/iter = batch*accum*block
    max_iters: int = 1500  # optimizer steps in the whole run
    learning_rate: float = 1e-2  # peak learning rate, reached after warmup
    decay_lr: bool = True  # linear warmup then cosine decay; False keeps learning_rate fixed
    warmup_iters: int = 50  # steps of linear warmup from 0 to learning_rate
    lr_decay_iters: int = 1500  # step at which the cosine reaches min_lr (held there after)
    min_lr: float = 1e-3  # floor of the cosine decay
    weight_decay: float = 0.1  # AdamW decoupled weight decay on matrices and embeddings
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 disables
    data_source: str = "fixed"  # 'fixed': the dataset's train split; 'online': fresh sequences from its process
    # System
    seed: int = 42  # seeds torch, numpy and batch sampling
    device: str = "auto"  # auto (CUDA, else MPS, else CPU) | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto (bf16 on CUDA when supported, else fp32) | float32 | bfloat16 | float16
    compile: str | bool = "auto"  # torch.compile: 'auto' (CUDA only) | True | False
    threads: int | str = "auto"  # torch's intra-op threads: N, or 'auto' (docs/training.md#threads)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            setattr(self, f.name, _check_type(f.name, getattr(self, f.name)))
        for name in ("batch_size", "grad_accum_steps", "eval_interval", "log_interval"):
            _require(getattr(self, name) >= 1, f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_iters", "warmup_iters", "lr_decay_iters", "seed", "snapshots", "snapshot_every"):
            _require(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        _require(self.max_iters >= 1, "max_iters = 0 trains nothing; give max_iters >= 1 (e.g. --max_iters=600)")
        # Past max_iters the schedule would keep 0 and max_iters only: surely not what was meant.
        _require(
            self.snapshot_every <= self.max_iters,
            f"snapshot_every ({self.snapshot_every}) is more than max_iters ({self.max_iters}); give at most "
            f"max_iters, or 0 for no snapshots at fixed steps",
        )
        _require(
            not self.decay_lr or self.warmup_iters <= self.max_iters,
            f"warmup_iters ({self.warmup_iters}) is longer than the run (max_iters {self.max_iters}): the "
            f"learning rate would never reach its peak; give warmup_iters <= {self.max_iters} "
            f"(e.g. --warmup_iters={self.max_iters // 10}) or a longer run",
        )
        _require(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
        _require(
            0 <= self.min_lr <= self.learning_rate,
            f"min_lr must be in [0, learning_rate={self.learning_rate}], got {self.min_lr}",
        )
        _require(
            not self.decay_lr or self.lr_decay_iters >= self.warmup_iters,
            f"lr_decay_iters ({self.lr_decay_iters}) must be >= warmup_iters ({self.warmup_iters})",
        )
        for name in ("weight_decay", "grad_clip"):
            _require(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("beta1", "beta2"):
            _require(0 <= getattr(self, name) < 1, f"{name} must be in [0, 1), got {getattr(self, name)}")
        _require(self.data_dir != "" and self.out_dir != "", "data_dir and out_dir must not be empty")
        _require(
            self.init_from in ("scratch", "resume"), f"init_from must be 'scratch' or 'resume', got {self.init_from!r}"
        )
        _require(
            self.data_source in DATA_SOURCES,
            f"data_source must be {' or '.join(map(repr, DATA_SOURCES))}, got {self.data_source!r}",
        )
        _require(
            self.device in ("auto", "cpu", "cuda", "mps")
            or (self.device.startswith("cuda:") and self.device[5:].isascii() and self.device[5:].isdigit()),
            f"device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}",
        )
        _require(
            self.dtype in ("auto", "float32", "bfloat16", "float16"),
            f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}",
        )
        # The model's own checks, with a stand-in vocabulary (the real one needs the dataset).
        self.gpt_config(vocab_size=1, block_size=1)

    @classmethod
    def from_dict(cls, values: dict, where: str = "config") -> "TrainConfig":
        """Build from a dict, naming any unknown key and listing the valid ones."""
        for key in values:
            _require_known(key, key, where)
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def gpt_config(self, vocab_size: int, block_size: int) -> GPTConfig:
        """The model's config: our model fields plus the dataset's vocab_size and block_size."""
        return GPTConfig(
            vocab_size=vocab_size, block_size=block_size, **{name: getattr(self, name) for name in MODEL_FIELDS}
        )


FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))
MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(GPTConfig) if f.name not in ("vocab_size", "block_size"))

# Fields newer than the first runs: absent from an older run's config.json, they mean their default,
# which computes what that run computed (TrainConfig's own later fields join the model's here).
ADDED_FIELDS = (*MODEL_ADDED_FIELDS, "data_source", "snapshot_every", "threads")

# A run folder is one whose config.json `train` wrote: every run's holds these keys beside the
# TrainConfig fields (since the first version), which a user's own config.json is unlikely to.
RUN_CONFIG_FILE = "config.json"
# The files train writes at the top of a run folder (and its snapshots/): never over a user's of these names.
RUN_FILES = (RUN_CONFIG_FILE, "ckpt.pt", "log.jsonl", "training.log", "done.json")
RUN_CONFIG_MARKS = ("data_dir", "out_dir", "vocab_size", "block_size", "device_resolved", "tokens_per_iter")


def is_run_folder(folder) -> bool:
    """Whether `folder` holds a run of nanoMarkov (its config.json written by `train`)."""
    record = read_json_or_none(Path(folder) / RUN_CONFIG_FILE)
    return record is not None and all(key in record for key in RUN_CONFIG_MARKS)


# Config fields a resumed run may change without changing what it computes.
RESUMABLE_CHANGES = frozenset(
    {
        "init_from",
        "out_dir",
        "max_iters",
        "eval_interval",
        "log_interval",
        "always_save_checkpoint",
        "wandb_log",
        "wandb_project",
        "wandb_run_name",
        "device",
        "compile",
        "threads",
        "snapshots",
        "snapshot_every",
    }
)


def config_changes(saved: dict, cfg: TrainConfig, ignore=RESUMABLE_CHANGES) -> list:
    """How cfg differs from a run's saved config (its config.json dict), as 'key old -> new',
    leaving out the fields in `ignore` (by default those a resumed run may change)."""
    saved = {**{k: getattr(TrainConfig, k) for k in ADDED_FIELDS if k not in saved}, **saved}
    return [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in cfg.to_dict().items() if k not in ignore and saved.get(k) != v]


# Keys the seed's config files set that mean nothing here. A config file may
# carry them (they are dropped); an override may not, since typing one by hand
# means expecting an effect.
LEGACY_IGNORED = {
    "dataset": "the seed's dummy dataset name; data_dir says where the data is",
    "eval_iters": "evaluation covers the val split as evaluate.py decides",
    "vocab_size": "it is read from the dataset (K+1)",
    "block_size": "it is read from the dataset (seq_len-1)",
}
# Seed keys that were renamed: the old name still works.
LEGACY_RENAMED = {"train_seed": "seed", "gradient_accumulation_steps": "grad_accum_steps"}


def merge_settings(base: dict, given: dict) -> dict:
    """`base` (a recipe, or the defaults under a config file) with the settings `given` on top, the
    schedule following the run (docs/training.md#the-learning-rate-schedule):

    - max_iters given without lr_decay_iters: the decay ends with the run, at max_iters;
    - a resumed run (init_from 'resume') keeps the decay it was trained with (its config.json's
      lr_decay_iters) unless lr_decay_iters is given, so that resuming never changes its schedule.
    """
    merged = {**base, **given}
    if "lr_decay_iters" in given:
        return merged
    saved = {}
    if merged.get("init_from") == "resume" and isinstance(merged.get("out_dir"), str):
        saved = read_json_or_none(Path(merged["out_dir"]) / RUN_CONFIG_FILE) or {}
    if type(saved.get("lr_decay_iters")) is int:
        merged["lr_decay_iters"] = saved["lr_decay_iters"]
    elif "max_iters" in given:
        merged["lr_decay_iters"] = given["max_iters"]
    return merged


def _require(condition: bool, message: str):
    if not condition:
        raise NanoMarkovError(message)


def _require_known(field: str, key: str, where: str):
    """Refuse `key` (the name as given; `field` what it means) unless it names a TrainConfig field. The message's
    close-match search is slow (difflib, a few ms), so it is built only for a key that is refused."""
    if field not in FIELDS:
        raise NanoMarkovError(_unknown_key_message(key, where))


def _unknown_key_message(key: str, where: str) -> str:
    close = difflib.get_close_matches(key, FIELDS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown key {key!r} in {where}{hint}; valid keys: {', '.join(FIELDS)}"


# 'auto' threads: what torch would use here (every core, or OMP_NUM_THREADS, or a rank's or a sweep run's
# share), at most this many. The models are small: past one or two threads a step's matrices are too small
# to split, and on a busy machine every extra thread waits for a core (docs/training.md#threads).
AUTO_THREADS_MAX = 1


def is_threads_setting(value) -> bool:
    """Whether `value` is a setting of torch's intra-op threads: 'auto' or an integer >= 1."""
    return value == "auto" or (type(value) is int and value >= 1)


def _check_type(key: str, value):
    """Return value if it suits field `key` (ints are accepted, as floats, for float fields)."""
    kind = _KINDS[key]
    if key == "compile":
        _require(
            value in ("auto", True, False) and type(value) in (str, bool),
            f"compile must be 'auto', True or False, got {value!r}",
        )
    elif key == "threads":
        _require(is_threads_setting(value), f"threads must be 'auto' or an integer >= 1, got {value!r}")
    elif kind is bool:
        _require(isinstance(value, bool), f"{key} must be True or False, got {value!r}")
    elif kind is int:
        _require(isinstance(value, int) and not isinstance(value, bool), f"{key} must be an integer, got {value!r}")
    elif kind is float:
        _require(
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
            f"{key} must be a finite number, got {value!r}",
        )
        return float(value)
    else:
        _require(isinstance(value, str), f"{key} must be a string, got {value!r}")
    return value


_KINDS = {f.name: f.type for f in dataclasses.fields(TrainConfig)}


def _canonical(values: dict, where: str, ignore_legacy: bool) -> dict:
    """Rename legacy keys, drop (or refuse) meaningless ones, reject unknown ones, check types."""
    out = {}
    for key, value in values.items():
        if key in LEGACY_IGNORED:
            _require(ignore_legacy, f"{key} cannot be set in {where}: {LEGACY_IGNORED[key]}")
            continue
        new = LEGACY_RENAMED.get(key, key)
        _require_known(new, key, where)
        value = _check_type(new, value)
        _require(
            out.get(new, value) == value,
            f"{where} sets {new} twice with different values ({out.get(new)!r} and {value!r})",
        )
        out[new] = value
    return out


CONFIG_FILE_RULE = (
    "a config file holds only assignments like n_layer = 2: numbers, strings, True/False, "
    "names assigned above, + - * / // % ** on numbers, + on strings and f-strings of these"
)
_NUMBER_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
# Bounds that keep a line of arithmetic cheap: no int beyond 64 bits, no string beyond 4096 characters.
_MAX_INT_BITS = 64
_MAX_TEXT = 4096


class _Refused(Exception):
    """A config-file construct that is not data: `node` is where, the message says what it is."""

    def __init__(self, node, what):
        super().__init__(what)
        self.lineno = getattr(node, "lineno", None)


def _config_value(node, names):
    """The value of expression `node` of a config file, computing only what CONFIG_FILE_RULE allows."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float, str, bool):
        return _bounded(node, node.value)
    if isinstance(node, ast.Name):
        if node.id not in names:
            raise _Refused(node, f"name {node.id!r} is not assigned earlier in the file")
        return names[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        operand = _config_value(node.operand, names)
        _require_number(node, operand)
        return -operand if isinstance(node.op, ast.USub) else operand
    if isinstance(node, ast.BinOp) and type(node.op) in _NUMBER_OPS:
        return _config_arithmetic(node, _config_value(node.left, names), _config_value(node.right, names))
    if isinstance(node, ast.JoinedStr):
        return _bounded(node, "".join(_fstring_part(part, names) for part in node.values))
    raise _Refused(node, f"{_describe(node)} is not allowed")


def _fstring_part(part, names):
    if isinstance(part, ast.Constant):
        return part.value
    if part.format_spec is not None:
        raise _Refused(part, "a format spec in an f-string is not allowed")
    value = _config_value(part.value, names)
    return repr(value) if part.conversion == ord("r") else str(value)


def _config_arithmetic(node, left, right):
    if isinstance(node.op, ast.Add) and isinstance(left, str) and isinstance(right, str):
        return _bounded(node, left + right)
    _require_number(node, left)
    _require_number(node, right)
    if isinstance(node.op, ast.Pow) and abs(right) > _MAX_INT_BITS:
        raise _Refused(node, f"an exponent beyond {_MAX_INT_BITS} is not allowed")
    try:
        return _bounded(node, _NUMBER_OPS[type(node.op)](left, right))
    except (ArithmeticError, ValueError) as e:
        raise _Refused(node, f"arithmetic error ({e})") from None


def _require_number(node, value):
    if isinstance(value, str):
        raise _Refused(node, f"{_describe(node)} on a string is not allowed")


def _bounded(node, value):
    if isinstance(value, int) and value.bit_length() > _MAX_INT_BITS:
        raise _Refused(node, f"an integer beyond {_MAX_INT_BITS} bits is not allowed")
    if isinstance(value, complex) or (isinstance(value, str) and len(value) > _MAX_TEXT):
        raise _Refused(node, f"a value like {str(value)[:20]!r}... is not allowed")
    return value


def _describe(node) -> str:
    """What a refused construct is, in words a user recognises."""
    words = {
        ast.Import: "import",
        ast.ImportFrom: "import",
        ast.Call: "a call",
        ast.Attribute: "attribute access",
        ast.Subscript: "indexing",
        ast.Lambda: "lambda",
        ast.FunctionDef: "def",
        ast.ClassDef: "class",
        ast.ListComp: "a comprehension",
        ast.SetComp: "a comprehension",
        ast.DictComp: "a comprehension",
        ast.GeneratorExp: "a comprehension",
    }
    if isinstance(node, ast.BinOp):
        return f"operator {type(node.op).__name__}"
    if isinstance(node, ast.Constant):
        return f"a {type(node.value).__name__} literal"
    if isinstance(node, ast.Assign):
        return "assigning to anything but plain names"
    return words.get(type(node), type(node).__name__.lower())


def _config_statement(statement, names):
    """Carry out one top-level statement of a config file into `names` (a docstring does nothing)."""
    if isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant):
        if isinstance(statement.value.value, str):
            return
        raise _Refused(statement, "a bare value, assigned to nothing, is not allowed")
    if isinstance(statement, ast.Assign) and all(isinstance(t, ast.Name) for t in statement.targets):
        value = _config_value(statement.value, names)
        names.update((target.id, value) for target in statement.targets)
        return
    if isinstance(statement, ast.AugAssign) and isinstance(statement.target, ast.Name):
        augmented = ast.BinOp(left=ast.Name(statement.target.id), op=statement.op, right=statement.value)
        names[statement.target.id] = _config_value(ast.copy_location(augmented, statement), names)
        return
    raise _Refused(statement, f"{_describe(statement)} is not allowed")


def _check_block_size(settings: dict, where: str):
    """The seed's files set block_size (its seq_len); it comes from the dataset, so one that disagrees is refused."""
    data_dir = settings.get("data_dir", TrainConfig.data_dir)
    meta = read_json_or_none(Path(data_dir) / "meta.json")
    seq_len = meta.get("seq_len") if meta else None
    block_size = settings["block_size"]
    if isinstance(seq_len, int) and block_size not in (seq_len, seq_len - 1):
        wanted = block_size + 1 if isinstance(block_size, int) else "N"
        raise NanoMarkovError(
            f"{where} sets block_size = {block_size!r}, but the model's context comes from the dataset: "
            f"{data_dir} has seq_len {seq_len}, so block_size is {seq_len - 1}; remove the line, "
            f"or generate data with --seq_len {wanted}"
        )


# A config file is a screenful of assignments; a bigger one is not a config file.
MAX_CONFIG_CHARS = 1 << 16


def load_config_file(path) -> dict:
    """Read a config file of Python assignments and return its settings as a dict.

    The file is data, never run: it is parsed with `ast`, and each statement must
    be an assignment CONFIG_FILE_RULE allows; anything else is refused naming its
    line. Names starting with `_` are helpers, not settings. Seed files work
    unchanged: `train_seed` and `gradient_accumulation_steps` are renamed
    (LEGACY_RENAMED) and `dataset`, `eval_iters`, `vocab_size`, `block_size` are
    dropped (LEGACY_IGNORED), block_size only when it agrees with the dataset.
    """
    path = Path(path)
    where = f"config file {path}"
    try:
        # Room for MAX_CONFIG_CHARS characters of 4 UTF-8 bytes; a longer file is refused unread.
        source = read_capped(path, 4 * MAX_CONFIG_CHARS).decode("utf-8")
    except OSError as e:
        raise NanoMarkovError(f"cannot read {where}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise NanoMarkovError(f"{where} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    if len(source) > MAX_CONFIG_CHARS:
        raise NanoMarkovError(f"{where} has {len(source):,} characters, more than a config file's {MAX_CONFIG_CHARS:,}")
    names = {}
    try:
        tree = ast.parse(source, str(path))
        for statement in tree.body:
            _config_statement(statement, names)
    except SyntaxError as e:
        raise NanoMarkovError(f"{where} line {e.lineno}: syntax error ({e.msg}); {CONFIG_FILE_RULE}") from None
    except _Refused as e:
        raise NanoMarkovError(f"{where} line {e.lineno}: {e}; {CONFIG_FILE_RULE}") from None
    except (RecursionError, MemoryError):  # an expression nested or chained beyond what a parser can hold
        raise NanoMarkovError(f"{where}: an expression too deeply nested to read; {CONFIG_FILE_RULE}") from None
    settings = {name: value for name, value in names.items() if not name.startswith("_")}
    if "block_size" in settings:
        _check_block_size(settings, where)
    return _canonical(settings, where, ignore_legacy=True)


def parse_overrides(args) -> dict:
    """Parse ["--key=value", ...]; values are Python literals, or plain strings for string keys."""
    values = {}
    for arg in args:
        _require(isinstance(arg, str) and arg.startswith("--") and "=" in arg, f"expected --key=value, got {arg!r}")
        key, raw = arg[2:].split("=", 1)
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        if _KINDS.get(LEGACY_RENAMED.get(key, key)) is str and not isinstance(value, str):
            value = raw  # --wandb_run_name=2024 means the string '2024'
        values.update(_canonical({key: value}, "the command-line overrides", ignore_legacy=False))
    return values


def format_config_file(cfg: dict, header: str = "") -> str:
    """Write settings as a config file that load_config_file reads back to the same dict."""
    for key in cfg:
        _require_known(key, key, "format_config_file")
    lines = [line if line.startswith("#") else f"# {line}".rstrip() for line in header.splitlines()]
    for key in FIELDS:
        if key in _SECTIONS:
            lines += ["", f"# {_SECTIONS[key]}"]
        if key in cfg:
            lines.append(f"{key} = {_check_type(key, cfg[key])!r}")
    return "\n".join(lines).lstrip("\n") + "\n"


_SECTIONS = {
    "data_dir": "I/O",
    "n_layer": "Model (vocab_size and block_size come from the dataset)",
    "batch_size": "Training",
    "seed": "System",
}


# ---------------------------------------------------------------------------
# Recipes. Each row applies to chains with up to `max K` states (None: any).

# Ours, measured on a 2-core CPU (benchmarks/train.py, benchmarks/time_to_target.py,
# BENCHMARKS.md). Why this shape:
# - no attention: the best prediction for a first-order chain depends on the current
#   token alone (BOS is a token too). K <= 10: one MLP-only block, which reaches the optimum
#   in seconds and gives the demo and the interpretability examples a block to study.
# - K > 10: zero layers and no position embedding, i.e. the bigram table itself
#   (embedding -> LayerNorm -> head). GPT trains such a model on its vocab x vocab table
#   (model.token_table_forward), so a step costs the same at any batch: MM-100 reaches
#   0.001 nats in under a minute, where the MLP block ended its 2700 steps at 0.0032, at 337 s.
# - n_embd at least K+1: a random chain's logit table needs full rank (a 256-wide
#   model cannot go below 0.125 nats on MM-1000, 512 below 0.025; exact fits of the
#   true table, BENCHMARKS.md).
# - fresh data for K > 10: the default 10k-sequence train split cannot pin down a K x K
#   table (the best estimator from N tokens sits about K^2 / (2N) above the optimum:
#   0.002 nats for MM-100, 0.2 for MM-1000); online sampling costs the step nothing.
# - untied head, no weight decay: the logit table spans several nats (rare transitions),
#   and decay pulls it toward uniform; both measured slightly better.
DEFAULT_COMMON = dict(
    mlp_only=True, mlp_ratio=1, lm_head_tied=False, weight_decay=0.0, grad_accum_steps=1, log_interval=50
)
#                max K  n_layer pos_ape n_embd batch  lr    max_iters warmup eval_interval data_source
DEFAULT_RECIPES = [
    (10, 1, True, 32, 64, 3e-3, 600, 50, 200, "fixed"),
    (100, 0, False, 128, 64, 1e-2, 6000, 50, 1000, "online"),
    (None, 0, False, 1024, 256, 1e-2, 3000, 50, 1000, "online"),
]

# The seed's configs/mm_config.py. Common to all rows: 8 heads, lr 5e-3, warmup 200,
# cosine to min_lr 1e-4 at max_iters, weight decay 0.1, no dropout, no biases, eval every 500.
#               max K  n_layer n_embd batch max_iters
SEED_RECIPES = [(10, 2, 128, 16, 1000), (100, 2, 256, 8, 5000), (1000, 4, 512, 8, 5000), (None, 4, 768, 8, 5000)]

# The seed's train_mm.py set gradient_accumulation_steps = 5 * 8 among its defaults and
# no config file changed it, so every seed run took 40 micro-batches per optimizer step
# (40x the tokens its batch_size suggests). Here that is written out.
SEED_GRAD_ACCUM = 40

# The seed's configs/mm_config_extra.py ablations, written on MM-100 (n_embd 101 there
# is the vocabulary, K+1, which one_hot_embed needs; None below means K+1). Common:
# batch 8, lr 5e-3, warmup 400, cosine to min_lr 1e-4 at max_iters, 40x accumulation.
# Where that file's help text, its descriptions and its settings disagree, the
# descriptions win: its c10 is "c9 + identity first matrix" but kept LayerNorm on,
# while c9 and c12 (= c10 + MLP-only) have it off, so c10 here has use_ln=False.
# The seed tied the head by default; with one_hot_embed that made the head the frozen
# one-hot table (logits = first K+1 residual coordinates), kept here as lm_head_tied=True.
EXTRA = {
    "c1": dict(n_layer=1, n_head=2, n_embd=256, max_iters=3000),
    "c2": dict(n_layer=1, n_head=1, n_embd=128, max_iters=3000, mlp_filter="RELU"),
    "c3": dict(n_layer=1, n_head=1, n_embd=None, max_iters=5000, mlp_filter="RELU", one_hot_embed=True),
}
EXTRA["c4"] = {**EXTRA["c3"], "mlp_ratio": 1}
EXTRA["c5"] = {**EXTRA["c3"], "mlp_only": True}
EXTRA["c6"] = {**EXTRA["c4"], "mlp_only": True, "mlp_filter": "GELU"}
EXTRA["c7"] = {**EXTRA["c4"], "pos_ape": False}
EXTRA["c8"] = {**EXTRA["c4"], "use_ln": False}
EXTRA["c9"] = {**EXTRA["c8"], "pos_ape": False}
EXTRA["c10"] = {**EXTRA["c9"], "mlp_first_matrix_identity": True}
EXTRA["c11"] = {**EXTRA["c9"], "mlp_only": True}
EXTRA["c12"] = {**EXTRA["c10"], "mlp_only": True}

PRESETS = ("default", "seed", *EXTRA)


def process_recipe(process):
    """The default recipe's changes for a process: its class's RECIPE (so a process registered
    later, e.g. from NANOMARKOV_PROCESSES, has its own)."""
    return dict(process_class(process).RECIPE)


def _row(table, n_states):
    return next(row for row in table if row[0] is None or n_states <= row[0])


def mm_id(n_states: int, sparsity: int | None = None) -> str:
    """The seed's name for a chain: '100' or '100-sparse-75'."""
    return f"{n_states}" if sparsity is None else f"{n_states}-sparse-{sparsity}"


def run_folder(name: str, seed: int, chain: str | None = None, dataset: str | None = None) -> str:
    """Where a run of recipe `name` lives under its trainings folder, as 'group/run'; give one of:

    chain, the seed's chain id (mm_id): its names, MM-100/MM-100-42 (preset seed too) and, for
    the ablations, MM-100-extra/MM-100-extra-c4-s42;
    dataset, a dataset folder's name: mess3/mess3-42, and mess3/mess3-c4-42 for another preset.
    """
    _require((chain is None) != (dataset is None), "run_folder needs either chain or dataset, not both")
    if dataset is not None:
        return f"{dataset}/{dataset}-{'' if name == 'default' else name + '-'}{seed}"
    if name in EXTRA:
        return f"MM-{chain}-extra/MM-{chain}-extra-{name}-s{seed}"
    return f"MM-{chain}/MM-{chain}-{seed}"


def check_seed(seed):
    """Refuse a seed that is not a non-negative integer (a recipe's, a grid's)."""
    _require(type(seed) is int and seed >= 0, f"seed must be a non-negative integer, got {seed!r}")


def default_row(n_states: int) -> dict:
    """The default recipe's TrainConfig fields for a chain of K = n_states (DEFAULT_RECIPES' row)."""
    _, n_layer, pos_ape, n_embd, batch, lr, iters, warmup, every, source = _row(DEFAULT_RECIPES, n_states)
    return dict(
        DEFAULT_COMMON,
        n_layer=n_layer,
        n_head=1,
        pos_ape=pos_ape,
        n_embd=n_embd,
        data_source=source,
        batch_size=batch,
        learning_rate=lr,
        min_lr=lr / 100,
        max_iters=iters,
        lr_decay_iters=iters,
        warmup_iters=warmup,
        eval_interval=every,
    )


def preset(name: str, n_states: int, sparsity: int | None = None, seed: int = 42) -> dict:
    """A complete, checked dict of TrainConfig fields for recipe `name` on MM-{n_states}."""
    _require(name in PRESETS, f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    _require(
        isinstance(n_states, int) and not isinstance(n_states, bool) and n_states >= 1,
        f"n_states must be a positive integer, got {n_states!r}",
    )
    _require(
        sparsity is None or (type(sparsity) is int and 0 < sparsity < 100),
        f"sparsity must be an integer percentage in 1..99 (or None: dense), got {sparsity!r}",
    )
    check_seed(seed)
    ident = mm_id(n_states, sparsity)
    cfg = dict(
        data_dir=f"data/mm{ident}",
        out_dir=f"trainings/MM/{run_folder(name, seed, chain=ident)}",
        wandb_run_name=f"MM-{ident}-{seed}",
        seed=seed,
    )
    if name == "default":
        cfg.update(default_row(n_states))
    else:
        if name == "seed":
            _, n_layer, n_embd, batch, iters = _row(SEED_RECIPES, n_states)
            cfg.update(n_layer=n_layer, n_head=8, n_embd=n_embd, batch_size=batch, max_iters=iters, warmup_iters=200)
        else:
            cfg.update(
                EXTRA[name],
                wandb_run_name=f"MM-extra-{name}-s{seed}",
                batch_size=8,
                warmup_iters=400,
            )
            if cfg["n_embd"] is None:
                cfg["n_embd"] = n_states + 1
        cfg.update(
            learning_rate=5e-3,
            min_lr=1e-4,
            lr_decay_iters=cfg["max_iters"],
            weight_decay=0.1,
            grad_accum_steps=SEED_GRAD_ACCUM,
            eval_interval=500,
            log_interval=10,
            compile=False,
            dropout=0.0,
            bias=False,
        )
    return TrainConfig.from_dict(cfg, f"preset {name}").to_dict()


def parse_mm_id(text: str) -> tuple:
    """'100' -> (100, None); '100-sparse-75' -> (100, 75)."""
    head, sep, tail = str(text).partition("-sparse-")
    _require(
        head.isdigit() and (not sep or tail.isdigit()), f"chain id must look like 100 or 100-sparse-75, got {text!r}"
    )
    return int(head), (int(tail) if sep else None)


def dataset_preset(name: str, data_dir, seed: int = 42) -> dict:
    """Recipe `name` for the dataset folder `data_dir`, whatever its process.

    K and the process come from its meta.json; the default recipe takes the
    process's RECIPE. Runs land in trainings/<folder>/<folder>-<seed>
    (another preset: <folder>-<preset>-<seed>, as a sweep names them).
    """
    meta_path = Path(data_dir) / "meta.json"
    try:
        meta = json.loads(read_capped(meta_path))
        n_states, process = meta["n_states"], meta.get("process", DEFAULT_PROCESS)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise NanoMarkovError(f"{meta_path}: not a readable dataset ({e}); create it with nanomarkov generate") from e
    cfg = preset(name, n_states, None, seed)
    if name == "default":
        cfg.update(process_recipe(process))
    run = run_folder(name, seed, dataset=Path(data_dir).resolve().name)
    cfg.update(data_dir=str(data_dir), out_dir=f"trainings/{run}", wandb_run_name=Path(run).name)
    return TrainConfig.from_dict(cfg, f"preset {name} on {data_dir}").to_dict()


def preset_file(name: str, n_states: int, sparsity: int | None = None, seed: int = 42) -> str:
    """The config file of preset `name` on MM-{n_states}, with a header saying what it is."""
    cfg = preset(name, n_states, sparsity, seed)
    if name == "default":
        what = "nanoMarkov's default recipe"
    elif name == "seed":
        what = f"the seed's recipe (configs/mm_config.py, {SEED_GRAD_ACCUM}x gradient accumulation)"
    else:
        switches = ", ".join(f"{k}={cfg[k]!r}" for k in EXTRA[name])
        what = f"the seed's ablation {name}: {switches}"
    header = (
        f"MM-{mm_id(n_states, sparsity)} config, preset {name!r}, seed {seed}: {what}\n"
        f"Train with: nanomarkov train THIS_FILE [--key=value ...]"
    )
    return format_config_file(cfg, header)


# ------------------------------------------------------------------ dynamics' settings
# Here, not in dynamics.py, so that the command line's help shows them without importing torch.

# Val sequences evaluated per snapshot (fewer when sequences x vocabulary would pass EVAL_BATCH_ELEMENTS):
# dozens of snapshots of a small model then take seconds on a CPU.
DEFAULT_VAL_SEQUENCES = 256
# The learning coefficient's estimate (devinterp): its defaults, and which of them are counts (the others are rates).
LLC_DEFAULTS = dict(num_chains=2, num_draws=100, lr=1e-4, n_beta=None, batch_size=16, localization=100.0)
LLC_COUNTS = ("num_chains", "num_draws", "batch_size")
