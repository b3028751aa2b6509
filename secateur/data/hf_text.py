"""A user's local text files read with Hugging Face `datasets`, tokenised with `tokenizers`.

Three tasks over the same reader: next-token prediction on packed blocks ("causal_lm"),
text classification ("classification") and masked-token prediction ("masked_lm", masks drawn
per batch from the batch seed). The tokenizer is a local Hugging Face tokenizer folder or a
byte-level BPE trained on the training texts and cached by a hash of those texts and settings.
Nothing is downloaded: `datasets` runs in offline mode and only its packaged file readers are used.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from glob import glob
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor

from secateur.data.base import IGNORE_INDEX, DataError, Dataset, Split, holdout

FORMATS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".csv": "csv",
           ".parquet": "parquet"}
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst")
SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>", "<mask>"]
TASKS = {"causal_lm": "lm", "classification": "classification", "masked_lm": "mlm"}
_BPE_VERSION = 1  # part of the cache key: bump when the BPE recipe below changes
_CHUNK = 4096     # rows tokenised per call, to bound the Python lists held at once


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)


def _expand(files: str | os.PathLike | list, what: str) -> list[str]:
    """Paths (glob patterns expanded, sorted); DataError for a missing file or an empty pattern."""
    specs = [files] if isinstance(files, (str, os.PathLike)) else list(files)
    if not specs:
        raise DataError(f"no {what} files given")
    out: list[str] = []
    for spec in map(str, specs):
        if any(ch in spec for ch in "*?["):
            matches = sorted(glob(spec))
            if not matches:
                raise DataError(f"{what} pattern {spec} matches no file")
            out += matches
        elif not Path(spec).is_file():
            raise DataError(f"{what} file {spec} does not exist")
        else:
            out.append(spec)
    return out


def infer_format(files: list[str]) -> str:
    """The `datasets` reader for files by extension (.txt/.text, .json/.jsonl, .csv, .parquet,
    optionally compressed); DataError when unknown or mixed."""
    found = set()
    for f in files:
        name = f.lower()
        for ext in _COMPRESSION:
            name = name.removesuffix(ext)
        fmt = FORMATS.get(Path(name).suffix)
        if fmt is None:
            raise DataError(f"cannot tell the format of {f} from its extension "
                            f"({', '.join(FORMATS)}); set format")
        found.add(fmt)
    if len(found) > 1:
        raise DataError(f"the files mix formats ({', '.join(sorted(found))}); give one format")
    return found.pop()


@contextlib.contextmanager
def _offline() -> Iterator[Any]:
    """`datasets` in offline mode and without progress bars, for the duration of the block."""
    saved_env = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    os.environ.update({k: "1" for k in saved_env})
    import datasets

    saved_cfg = {k: getattr(datasets.config, k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    bars_off = datasets.are_progress_bars_disabled()
    for k in saved_cfg:
        setattr(datasets.config, k, True)
    datasets.disable_progress_bars()
    try:
        yield datasets
    finally:
        for k, v in saved_cfg.items():
            setattr(datasets.config, k, v)
        if not bars_off:
            datasets.enable_progress_bars()
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _read_rows(fmt: str, files: dict[str, list[str]], columns: list[str],
               cache_dir: Path) -> dict[str, dict[str, list]]:
    """Columns `columns` of every split in `files` ({"train": [...], ...}), as Python lists."""
    with _offline() as datasets:
        try:
            loaded = datasets.load_dataset(fmt, data_files=files, cache_dir=str(cache_dir / "datasets"))
        except Exception as e:  # the readers raise many kinds; the user needs the first line
            raise DataError(f"cannot read {fmt} files {', '.join(sum(files.values(), []))}: "
                            f"{_one_line(e)}") from None
    out = {}
    for split, ds in loaded.items():
        missing = [c for c in columns if c not in ds.column_names]
        if missing:
            raise DataError(f"column {missing[0]!r} is not in {', '.join(files[split])} "
                            f"(columns: {', '.join(ds.column_names)})")
        out[split] = {c: list(ds[c]) for c in columns}
    return out


def _non_empty(rows: dict[str, list], text_column: str, what: str) -> dict[str, list]:
    """Rows whose text is a non-blank string; DataError when none is left."""
    keep = [i for i, t in enumerate(rows[text_column]) if isinstance(t, str) and t.strip()]
    if not keep:
        raise DataError(f"the {what} files hold no text in column {text_column!r}")
    return {c: [v[i] for i in keep] for c, v in rows.items()}


def _train_bpe(texts: list[str], vocab_size: int, cache_dir: Path) -> Path:
    """A byte-level BPE trained on `texts`, saved (once) as cache_dir/tokenizer-<hash>.json."""
    key = hashlib.sha256(f"bpe-v{_BPE_VERSION} vocab_size={vocab_size}\0".encode())
    for t in texts:
        key.update(t.encode("utf-8"))
        key.update(b"\0")
    path = cache_dir / f"tokenizer-{key.hexdigest()[:20]}.json"
    if path.is_file():
        return path
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer, length=len(texts))
    bos, eos = tok.token_to_id("<bos>"), tok.token_to_id("<eos>")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", pair="<bos> $A <eos> $B:1 <eos>:1",
        special_tokens=[("<bos>", bos), ("<eos>", eos)])
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tok.save(str(tmp))
    os.replace(tmp, path)  # atomic: a concurrent reader sees the whole file or none
    return path


def open_tokenizer(path: str | Path):
    """The transformers fast tokenizer saved at `path` (meta["tokenizer"] of a text dataset):
    a local tokenizer folder, or a tokenizer json written by the "bpe" option (its special tokens
    are <pad> <bos> <eos> <unk> <mask>). DataError when it cannot be loaded."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(path)
    try:
        if path.is_file():
            pad, bos, eos, unk, mask = SPECIAL_TOKENS
            return PreTrainedTokenizerFast(tokenizer_file=str(path), pad_token=pad, bos_token=bos,
                                           eos_token=eos, unk_token=unk, mask_token=mask)
        if path.is_dir():
            return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError... for bad folders
        raise DataError(f"cannot load the tokenizer in {path}: {_one_line(e)}") from None
    raise DataError(f"tokenizer must be 'bpe' or a local tokenizer folder; {path} is neither")


