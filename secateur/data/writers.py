"""Real data written once as ordinary files, so that the bring-your-own-data readers can be tried
on it: Fashion-MNIST as PNG folders, the King James Bible as text and verse-classification rows.

Each writer builds its tree in a hidden sibling folder and renames it into place at the end, so
an interrupted run leaves no half-written out_dir.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Callable

import numpy as np

from secateur.data.base import DataError, subset_indices
from secateur.data.idx import FASHION_MNIST_ROOT, IDX_FILES, missing_files, read_idx
from secateur.data.text import KJV_DATA, kjv_available

FASHION_MNIST_CLASSES = ["T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle_boot"]
# the 66 books in the order the `bible` program prints them (it prints abbreviations)
KJV_BOOKS = [
    "Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua", "Judges", "Ruth",
    "1 Samuel", "2 Samuel", "1 Kings", "2 Kings", "1 Chronicles", "2 Chronicles", "Ezra",
    "Nehemiah", "Esther", "Job", "Psalms", "Proverbs", "Ecclesiastes", "Song of Solomon", "Isaiah",
    "Jeremiah", "Lamentations", "Ezekiel", "Daniel", "Hosea", "Joel", "Amos", "Obadiah", "Jonah",
    "Micah", "Nahum", "Habakkuk", "Zephaniah", "Haggai", "Zechariah", "Malachi",
    "Matthew", "Mark", "Luke", "John", "Acts", "Romans", "1 Corinthians", "2 Corinthians",
    "Galatians", "Ephesians", "Philippians", "Colossians", "1 Thessalonians", "2 Thessalonians",
    "1 Timothy", "2 Timothy", "Titus", "Philemon", "Hebrews", "James", "1 Peter", "2 Peter",
    "1 John", "2 John", "3 John", "Jude", "Revelation"]
# many verses each, and distinct styles: narrative, poetry, wisdom, prophecy, gospel, history,
# letter, apocalypse
DEFAULT_BOOKS = ["Genesis", "Psalms", "Proverbs", "Isaiah", "Matthew", "Acts", "Romans", "Revelation"]
_REFERENCED_VERSE = re.compile(r"^(\S+?)\d+:\d+ (.*)$")


def _write_tree(out_dir: str, fill: Callable[[Path], dict]) -> dict:
    """Run fill(tmp) on a fresh folder beside out_dir, then move it to out_dir. Returns fill's result.

    DataError when out_dir exists and is not an empty folder.
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out} exists and is not an empty folder; choose a new out_dir")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted run of this same process id
    tmp.mkdir()
    try:
        result = fill(tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def write_fashion_mnist_png(out_dir: str, root: str = FASHION_MNIST_ROOT,
                            train_limit: int | None = None, val_limit: int | None = None) -> dict:
    """Fashion-MNIST as grayscale 28x28 PNGs: out_dir/{train,val}/<class name>/<index>.png.

    val is the official test split; <index> (5 digits) is the image's row in its IDX file.
    train_limit / val_limit keep the first N of a seeded permutation of a split (seeds 0 / 1).
    Returns {"train": count, "val": count, "classes": [class names in label order]}.
    Raises DataError when the IDX files are missing from root, a limit is out of range, or
    out_dir exists and is not empty.
    """
    from PIL import Image

    missing = missing_files(root)
    if missing:
        raise DataError(f"Fashion-MNIST not found in {root} (missing {', '.join(missing)}); "
                        "install the Debian package dataset-fashion-mnist")
    picks = {}
    for seed, (split, limit) in enumerate((("train", train_limit), ("val", val_limit))):
        images = read_idx(Path(root) / IDX_FILES[f"{split}_images"])
        labels = read_idx(Path(root) / IDX_FILES[f"{split}_labels"])
        rows = np.arange(len(images)) if limit is None else np.sort(subset_indices(len(images), limit, seed))
        picks[split] = (images, labels, rows)

    def fill(tmp: Path) -> dict:
        counts = {}
        for split, (images, labels, rows) in picks.items():
            for name in FASHION_MNIST_CLASSES:
                (tmp / split / name).mkdir(parents=True)
            for i in rows:
                path = tmp / split / FASHION_MNIST_CLASSES[labels[i]] / f"{i:05d}.png"
                Image.fromarray(np.ascontiguousarray(images[i])).save(path)
            counts[split] = len(rows)
        return {**counts, "classes": list(FASHION_MNIST_CLASSES)}

    return _write_tree(out_dir, fill)


def kjv_verses() -> list[tuple[str, str]]:
    """Every verse of the King James Bible in order, as (full book name, verse text).

    Raises DataError when the Debian packages bible-kjv and bible-kjv-text are not installed.
    """
    if not kjv_available():
        raise DataError("the KJV corpus needs the Debian packages bible-kjv and bible-kjv-text")
    out = subprocess.run(["bible", "-f", "-p", str(Path(KJV_DATA).parent), "Gen1:1-Rev22:21"],
                         capture_output=True, text=True, check=True).stdout
    verses, abbreviations = [], []
    for line in out.splitlines():
        m = _REFERENCED_VERSE.match(line)
        if m is None:
            continue
        if not abbreviations or abbreviations[-1] != m.group(1):
            abbreviations.append(m.group(1))
        verses.append((len(abbreviations) - 1, m.group(2).strip()))
    if len(abbreviations) != len(KJV_BOOKS):
        raise DataError(f"the bible program printed {len(abbreviations)} books, expected {len(KJV_BOOKS)}")
    return [(KJV_BOOKS[b], text) for b, text in verses]


def _book_names(books: list[str]) -> list[str]:
    """Canonical names for `books` (matched ignoring case); DataError for an unknown one."""
    canonical = {b.lower(): b for b in KJV_BOOKS}
    unknown = [b for b in books if b.lower() not in canonical]
    if unknown:
        raise DataError(f"unknown KJV book {unknown[0]!r}; names are {', '.join(KJV_BOOKS)}")
    return [canonical[b.lower()] for b in books]


def write_kjv(out_dir: str, books: list[str] | None = None, every: int = 20) -> dict:
    """The King James Bible as language-modelling text and verse-classification rows.

    out_dir/train.txt, val.txt: one verse a line, no references; verse number i (0-based, in
    Bible order) goes to val when (i + 1) % every == 0, except that a verse text that also
    occurs among the training verses stays out of val (the KJV repeats ~120 verses word for word),
    so no line is in both files. out_dir/books_train.jsonl, books_val.jsonl: {"text", "label"}
    rows (label = book name) of the verses of `books` (default DEFAULT_BOOKS), split the same way.
    Returns {"train", "val", "books_train", "books_val": row counts, "books": names}.
    Raises DataError when the KJV is not installed, a book is unknown, every < 2, or out_dir
    exists and is not empty.
    """
    if every < 2:
        raise DataError(f"every must be >= 2 (every-th verse held out), got {every}")
    names = _book_names(DEFAULT_BOOKS if books is None else books)
    verses = kjv_verses()
    in_val = [(i + 1) % every == 0 for i in range(len(verses))]
    train_texts = {text for (_, text), v in zip(verses, in_val) if not v}
    split = {"train": [], "val": []}
    for (book, text), v in zip(verses, in_val):
        if v and text in train_texts:
            continue
        split["val" if v else "train"].append((book, text))
    wanted = set(names)

    def fill(tmp: Path) -> dict:
        counts = {}
        for part, rows in split.items():
            (tmp / f"{part}.txt").write_text("".join(text + "\n" for _, text in rows), encoding="utf-8")
            labelled = [{"text": text, "label": book} for book, text in rows if book in wanted]
            with open(tmp / f"books_{part}.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in labelled)
            counts[part], counts[f"books_{part}"] = len(rows), len(labelled)
        return {**counts, "books": names}

    return _write_tree(out_dir, fill)
