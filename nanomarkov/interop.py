"""Interop with other tools: chains saved by the seed's generator (pickled hmmlearn models).

The seed (scripts/mm_generate.py) saved each chain as model.pkl, a pickled
hmmlearn CategoricalHMM whose emissions are the identity. Unpickling runs
whatever code the file names, so import_hmmlearn refuses unless the caller
says the file is trusted, and then checks that what came out is such a model
before turning it into a dataset folder with our theory.
"""
import hashlib
import pickle
from pathlib import Path

from nanomarkov import NanoMarkovError
from nanomarkov.chains import MarkovChain
from nanomarkov.data import generate_dataset

UNTRUSTED = (
    "{path}: not loaded: unpickling a file runs arbitrary code that the file names, so a pickle "
    "is only safe if you (or someone you trust) made it; if you did, pass --trust-pickle"
)


def load_hmmlearn_chain(path, trust_pickle=False):
    """The MarkovChain inside a pickled hmmlearn model with identity emissions.

    Without `trust_pickle` the file is not even opened. Anything other than an
    hmmlearn model, or an hmmlearn model that is a real HMM (emissions not the
    identity), raises NanoMarkovError.
    """
    path = Path(path)
    if not trust_pickle:
        raise NanoMarkovError(UNTRUSTED.format(path=path))
    try:
        with open(path, "rb") as f:
            model = pickle.load(f)
    except OSError as e:
        raise NanoMarkovError(f"{path}: cannot be read: {e.strerror or e}") from e
    except ModuleNotFoundError as e:
        raise NanoMarkovError(f"{path}: needs the module {e.name!r} to unpickle; install it (pip install hmmlearn)") from e
    except Exception as e:  # a broken or foreign pickle can raise nearly anything
        raise NanoMarkovError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from e
    module = type(model).__module__ or ""
    if not module.startswith("hmmlearn.") or not all(
            hasattr(model, a) for a in ("transmat_", "startprob_", "emissionprob_")):
        raise NanoMarkovError(
            f"{path}: holds a {module}.{type(model).__qualname__}, not an hmmlearn CategoricalHMM "
            "with transmat_, startprob_ and emissionprob_ (what the seed's generator saved as model.pkl)"
        )
    try:
        return MarkovChain.from_hmmlearn(model)
    except NanoMarkovError as e:
        raise NanoMarkovError(f"{path}: {e}") from e


def import_hmmlearn(path, out_dir, *, trust_pickle=False, train_sequences=10000, val_sequences=1000,
                    seq_len=None, seed=42, force=False, progress=None):
    """Write a dataset folder (chain.npz, train/val, meta.json with theory) for a pickled hmmlearn chain.

    meta.json has process "markov", sparsity and alpha null, and
    source = {"format": "hmmlearn-pickle", "path", "sha256"} naming the file;
    `seed` drives only the sampling. Returns the meta dict.
    """
    chain = load_hmmlearn_chain(path, trust_pickle)
    path = Path(path)
    source = {"format": "hmmlearn-pickle", "path": str(path.resolve()),
              "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    return generate_dataset(out_dir, None, train_sequences, val_sequences, seq_len=seq_len, seed=seed,
                            force=force, progress=progress, chain=chain, source=source)
