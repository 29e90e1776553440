"""Batches of (B, T+1) token windows from memory-mapped shards.

Training batches are sampled: batch number `p` draws the starts of the whole global batch
(B * world_size windows) from `np.random.default_rng([seed, p])`, and rank r keeps rows
[r*B, (r+1)*B). So a batch depends only on (seed, position): resuming needs only the position,
and 2 ranks with B=4 see exactly the windows 1 rank with B=8 sees.

Validation walks the split once in non-overlapping windows (stride T), rank r taking every
world_size-th batch, so every token is scored once whatever the number of ranks.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from lmforge.data.shards import ShardDataset


class TokenLoader:
    """`next(loader)` -> (B, T+1) long tensor; inputs are [:, :-1], targets [:, 1:].

    Example:
        loader = TokenLoader(ShardDataset("shards", "train"), batch_size=8, seq_len=256, seed=0)
        batch = next(loader)                     # torch.Size([8, 257])
        state = loader.state_dict()              # {"position": 1, ...}; load_state_dict(state) resumes
    """

    def __init__(self, dataset: ShardDataset, batch_size: int, seq_len: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.dataset, self.batch_size, self.seq_len, self.seed = dataset, batch_size, seq_len, seed
        self.rank, self.world_size = rank, world_size
        self.position = 0  # number of global batches drawn so far
        global_batch = batch_size * world_size
        need = global_batch * seq_len + 1
        if dataset.count < need:
            raise ValueError(
                f"{dataset.path} ({dataset.split}): {dataset.count} tokens is smaller than one batch "
                f"({global_batch} sequences x {seq_len} tokens + 1 = {need}); use more data or a smaller --batch-size/--seq-len"
            )
        self._n_starts = dataset.n_starts(seq_len + 1)
        self._total_starts = sum(self._n_starts)
        if self._total_starts == 0:  # every shard file shorter than one window
            raise ValueError(f"{dataset.path} ({dataset.split}): no shard file holds a window of {seq_len + 1} tokens")

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, self.position])
        starts = rng.integers(0, self._total_starts, size=self.batch_size * self.world_size)
        mine = starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        self.position += 1
        rows = [self.dataset.window(int(s), self.seq_len + 1, self._n_starts) for s in mine]
        return torch.from_numpy(np.stack(rows).astype(np.int64))  # (B, T+1)

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "batch_size": self.batch_size, "seq_len": self.seq_len, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "batch_size", "seq_len", "world_size"):
            if state[key] != getattr(self, key):
                raise ValueError(f"cannot resume the data position: {key} was {state[key]}, now {getattr(self, key)}")
        self.position = int(state["position"])


def eval_batches(dataset: ShardDataset, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1, max_windows: int | None = None) -> Iterator[torch.Tensor]:
    """This rank's share of one pass over `dataset` in non-overlapping (<=B, T+1) windows.

    Windows start every T tokens within each shard file (the last token of one window is the
    first input of the next), so the pass scores each token once. `max_windows` caps the pass at
    the first windows of the split, whatever the number of ranks. A split shorter than one window
    yields one shorter window.
    """
    T = seq_len if dataset.count > seq_len else max(dataset.count - 1, 1)
    starts = [(i, s) for i, f in enumerate(dataset.files) for s in range(0, len(f) - T, T)]
    starts = starts[:max_windows]
    n_global = (len(starts) + batch_size - 1) // batch_size
    for b in range(rank, n_global, world_size):
        rows = [np.asarray(dataset.files[i][s : s + T + 1]) for i, s in starts[b * batch_size : (b + 1) * batch_size]]
        yield torch.from_numpy(np.stack(rows).astype(np.int64))
