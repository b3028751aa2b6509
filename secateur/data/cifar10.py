"""CIFAR-10 from a user-supplied local copy of the standard python-pickle batches."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from secateur.data.base import DataError, Dataset, Split

BATCH_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def find_root(root: str | Path) -> Path | None:
    """`root` or its `cifar-10-batches-py` subfolder, whichever holds all six batch files."""
    for cand in (Path(root), Path(root) / "cifar-10-batches-py"):
        if all((cand / name).is_file() for name in BATCH_FILES):
            return cand
    return None


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="bytes")
    data = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return data, np.asarray(d[b"labels"], dtype=np.int64)


def load_cifar10(root: str | Path) -> Dataset:
    """CIFAR-10 50k/10k from `root` (the folder with data_batch_1..5 and test_batch).

    Nothing is downloaded: the files must already be there. x: (N, 3, 32, 32) uint8; y: (N,) int64 in [0, 10).
    """
    found = find_root(root)
    if found is None:
        raise DataError(f"CIFAR-10 not found in {root}: expected the python-pickle batches "
                        f"({', '.join(BATCH_FILES)}) there or in {root}/cifar-10-batches-py; "
                        "secateur cannot download them")
    parts = [_read_batch(found / name) for name in BATCH_FILES]
    x_train = torch.from_numpy(np.concatenate([p[0] for p in parts[:5]]))
    y_train = torch.from_numpy(np.concatenate([p[1] for p in parts[:5]]))
    x_val = torch.from_numpy(parts[5][0])
    return Dataset("cifar10", Split(x_train, y_train), Split(x_val, torch.from_numpy(parts[5][1])),
                   num_classes=10, input_shape=(3, 32, 32))
