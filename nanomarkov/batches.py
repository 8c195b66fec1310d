"""Training batches of whole sequences: from a dataset's train split (FixedSequences, in a seeded
SequenceOrder) or fresh from the process (OnlineSequences, sampled ahead in a thread), each a pure
function of (seed, iteration, slot); to_inputs_targets makes them torch tensors.

Apart from data.py so that what only reads or writes dataset folders (generate, theory) never
imports torch.
"""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch


class SequenceOrder:
    """A seeded, endless order over n sequences: epoch e is its own permutation.

    The order is a pure function of (n_sequences, seed), so the position in it
    (how many sequences were consumed) is all a checkpoint needs to resume the
    data stream exactly.
    """

    def __init__(self, n_sequences, seed):
        self.n_sequences = n_sequences
        self.seed = seed
        self._cached_epoch = None

    def _epoch(self, epoch):
        # Batches walk epochs forward, so one cached permutation serves nearly every call.
        if self._cached_epoch is None or self._cached_epoch[0] != epoch:
            self._cached_epoch = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n_sequences))
        return self._cached_epoch[1]

    def indices(self, start, count):
        """The sequence indices at positions start .. start+count-1 of the order."""
        parts = []
        while count > 0:
            epoch, offset = divmod(start, self.n_sequences)
            take = min(count, self.n_sequences - offset)
            parts.append(self._epoch(epoch)[offset : offset + take])
            start, count = start + take, count - take
        return np.concatenate(parts)


class FixedSequences:
    """Training batches from a dataset's train split, in SequenceOrder.

    Slot s of iteration it (s = micro-batch * world_size + rank) reads the batch_size
    sequences at position it * batch_size * slots + s * batch_size of the order.
    """

    def __init__(self, train, batch_size, slots, seed):
        self.train, self.batch_size, self.slots = train, batch_size, slots
        self.order = SequenceOrder(train.shape[0], seed)

    def batch(self, it, slot):
        start = (it * self.slots + slot) * self.batch_size
        return self.train[self.order.indices(start, self.batch_size)]

    def close(self):
        """Nothing to release (OnlineSequences has a thread to stop)."""


# Iterations per seeded chunk of online data. Part of what an online run's data is: changing it
# changes every online run's sequences (the seed of a chunk is its index).
ONLINE_CHUNK_ITERS = 64
# Mixed into the online stream's seeds, keeping them apart from SequenceOrder's [seed, epoch].
ONLINE_STREAM = 0x6F6E6C69


class OnlineSequences:
    """Fresh training batches sampled from the process itself, an endless seeded stream.

    Slot s's batches (s = micro-batch * world_size + rank) for iterations c*C .. c*C+C-1
    (C = ONLINE_CHUNK_ITERS) are one vectorised `process.sample` of C*batch_size sequences
    from numpy's generator seeded [seed, ONLINE_STREAM, c, s]. So a batch is a pure function
    of (seed, batch_size, iteration, slot): a resume samples its chunk again and continues
    bit-identically; micro-batches and ranks get distinct sequences; and the global batch is
    the same however its slots are split between accumulation and ranks. A background thread
    samples the next chunk while this one is trained on; `close()` stops it.
    """

    def __init__(self, process, seq_len, batch_size, slots, seed, my_slots=None):
        self.process, self.seq_len, self.batch_size, self.seed = process, seq_len, batch_size, seed
        self.my_slots = tuple(range(slots) if my_slots is None else my_slots)
        self.chunk, self.sequences = None, {}
        self.ahead = None  # (chunk index, future of its sequences)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="online-data")

    def sample_chunk(self, chunk):
        """{slot: (C * batch_size, seq_len) tokens} of one chunk, for this process's slots."""
        count = ONLINE_CHUNK_ITERS * self.batch_size
        # Row-major, as the train split is (a process may return a transposed view: its loop runs over positions).
        return {
            slot: np.ascontiguousarray(
                self.process.sample(count, self.seq_len, np.random.default_rng([self.seed, ONLINE_STREAM, chunk, slot]))
            )
            for slot in self.my_slots
        }

    def batch(self, it, slot):
        chunk, row = divmod(it, ONLINE_CHUNK_ITERS)
        if chunk != self.chunk:
            ahead = self.ahead
            self.sequences = ahead[1].result() if ahead and ahead[0] == chunk else self.sample_chunk(chunk)
            self.chunk = chunk
            self.ahead = (chunk + 1, self.executor.submit(self.sample_chunk, chunk + 1))
        return self.sequences[slot][row * self.batch_size : (row + 1) * self.batch_size]

    def close(self):
        self.executor.shutdown(wait=True, cancel_futures=True)


def to_inputs_targets(sequences, device="cpu"):
    """(x, y) int64 tensors from whole sequences: x = seq[:-1], y = seq[1:]."""
    sequences = torch.from_numpy(np.asarray(sequences, dtype=np.int64))
    x, y = sequences[:, :-1], sequences[:, 1:]
    if device != "cpu":
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    return x, y


def whole_split_batches(tokens, batch_size):
    """Consecutive batches of whole sequences covering a split once, in order."""
    for lo in range(0, tokens.shape[0], batch_size):
        yield np.asarray(tokens[lo : lo + batch_size])
