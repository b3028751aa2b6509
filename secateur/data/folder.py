"""A user's image folders (torchvision ImageFolder layout: root/<class>/<image>), decoded per batch.

Only the file list is built up front; a batch opens, converts, transforms and normalises its own
images, so a folder of any size costs no memory. All randomness of a training batch comes from
its seed, through the CPU generator inside `torch.random.fork_rng`: the process's global RNG is
left as it was and a batch is a pure function of (idx, seed), in any worker process.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from secateur.data.base import DataError, Dataset, holdout, subset_indices

STATS_IMAGES = 512  # training images that estimate the default per-channel mean/std
CHANNEL_MODES = {1: "L", 3: "RGB"}
# PIL modes a folder may keep as they are (channels=None), and how the odd ones are read
_NATIVE_MODES = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}
_READ_AS = {"1": "L", "P": "RGB"}


def _read(path: str, mode: str | None) -> tuple[Tensor, str]:
    """Decode one image as (C, H, W) float32 in [0, 1] in PIL `mode` (None: the file's own mode,
    palette and 1-bit images read as RGB / L). Returns the tensor and the mode it has."""
    from torchvision.transforms.v2 import functional as F

    try:
        with Image.open(path) as im:
            target = mode or _READ_AS.get(im.mode, im.mode)
            if target not in _NATIVE_MODES:
                raise DataError(f"{path}: image mode {im.mode} is not supported; set channels to 1 or 3")
            im = im.convert(target) if im.mode != target else im
            pixels = F.pil_to_tensor(im)
    except OSError as e:
        raise DataError(f"{path}: cannot read the image ({e})") from None
    return F.to_dtype(pixels, torch.float32, scale=True), target


class ImageFolderSplit:
    """Images listed as (path, label), decoded and transformed when a batch asks for them.

    batch(idx, seed) -> (x (B, C, H, W) float32 normalised, y (B,) int64). With augment and a seed,
    each image gets RandomResizedCrop(scale 0.8-1) + RandomHorizontalFlip drawn from that seed;
    with seed None (or no augment) every image is resized (shorter side) and centre-cropped.
    Raises DataError when an image's mode or (without image_size) size differs from the folder's.
    """

    def __init__(self, samples: list[tuple[str, int]], mode: str, image_size: int | None,
                 native_size: tuple[int, int] | None, mean: list[float], std: list[float],
                 augment: bool) -> None:
        from torchvision.transforms import v2 as T

        self.samples, self.mode = samples, mode
        self.image_size, self.native_size = image_size, native_size
        size = image_size or native_size
        self.eval_tf = (T.Compose([T.Resize(image_size, antialias=True), T.CenterCrop(image_size)])
                        if image_size else T.Identity())
        self.train_tf = T.Compose([T.RandomResizedCrop(size, scale=(0.8, 1.0), antialias=True),
                                   T.RandomHorizontalFlip()]) if augment else None
        self.normalize = T.Normalize(mean, std)

    def __len__(self) -> int:
        return len(self.samples)

    def image(self, i: int) -> Tensor:
        """Sample i decoded, checked and in [0, 1], before any transform: (C, h, w) float32."""
        path = self.samples[i][0]
        x, mode = _read(path, self.mode)
        if mode != self.mode:
            raise DataError(f"{path} has image mode {mode}, other images {self.mode}: "
                            "set channels to 1 or 3 to convert them all")
        if self.image_size is None and tuple(x.shape[1:]) != self.native_size:
            h, w = self.native_size
            raise DataError(f"{path} is {x.shape[2]}x{x.shape[1]}, other images {w}x{h}: "
                            "set image_size to resize them")
        return x

    def batch(self, idx: Tensor, seed: int | None = None) -> tuple[Tensor, Tensor]:
        rows = [int(i) for i in idx]
        y = torch.tensor([self.samples[i][1] for i in rows], dtype=torch.int64)
        if self.train_tf is None or seed is None:
            xs = [self.eval_tf(self.image(i)) for i in rows]
        else:
            with torch.random.fork_rng(devices=[]):
                # the CPU generator only: torch.manual_seed would also reseed CUDA's
                torch.default_generator.manual_seed(int(seed))
                xs = [self.train_tf(self.image(i)) for i in rows]
        return self.normalize(torch.stack(xs)), y


def _list_images(root: str, classes: list[str] | None) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names and (path, label) of an ImageFolder tree; `classes` given: root's class folders
    must be among them (a validation folder). Raises DataError for an absent folder, no class
    folder, or a class folder with no image."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    if not Path(root).is_dir():
        raise DataError(f"image folder {root} does not exist")
    found = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not found:
        raise DataError(f"image folder {root} has no class folders (expected root/<class>/<image>)")
    if classes is None:
        classes = found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DataError(f"{root} has classes absent from the training folder: {', '.join(unknown)}")
    samples = make_dataset(root, {c: i for i, c in enumerate(classes)}, IMG_EXTENSIONS, allow_empty=True)
    counts = np.bincount([label for _, label in samples], minlength=len(classes))
    empty = [c for c in found if counts[classes.index(c)] == 0]
    if empty:
        raise DataError(f"class folder {Path(root) / empty[0]} has no images "
                        f"({', '.join(IMG_EXTENSIONS)})")
    return classes, samples


def _channel_stats(split: ImageFolderSplit, rows: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std over all pixels of split's images `rows`, resized like val."""
    total = total_sq = 0.0
    pixels = 0
    for i in rows:
        x = split.eval_tf(split.image(int(i))).double()
        total = total + x.sum(dim=(1, 2))
        total_sq = total_sq + (x * x).sum(dim=(1, 2))
        pixels += x.shape[1] * x.shape[2]
    mean = total / pixels
    return mean.tolist(), (total_sq / pixels - mean**2).clamp_min(1e-12).sqrt().tolist()


