"""Batches of a split fetched by DataLoader workers, in `ShardedOrder`'s sequence, resumable exactly.

The order decides which rows and the batch seed (a hash of seed, epoch and the batch's place in
the epoch's permutation) decides every random choice, so a batch is the same whether it is built
in this process or in a worker, and the stream's position is the position of the batches handed
out, not of those the workers prefetched.
"""
from __future__ import annotations

import copy
import functools
from typing import Callable, Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset as TorchDataset, Sampler

from secateur.data.base import BatchSplit, Inputs, ShardedOrder


def batch_seed(seed: int, epoch: int, start: int) -> int:
    """Seed (0 <= s < 2**63) of the batch that begins at `start` of epoch `epoch`'s permutation."""
    words = [int(v) & 0xFFFFFFFFFFFFFFFF for v in (seed, epoch, start)]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> np.uint64(1))


def _draw(order: ShardedOrder, seed: int) -> tuple[Tensor, int]:
    """Advance `order` by one micro-batch: (its row numbers (B,), its batch seed)."""
    idx = order.next()
    start = order.cursor - order.batch_size * order.world_size + order.rank * order.batch_size
    return idx, batch_seed(seed, order.epoch, start)


class _OrderSampler(Sampler):
    """Endless (idx, batch seed) from a copy of the order, taken when iteration starts."""

    def __init__(self, order: ShardedOrder, seed: int) -> None:
        self.order, self.seed = order, seed

    def __iter__(self) -> Iterator[tuple[Tensor, int]]:
        order = copy.deepcopy(self.order)
        while True:
            yield _draw(order, self.seed)


class _SplitBatches(TorchDataset):
    """Map-style view of a split whose items are whole batches: item (idx, seed) -> split.batch."""

    def __init__(self, split: BatchSplit) -> None:
        self.split = split

    def __getitem__(self, item: tuple[Tensor, int]) -> tuple[Inputs, Tensor]:
        idx, seed = item
        return self.split.batch(idx, seed)


def _as_is(batch):
    return batch


def _one_thread(worker_id: int, extra: Callable[[], None] | None = None) -> None:
    import signal

    torch.set_num_threads(1)  # each worker on one core instead of all of them
    # Ctrl-C or a scheduler's SIGTERM reaches the whole process group: the workers leave stopping
    # to the main process (it finishes the step, checkpoints, then shuts them down)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if extra is not None:
        extra()


class BatchStream:
    """This rank's micro-batches of `split`, in the sequence of `order`, fetched by worker processes.

    next() -> (x, y): the next micro-batch (the split's batch(idx, batch_seed)); `order` is
    advanced as batches are handed out, so it always holds the consumed position.
    state_dict() / load_state_dict(): that position; loading it discards what the workers had
    prefetched and continues exactly as an uninterrupted stream would. num_workers=0 builds
    batches in this process, with identical results. The process's global RNG is not consumed.
    """

    def __init__(self, split: BatchSplit, order: ShardedOrder, num_workers: int = 0, seed: int = 0,
                 prefetch_factor: int = 2, worker_init: Callable[[], None] | None = None) -> None:
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if len(split) != order.n:
            raise ValueError(f"the order covers {order.n} rows but the split has {len(split)}")
        self.split, self.order, self.seed = split, order, seed
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.worker_init = worker_init        # also run in each worker after fork
        self._it: Iterator | None = None

    def _start(self) -> Iterator:
        workers = self.num_workers > 0
        loader = DataLoader(
            _SplitBatches(self.split), batch_size=None, sampler=_OrderSampler(self.order, self.seed),
            num_workers=self.num_workers, collate_fn=_as_is, persistent_workers=False,
            prefetch_factor=self.prefetch_factor if workers else None,
            worker_init_fn=functools.partial(_one_thread, extra=self.worker_init) if workers else None,
            # DataLoader draws its workers' base seed from this, not from the global RNG
            generator=torch.Generator().manual_seed(self.seed))
        return iter(loader)

    def next(self) -> tuple[Inputs, Tensor]:
        """The next micro-batch (x, y) of this rank."""
        if self._it is None:
            self._it = self._start()
        batch = next(self._it)
        self.order.next()
        return batch

    def __iter__(self) -> Iterator[tuple[Inputs, Tensor]]:
        while True:
            yield self.next()

    def state_dict(self) -> dict:
        """The position after the last batch next() returned: {"epoch", "cursor", "seed"}."""
        return {**self.order.state_dict(), "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Continue after the batch at which `state` was taken (the workers restart)."""
        self.close()
        self.order.load_state_dict(state)
        self.seed = int(state.get("seed", self.seed))

    def close(self) -> None:
        """Stop the workers (the next call to next() starts them again)."""
        it, self._it = getattr(self, "_it", None), None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    def __enter__(self) -> "BatchStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
