"""Fashion-MNIST (and any MNIST-format) gzipped IDX files, parsed with numpy."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from secateur.data.base import DataError, Dataset, Split

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "val_images": "t10k-images-idx3-ubyte.gz",
    "val_labels": "t10k-labels-idx1-ubyte.gz",
}
# IDX type codes (third magic byte) -> numpy big-endian dtypes
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Parse one IDX file (optionally gzipped) into an array of the shape its header declares."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4)
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    offset = 4 + 4 * ndim
    count = int(np.prod(dims)) if ndim else 1
    if len(raw) - offset != count * dtype.itemsize:
        raise DataError(f"{path}: header declares {tuple(dims)} but the payload has "
                        f"{len(raw) - offset} bytes")
    return np.frombuffer(raw, dtype=dtype, offset=offset).reshape(tuple(int(d) for d in dims))


def missing_files(root: str | Path) -> list[str]:
    """Names of the four Fashion-MNIST files absent from `root`."""
    return [name for name in IDX_FILES.values() if not (Path(root) / name).is_file()]


def load_fashion_mnist(root: str | Path = FASHION_MNIST_ROOT) -> Dataset:
    """Fashion-MNIST 60k/10k from the gz IDX files in `root` (Debian dataset-fashion-mnist).

    x: (N, 1, 28, 28) uint8 pixels; y: (N,) int64 in [0, 10).
    """
    missing = missing_files(root)
    if missing:
        raise DataError(f"Fashion-MNIST not found in {root} (missing {', '.join(missing)}); "
                        "install the Debian package dataset-fashion-mnist or set data.root")
    arrays = {key: read_idx(Path(root) / name) for key, name in IDX_FILES.items()}
    xs = [torch.from_numpy(arrays[f"{s}_images"].copy())[:, None] for s in ("train", "val")]
    ys = [torch.from_numpy(arrays[f"{s}_labels"].astype(np.int64)) for s in ("train", "val")]
    return Dataset("fashion_mnist", Split(xs[0], ys[0]), Split(xs[1], ys[1]),
                   num_classes=10, input_shape=(1, 28, 28))