def load_image_folder(root: str, val_root: str | None = None, val_fraction: float = 0.1,
                      image_size: int | None = None, channels: int | None = None,
                      mean: list[float] | None = None, std: list[float] | None = None,
                      augment: bool = False, seed: int = 0) -> Dataset:
    """Classification data from image files laid out as root/<class>/<image> (class = folder name).

    val_root: a folder of the same layout for validation; None holds out a seeded `val_fraction`
    of root. image_size: resize the shorter side and centre-crop to a square (None: keep the
    files' size, which must then be the same for all). channels: 1 (grayscale) or 3 (RGB);
    None keeps the files' mode (L, LA, RGB or RGBA), which must be the same for all.
    mean / std: per-channel normalisation; None computes them from up to 512 training images
    (a seeded sample, resized like validation). augment: RandomResizedCrop + horizontal flip on
    training batches that get a seed.

    Returns Dataset(name="image_folder", task="classification", input_shape=(C, H, W),
    num_classes=len(classes), meta={"classes", "mean", "std", "root", "val_root"}); batches are
    x (B, C, H, W) float32, y (B,) int64. Raises DataError (one line) for a missing folder, no
    images, a class without images, mixed sizes without image_size, mixed modes without
    channels, or a bad channels/mean/std value.
    """
    if channels is not None and channels not in CHANNEL_MODES:
        raise DataError(f"channels must be 1 (grayscale), 3 (RGB) or None, got {channels}")
    if image_size is not None and image_size < 1:
        raise DataError(f"image_size must be a positive number of pixels, got {image_size}")
    classes, samples = _list_images(root, None)
    if val_root is None:
        train_rows, val_rows = holdout(len(samples), val_fraction, seed, f"image folder {root}")
        train, val = [samples[i] for i in train_rows], [samples[i] for i in val_rows]
    else:
        train, (_, val) = samples, _list_images(val_root, classes)

    # the folder's mode and size, from a seeded sample that also gives the default statistics
    stats_rows = np.sort(subset_indices(len(train), min(STATS_IMAGES, len(train)), seed))
    first, mode = _read(train[stats_rows[0]][0], CHANNEL_MODES.get(channels))
    native = tuple(first.shape[1:])
    c = first.shape[0]
    for name, values in (("mean", mean), ("std", std)):
        if values is not None and len(values) != c:
            raise DataError(f"{name} has {len(values)} values for images with {c} channels")
    if mean is None or std is None:
        probe = ImageFolderSplit(train, mode, image_size, native, [0.0] * c, [1.0] * c, False)
        sample_mean, sample_std = _channel_stats(probe, stats_rows)
        mean = sample_mean if mean is None else mean
        std = sample_std if std is None else std
    if min(std) <= 0:
        raise DataError(f"std must be positive, got {std}")

    hw = (image_size, image_size) if image_size else native
    return Dataset(
        "image_folder",
        ImageFolderSplit(train, mode, image_size, native, mean, std, augment),
        ImageFolderSplit(val, mode, image_size, native, mean, std, False),
        num_classes=len(classes), input_shape=(c, *hw), task="classification",
        meta={"classes": classes, "mean": list(mean), "std": list(std), "root": str(root),
              "val_root": None if val_root is None else str(val_root)})