def _encode(tok, texts: list[str], **kwargs) -> list[list[int]]:
    ids: list[list[int]] = []
    for start in range(0, len(texts), _CHUNK):
        ids += tok(texts[start:start + _CHUNK], **kwargs)["input_ids"]
    return ids


def pack_blocks(docs: list[list[int]], eos_id: int, block_size: int, what: str) -> Split:
    """Documents' tokens, an eos after each, cut into non-overlapping blocks of block_size + 1.

    Returns Split(x (N, block_size), y (N, block_size)) int64 with y = x shifted by one token;
    the remainder after the last whole block is dropped. DataError when not one block fits.
    """
    stream = np.fromiter((t for doc in docs for t in (*doc, eos_id)), dtype=np.int64)
    n = len(stream) // (block_size + 1)
    if n < 1:
        raise DataError(f"the {what} text has {len(stream)} tokens, fewer than block_size + 1 = "
                        f"{block_size + 1}; lower block_size or add text")
    blocks = torch.from_numpy(stream[: n * (block_size + 1)]).view(n, block_size + 1)
    return Split(blocks[:, :-1].clone(), blocks[:, 1:].clone())


def pad_rows(rows: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-padded (input_ids (N, L), attention_mask (N, L)) int64, L the longest row."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(rows), width), dtype=torch.int64)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.int64)
        mask[i, :len(r)] = 1
    return ids, mask


class MaskedLM:
    """BERT-style masking: a `probability` of the maskable tokens become targets; of those 80%
    turn into the mask token, 10% into a random non-special token, 10% stay as they are."""

    def __init__(self, mask_id: int, special_ids: list[int], vocab_size: int,
                 probability: float) -> None:
        if not 0.0 < probability < 1.0:
            raise DataError(f"mlm_probability must be in (0, 1), got {probability}")
        self.mask_id, self.probability = mask_id, probability
        self.special = torch.tensor(sorted(set(special_ids)), dtype=torch.int64)
        self.replacements = torch.from_numpy(
            np.setdiff1d(np.arange(vocab_size), self.special.numpy())).long()

    def __call__(self, ids: Tensor, attention: Tensor, seed: int | None) -> tuple[Tensor, Tensor]:
        """(masked ids, targets) for ids / attention (B, L); targets are -100 where not masked.

        Every row with a maskable token gets at least one target, so no batch has an empty loss.
        seed None uses seed 0 (evaluation sees the same masks every time).
        """
        g = torch.Generator().manual_seed(0 if seed is None else int(seed))
        maskable = attention.bool() & ~torch.isin(ids, self.special)
        chosen = (torch.rand(ids.shape, generator=g) < self.probability) & maskable
        fallback = torch.rand(ids.shape, generator=g).masked_fill(~maskable, -1.0).argmax(dim=1)
        rows = (~chosen.any(dim=1) & maskable.any(dim=1)).nonzero().flatten()
        chosen[rows, fallback[rows]] = True
        action = torch.rand(ids.shape, generator=g)
        x = ids.masked_fill(chosen & (action < 0.8), self.mask_id)
        swap = chosen & (action >= 0.8) & (action < 0.9)
        pick = torch.randint(len(self.replacements), (int(swap.sum()),), generator=g)
        x[swap] = self.replacements[pick]
        return x, ids.masked_fill(~chosen, IGNORE_INDEX)


class TokenRowsSplit:
    """Tokenised text rows, right-padded. batch(idx, seed) -> ({"input_ids", "attention_mask"}
    each (B, L) int64 with L the longest row of the batch, y): y the (B,) labels, or with
    `masking` the (B, L) masked-LM targets drawn from `seed`."""

    def __init__(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor | None = None,
                 masking: MaskedLM | None = None) -> None:
        self.input_ids, self.attention_mask = input_ids, attention_mask
        self.labels, self.masking = labels, masking

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def batch(self, idx: Tensor, seed: int | None = None) -> tuple[dict[str, Tensor], Tensor]:
        attention = self.attention_mask[idx]
        width = int(attention.sum(dim=1).max())
        ids, attention = self.input_ids[idx, :width], attention[:, :width]
        if self.masking is None:
            return {"input_ids": ids, "attention_mask": attention}, self.labels[idx]
        x, y = self.masking(ids, attention, seed)
        return {"input_ids": x, "attention_mask": attention}, y


def label_ids(train: list, val: list) -> tuple[Tensor, Tensor, list]:
    """Labels to ids by the sorted distinct training labels (ints 0..K-1 map to themselves).

    Returns (train ids (N,), val ids (M,), the label of each id). DataError for a missing label,
    labels of mixed types, or a validation label that no training row has.
    """
    if any(v is None for v in train + val):
        raise DataError("some rows have no label")
    try:
        names = sorted(set(train))
    except TypeError:
        raise DataError("the labels mix types (e.g. numbers and strings)") from None
    index = {v: i for i, v in enumerate(names)}
    unseen = sorted({str(v) for v in val if v not in index})
    if unseen:
        raise DataError(f"validation labels absent from the training rows: {', '.join(unseen[:5])}")
    return (torch.tensor([index[v] for v in train], dtype=torch.int64),
            torch.tensor([index[v] for v in val], dtype=torch.int64), names)


def default_cache_dir() -> Path:
    """$SECATEUR_CACHE, else ~/.cache/secateur."""
    return Path(os.environ.get("SECATEUR_CACHE") or Path.home() / ".cache" / "secateur")


def load_text_files(train_files: str | list[str], val_files: str | list[str] | None = None,
                    val_fraction: float = 0.05, format: str | None = None,
                    text_column: str = "text", label_column: str | None = None,
                    task: str = "causal_lm", tokenizer: str = "bpe", vocab_size: int = 4096,
                    block_size: int = 128, max_length: int = 128, cache_dir: str | None = None,
                    seed: int = 0, mlm_probability: float = 0.15) -> Dataset:
    """Text datasets from local files (paths or glob patterns) in text/json/csv/parquet format.

    Rows are read with `datasets.load_dataset(format, data_files=...)` offline; rows with blank
    text are dropped; with val_files None a seeded `val_fraction` of the rows is held out.
    tokenizer: "bpe" trains a byte-level BPE (vocab_size, special tokens <pad> <bos> <eos> <unk>
    <mask>, <bos>/<eos> around each row) on the training texts only, cached as
    cache_dir/tokenizer-<hash>.json (hash of those texts and the settings); otherwise a local
    Hugging Face tokenizer folder. cache_dir None: $SECATEUR_CACHE or ~/.cache/secateur.

    task "causal_lm": documents joined with an eos after each, packed into blocks of
    block_size + 1; x, y (N, block_size) int64 with y = x shifted by one. Dataset.task "lm".
    task "classification": rows (text, label_column, default "label"); x = {"input_ids",
    "attention_mask"} (B, L <= max_length) int64, y (B,) int64; meta["labels"] names the ids.
    task "masked_lm": x as for classification with an mlm_probability of the tokens masked per
    batch from its seed (seed None: 0), y (B, L) original ids there and -100 elsewhere.
    Dataset.task "mlm". num_classes is the vocabulary size for both LM tasks.

    meta: "tokenizer" (json file or folder), "pad_token_id", "vocab_size" (real size), "format",
    "rows" per split, and "labels" for classification. Raises DataError (one line) for a
    missing file or column, an unknown format/task/tokenizer, an empty corpus, block_size longer
    than a split's text, or a validation label absent from training.
    """
    if task not in TASKS:
        raise DataError(f"unknown text task {task!r}; choose one of {', '.join(TASKS)}")
    for name, value in (("block_size", block_size), ("max_length", max_length), ("vocab_size", vocab_size)):
        if value < 1:
            raise DataError(f"{name} must be positive, got {value}")
    train = _expand(train_files, "training")
    val = _expand(val_files, "validation") if val_files is not None else []
    fmt = format or infer_format(train + val)
    if fmt not in FORMATS.values():
        raise DataError(f"unknown format {fmt!r}; choose one of text, json, csv, parquet")
    if task == "classification":
        label_column = label_column or "label"
    columns = [text_column] + ([label_column] if task == "classification" else [])
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    files = {"train": train, **({"validation": val} if val else {})}
    rows = _read_rows(fmt, files, columns, cache)
    train_rows = _non_empty(rows["train"], text_column, "training")
    if val:
        val_rows = _non_empty(rows["validation"], text_column, "validation")
    else:
        keep, held = holdout(len(train_rows[text_column]), val_fraction, seed, "text files")
        val_rows = {c: [v[i] for i in held] for c, v in train_rows.items()}
        train_rows = {c: [v[i] for i in keep] for c, v in train_rows.items()}
    texts = {"train": train_rows[text_column], "val": val_rows[text_column]}

    tok_path = _train_bpe(texts["train"], vocab_size, cache) if tokenizer == "bpe" else Path(tokenizer)
    if tokenizer != "bpe" and not tok_path.is_dir():
        raise DataError(f"tokenizer must be 'bpe' or a local tokenizer folder; {tokenizer} is neither")
    tok = open_tokenizer(tok_path)
    vocab = len(tok)
    eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    meta = {"tokenizer": str(tok_path), "pad_token_id": pad, "vocab_size": vocab, "format": fmt,
            "eos_token_id": eos, "rows": {k: len(v) for k, v in texts.items()}}
    if task == "causal_lm":
        if eos is None:
            raise DataError(f"the tokenizer in {tokenizer} has no eos or sep token to join documents")
        splits = [pack_blocks(_encode(tok, texts[k], add_special_tokens=False, verbose=False),
                              eos, block_size, name)
                  for k, name in (("train", "training"), ("val", "validation"))]
        return Dataset("text_files", splits[0], splits[1], num_classes=vocab,
                       input_shape=(block_size,), task="lm", meta=meta)

    if pad is None:
        raise DataError(f"the tokenizer in {tokenizer} has no pad, eos or sep token to pad rows")
    padded = [pad_rows(_encode(tok, texts[k], truncation=True, max_length=max_length), pad)
              for k in ("train", "val")]
    if task == "classification":
        y_train, y_val, names = label_ids(train_rows[label_column], val_rows[label_column])
        meta["labels"] = names
        return Dataset("text_files", TokenRowsSplit(*padded[0], labels=y_train),
                       TokenRowsSplit(*padded[1], labels=y_val), num_classes=len(names),
                       input_shape=(max_length,), task="classification", meta=meta)
    if tok.mask_token_id is None:
        raise DataError(f"the tokenizer in {tokenizer} has no mask token for masked_lm")
    masking = MaskedLM(tok.mask_token_id, tok.all_special_ids, vocab, mlm_probability)
    meta["mask_token_id"] = tok.mask_token_id
    return Dataset("text_files", TokenRowsSplit(*padded[0], masking=masking),
                   TokenRowsSplit(*padded[1], masking=masking), num_classes=vocab,
                   input_shape=(max_length,), task="mlm", meta=meta)
