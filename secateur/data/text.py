"""Character-level language-modelling corpora: any UTF-8 file, or the King James Bible."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import torch

from secateur.data.base import DataError, Dataset, Split

KJV_DATA = "/usr/lib/bible.data"
_VERSE_REF = re.compile(r"^\S+?\d+:\d+ ", re.MULTILINE)


def kjv_available() -> bool:
    """True when Debian's bible-kjv (the `bible` program) and bible-kjv-text are installed."""
    return shutil.which("bible") is not None and Path(KJV_DATA).is_file()


def kjv_text() -> str:
    """The whole King James Bible as plain text, one verse per line, verse references stripped."""
    if not kjv_available():
        raise DataError("the KJV corpus needs the Debian packages bible-kjv and bible-kjv-text; "
                        "install them or set data.path to a text file")
    out = subprocess.run(["bible", "-f", "-p", str(Path(KJV_DATA).parent), "Gen1:1-Rev22:21"],
                         capture_output=True, text=True, check=True).stdout
    return _VERSE_REF.sub("", out)


def encode(text: str) -> tuple[torch.Tensor, str]:
    """Map characters to ids in sorted-vocabulary order. Returns (ids (L,) int64, vocab string)."""
    vocab = "".join(sorted(set(text)))
    lut = {c: i for i, c in enumerate(vocab)}
    return torch.tensor([lut[c] for c in text], dtype=torch.int64), vocab


def windows(ids: torch.Tensor, block_size: int) -> Split:
    """Non-overlapping windows: x (N, T) and y = x shifted by one character (N, T)."""
    n = (len(ids) - 1) // block_size
    if n < 1:
        raise DataError(f"text of {len(ids)} characters is shorter than block_size {block_size} + 1")
    x = ids[: n * block_size].view(n, block_size)
    y = ids[1: n * block_size + 1].view(n, block_size)
    return Split(x.clone(), y.clone())


def load_text(path: str | Path | None, block_size: int = 64, val_fraction: float = 0.1) -> Dataset:
    """A char-level corpus from `path` (UTF-8), or the KJV when `path` is None or "kjv".

    The last `val_fraction` of the characters is the validation split. x/y: (N, block_size) int64.
    """
    if path is None or str(path) == "kjv":
        text, name = kjv_text(), "kjv"
    else:
        if not Path(path).is_file():
            raise DataError(f"text corpus {path} does not exist")
        text, name = Path(path).read_text(encoding="utf-8"), Path(path).name
    ids, vocab = encode(text)
    cut = int(len(ids) * (1.0 - val_fraction))
    return Dataset(f"text:{name}", windows(ids[:cut], block_size), windows(ids[cut:], block_size),
                   num_classes=len(vocab), input_shape=(block_size,), task="lm",
                   meta={"vocab": vocab})
