"""The split protocol, in-memory datasets and the deterministic, shardable batch order."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Union

import numpy as np
import torch
from torch import Tensor


class DataError(ValueError):
    """A dataset is missing or malformed (reported as a one-line config error by the CLI)."""


Inputs = Union[Tensor, "dict[str, Tensor]"]
IGNORE_INDEX = -100  # targets equal to this are ignored by the loss


class BatchSplit(Protocol):
    """What the trainer needs of a split: its length and one batch as a pure function of (idx, seed).

    batch(idx, seed): idx is a LongTensor (B,) of row numbers; seed drives every random choice of
    that batch (augmentation, masking), None meaning none (evaluation). Returns (x, y): x a Tensor
    or a dict of keyword inputs of a Hugging Face model, y a LongTensor whose IGNORE_INDEX entries
    the loss skips.
    """

    def __len__(self) -> int: ...

    def batch(self, idx: Tensor, seed: int | None = None) -> tuple[Inputs, Tensor]: ...


@dataclass
class Split:
    """One split held in memory.

    x: (N, C, H, W) images (raw from a loader, float32 standardised by load_dataset), or (N, T) int64 token windows for language modelling.
    y: (N,) int64 class labels, or (N, T) int64 next-token targets.
    """

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def batch(self, idx: Tensor, seed: int | None = None) -> tuple[Tensor, Tensor]:
        """Rows `idx` (LongTensor (B,)) of x and y; `seed` is accepted and ignored (no randomness)."""
        return self.x[idx], self.y[idx]


@dataclass
class Dataset:
    """A train/val pair plus what a model needs to know about it.

    task: "classification" (logits (B, num_classes)), "lm" (next-token logits (B, T, num_classes))
    or "mlm" (masked-token logits (B, T, num_classes)).
    train / val: a `Split` in memory or any other `BatchSplit` (files decoded per batch).
    input_shape: shape of one x row; num_classes: classes or vocabulary size.
    """

    name: str
    train: BatchSplit
    val: BatchSplit
    num_classes: int
    input_shape: tuple[int, ...]
    task: str = "classification"
    meta: dict = field(default_factory=dict)


def subset_indices(n: int, k: int | None, seed: int) -> np.ndarray:
    """First `k` of a seeded permutation of range(n) (all of them, permuted, when k is None).

    Deterministic for a given (n, k, seed), so a subset is the same in every process.
    """
    if k is not None and not 0 < k <= n:
        raise DataError(f"subset size {k} must be in [1, {n}] (the split has {n} items)")
    perm = np.random.default_rng(seed).permutation(n)
    return perm if k is None else perm[:k]


class Rows:
    """Rows `idx` of a split that is not held in memory (an image folder): batch(i) reads row
    idx[i] of the underlying split."""

    def __init__(self, split: "BatchSplit", idx: Tensor) -> None:
        self.split, self.idx = split, idx

    def __len__(self) -> int:
        return int(self.idx.numel())

    def batch(self, idx: Tensor, seed: int | None = None):
        return self.split.batch(self.idx[idx], seed)


def take(split: "BatchSplit", k: int | None, seed: int) -> "BatchSplit":
    """A deterministic random subset of `k` rows of `split` (sorted, so the order is the file's)."""
    if k is None:
        return split
    idx = torch.from_numpy(np.sort(subset_indices(len(split), k, seed)))
    if isinstance(split, Split) and not isinstance(split.x, dict):
        return Split(split.x[idx], split.y[idx])
    return Rows(split, idx)


def standardize(train: Tensor, *others: Tensor) -> list[Tensor]:
    """Float32 images with zero mean / unit variance per channel, using the train statistics.

    train: (N, C, H, W) any numeric dtype; the same affine map is applied to every tensor in
    `others`.
    """
    train, others = train.float(), [t.float() for t in others]
    mean = train.mean(dim=(0, 2, 3), keepdim=True)
    std = train.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return [(t - mean) / std for t in (train, *others)]


class ShardedOrder:
    """Epoch-wise shuffled sample order, sharded across data-parallel ranks, with an exact position.

    Every rank draws the same permutation for an epoch (seeded by seed and epoch); a global batch
    is `world_size * batch_size` consecutive entries of it and rank r takes its r-th slice, like
    DistributedSampler. An incomplete last global batch is dropped. The position (epoch, cursor)
    is all that is needed to continue the exact sequence after a restart.
    """

    def __init__(self, n: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if n < batch_size * world_size:
            raise DataError(f"the training split has {n} items, fewer than one global batch "
                            f"({world_size} ranks x batch_size {batch_size})")
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.cursor = 0, 0
        self._perm: Tensor | None = None

    def _order(self) -> Tensor:
        if self._perm is None:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
                self._perm = torch.randperm(self.n, generator=g)
            else:
                self._perm = torch.arange(self.n)
        return self._perm

    def next(self) -> Tensor:
        """This rank's indices (LongTensor (batch_size,)) for the next micro-batch."""
        global_batch = self.batch_size * self.world_size
        if self.cursor + global_batch > self.n:
            self.epoch, self.cursor, self._perm = self.epoch + 1, 0, None
        start = self.cursor + self.rank * self.batch_size
        idx = self._order()[start:start + self.batch_size]
        self.cursor += global_batch
        return idx

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor, self._perm = int(state["epoch"]), int(state["cursor"]), None


def shard_range(n: int, rank: int, world_size: int) -> range:
    """Indices of an evaluation split that rank `rank` evaluates (strided, covers all n once)."""
    return range(rank, n, world_size)


def holdout(n: int, fraction: float, seed: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, val) row numbers: a seeded `fraction` of range(n) (at least one) is val.

    Raises DataError when the fraction is outside (0, 1) or leaves no training row; `what` names
    the data in that message.
    """
    if not 0.0 < fraction < 1.0:
        raise DataError(f"{what}: val_fraction must be in (0, 1), got {fraction}")
    k = max(1, round(n * fraction))
    if n - k < 1:
        raise DataError(f"{what}: {n} items are too few to hold out a validation fraction of {fraction}")
    perm = subset_indices(n, None, seed)
    return np.sort(perm[k:]), np.sort(perm[:k])
