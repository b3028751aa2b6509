"""Bring-your-own-data readers (image folders, local text files), the worker-backed BatchStream and
the writers of real data as files, checked against hand computations on tiny data in tmp_path."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from secateur.data import (BatchStream, DataError, ShardedOrder, Split, load_image_folder,
                           load_text_files, read_idx, write_fashion_mnist_png, write_kjv)
from secateur.data import writers
from secateur.data.idx import FASHION_MNIST_ROOT, IDX_FILES, missing_files
from secateur.data.text import kjv_available


def _one_line_error(match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(DataError, match=match) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message
    return message


# ---------------------------------------------------------------- image folders

def _image_folder(root: Path, classes=("ant", "bee", "cow"), per_class=6, size=(20, 28), mode="RGB",
                  seed=0) -> dict[str, np.ndarray]:
    """Random images root/<class>/<i>.png; returns {path: pixels (H, W[, C]) uint8}."""
    rng = np.random.default_rng(seed)
    shape = size if mode == "L" else (*size, 3)
    pixels = {}
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, shape, dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{i}.png")
            pixels[str(root / c / f"{i}.png")] = arr
    return pixels


def test_image_folder_val_batch_equals_pil_and_torch_by_hand(tmp_path):
    pixels = _image_folder(tmp_path / "train", per_class=3)
    val_pixels = _image_folder(tmp_path / "val", per_class=2, seed=1)
    ds = load_image_folder(str(tmp_path / "train"), val_root=str(tmp_path / "val"), image_size=10)
    assert ds.task == "classification" and ds.num_classes == 3 and ds.input_shape == (3, 10, 10)
    assert ds.meta["classes"] == ["ant", "bee", "cow"] and len(ds.train) == 9 and len(ds.val) == 6

    # default statistics: <= 512 training images, so all 9, resized like validation
    def resized(arr: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(arr).permute(2, 0, 1).float()[None] / 255
        x = F.interpolate(x, size=(10, 14), mode="bilinear", align_corners=False, antialias=True)
        return x[0, :, :, 2:12]                     # 20x28 -> 10x14, centre crop 10x10
    train = torch.stack([resized(a) for a in pixels.values()]).double()
    mean, std = train.mean(dim=(0, 2, 3)), train.std(dim=(0, 2, 3), unbiased=False)
    assert np.allclose(ds.meta["mean"], mean, atol=1e-6) and np.allclose(ds.meta["std"], std, atol=1e-6)

    x, y = ds.val.batch(torch.tensor([5, 0, 3]))
    paths = sorted(val_pixels)                      # ImageFolder order: class, then file name
    expected = torch.stack([resized(val_pixels[paths[i]]) for i in (5, 0, 3)])
    mean, std = torch.tensor(ds.meta["mean"]).view(1, 3, 1, 1), torch.tensor(ds.meta["std"]).view(1, 3, 1, 1)
    expected = (expected - mean) / std
    assert x.dtype == torch.float32 and x.shape == (3, 3, 10, 10)
    assert torch.allclose(x, expected.float(), atol=1e-5)
    assert y.dtype == torch.int64 and y.tolist() == [2, 0, 1]


def test_image_folder_grayscale_conversion_without_resize_is_pixels_over_255(tmp_path):
    pixels = _image_folder(tmp_path / "imgs", per_class=4)
    ds = load_image_folder(str(tmp_path / "imgs"), channels=1, mean=[0.5], std=[0.25], val_fraction=0.25)
    assert ds.input_shape == (1, 20, 28) and len(ds.train) == 9 and len(ds.val) == 3
    x, _ = ds.train.batch(torch.arange(len(ds.train)))
    gray = [np.asarray(Image.fromarray(a).convert("L")) for a in pixels.values()]
    train_paths = [p for p, _ in ds.train.samples]
    expected = torch.stack([torch.tensor(gray[list(pixels).index(p)]).float() / 255 for p in train_paths])
    assert torch.allclose(x[:, 0], (expected - 0.5) / 0.25, atol=1e-6)


def test_image_folder_holdout_is_seeded_disjoint_and_complete(tmp_path):
    _image_folder(tmp_path / "imgs", per_class=10, size=(8, 8), mode="L")
    a = load_image_folder(str(tmp_path / "imgs"), val_fraction=0.2, seed=1)
    b = load_image_folder(str(tmp_path / "imgs"), val_fraction=0.2, seed=1)
    c = load_image_folder(str(tmp_path / "imgs"), val_fraction=0.2, seed=2)
    assert a.input_shape == (1, 8, 8) and len(a.val) == 6 and len(a.train) == 24
    assert a.val.samples == b.val.samples and a.val.samples != c.val.samples
    assert not set(a.val.samples) & set(a.train.samples) and len(set(a.val.samples + a.train.samples)) == 30


def test_image_folder_augmentation_is_a_function_of_the_seed_and_leaves_the_global_rng(tmp_path):
    _image_folder(tmp_path / "imgs", per_class=4)
    ds = load_image_folder(str(tmp_path / "imgs"), image_size=12, augment=True)
    idx = torch.tensor([0, 3, 5, 7])
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, ya = ds.train.batch(idx, seed=7)
    b, _ = ds.train.batch(idx, seed=7)
    c, _ = ds.train.batch(idx, seed=8)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert a.shape == (4, 3, 12, 12) and torch.equal(a, b) and not torch.equal(a, c)
    # without a seed the training split is the deterministic validation transform
    plain = load_image_folder(str(tmp_path / "imgs"), image_size=12)
    assert torch.equal(ds.train.batch(idx)[0], plain.train.batch(idx)[0])
    assert not torch.equal(a, plain.train.batch(idx)[0])


def test_image_folder_errors_are_one_line(tmp_path):
    _one_line_error("does not exist", load_image_folder, str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    _one_line_error("no class folders", load_image_folder, str(tmp_path / "empty"))
    _image_folder(tmp_path / "some", per_class=2, size=(8, 8))
    (tmp_path / "some" / "dog").mkdir()
    (tmp_path / "some" / "dog" / "notes.txt").write_text("not an image")
    _one_line_error("dog has no images", load_image_folder, str(tmp_path / "some"))
    _image_folder(tmp_path / "mixed", classes=("a",), per_class=3, size=(8, 8))
    Image.fromarray(np.zeros((9, 8, 3), np.uint8)).save(tmp_path / "mixed" / "a" / "odd.png")
    _one_line_error("set image_size", load_image_folder, str(tmp_path / "mixed"), val_fraction=0.25)
    resized = load_image_folder(str(tmp_path / "mixed"), image_size=8, val_fraction=0.25)
    assert resized.input_shape == (3, 8, 8)
    _one_line_error("channels", load_image_folder, str(tmp_path / "mixed"), channels=2)
    _image_folder(tmp_path / "v", classes=("a", "zebra"), per_class=1, size=(8, 8))
    _one_line_error("zebra", load_image_folder, str(tmp_path / "mixed"), val_root=str(tmp_path / "v"),
                    image_size=8)


# ---------------------------------------------------------------- BatchStream

class _SeedEcho:
    """A split whose x carries the batch seed and some seeded noise, and whose y is idx."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def batch(self, idx, seed=None):
        noise = torch.rand(len(idx), generator=torch.Generator().manual_seed(seed))
        return {"seed": torch.tensor([seed]), "noise": noise}, idx.clone()


def _stream(n, num_workers, batches, cut=None, rank=0, world=2, bs=3, split=None):
    """`batches` micro-batches; with `cut`, state is saved after `cut` of them and a fresh stream
    (fresh order, other seed argument) continues from it."""
    split = split or _SeedEcho(n)
    stream = BatchStream(split, ShardedOrder(n, bs, rank, world, seed=5), num_workers=num_workers, seed=11)
    out = []
    for i in range(batches):
        if i == cut:
            state = stream.state_dict()
            stream.close()
            order = ShardedOrder(n, bs, rank, world, seed=5)
            stream = BatchStream(split, order, num_workers=num_workers, seed=0)
            stream.load_state_dict(state)
        out.append(stream.next())
    stream.close()
    return out


def _same(a, b) -> bool:
    def eq(u, v):
        return torch.equal(u, v) if isinstance(u, torch.Tensor) else all(eq(u[k], v[k]) for k in u)
    return len(a) == len(b) and all(eq(p[0], q[0]) and eq(p[1], q[1]) for p, q in zip(a, b))


def test_batch_stream_is_the_same_with_workers_and_after_a_state_round_trip():
    n = 20                                          # 2 ranks x 3 per batch: 3 batches an epoch
    reference = _stream(n, 0, 8)
    assert _same(reference, _stream(n, 2, 8))
    assert _same(reference, _stream(n, 2, 8, cut=2))  # mid-epoch
    assert _same(reference, _stream(n, 0, 8, cut=3))  # at the epoch boundary
    assert _same(reference, _stream(n, 2, 8, cut=4))  # after it
    seeds = [int(x["seed"]) for x, _ in reference]
    assert len(set(seeds)) == len(seeds)
    # each epoch covers 18 distinct rows between the two ranks; the seeds differ by rank
    other = _stream(n, 0, 8, rank=1)
    for epoch in range(2):
        rows = [y for x, y in reference[3 * epoch:3 * epoch + 3] + other[3 * epoch:3 * epoch + 3]]
        assert len(set(torch.cat(rows).tolist())) == 18
    assert not set(seeds) & {int(x["seed"]) for x, _ in other}


def test_batch_stream_state_counts_consumed_batches_not_prefetched_ones(tmp_path):
    _image_folder(tmp_path / "imgs", per_class=5, size=(10, 10))
    ds = load_image_folder(str(tmp_path / "imgs"), augment=True, val_fraction=0.2)
    order = ShardedOrder(len(ds.train), 4, seed=1)
    before = torch.random.get_rng_state()
    stream = BatchStream(ds.train, order, num_workers=2, seed=3, prefetch_factor=4)
    first = [stream.next() for _ in range(2)]
    assert stream.state_dict()["cursor"] == 8 and order.state_dict() == {"epoch": 0, "cursor": 8}
    stream.close()
    assert torch.equal(torch.random.get_rng_state(), before)
    in_process = BatchStream(ds.train, ShardedOrder(len(ds.train), 4, seed=1), num_workers=0, seed=3)
    assert _same(first, [in_process.next() for _ in range(2)])


def test_in_memory_split_accepts_and_ignores_a_seed():
    split = Split(torch.arange(12.0).view(6, 2), torch.arange(6))
    idx = torch.tensor([4, 1])
    assert _same([split.batch(idx)], [split.batch(idx, seed=9)])


# ---------------------------------------------------------------- text files

_SENTENCES = ["the cat sat on the mat", "a dog ran far away", "birds sing in the morning light",
              "rain fell on the quiet town", "the old man read a long book", "wind moved the tall grass",
              "children played by the river", "stars shone over the dark hills"]


def _write_lines(path: Path, n: int, offset: int = 0) -> list[str]:
    lines = [f"{_SENTENCES[(i + offset) % 8]} number {i + offset}" for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return lines


def _tokenizer(ds):
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(tokenizer_file=ds.meta["tokenizer"], pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", unk_token="<unk>", mask_token="<mask>")


def test_causal_lm_blocks_are_the_documents_tokens_in_order(tmp_path):
    train = _write_lines(tmp_path / "train.txt", 60)
    _write_lines(tmp_path / "val.txt", 20, offset=3)
    ds = load_text_files(str(tmp_path / "train.txt"), str(tmp_path / "val.txt"), block_size=16,
                         vocab_size=300, cache_dir=str(tmp_path / "cache"))
    tok = _tokenizer(ds)
    eos = ds.meta["eos_token_id"]
    stream = [t for line in train for t in tok.encode(line, add_special_tokens=False) + [eos]]
    n = len(stream) // 17
    x, y = ds.train.batch(torch.arange(len(ds.train)))
    assert ds.task == "lm" and ds.input_shape == (16,) and ds.num_classes == ds.meta["vocab_size"]
    assert x.shape == y.shape == (n, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:])
    rebuilt = torch.cat([x, y[:, -1:]], dim=1).flatten().tolist()
    assert rebuilt == stream[:n * 17]
    text = tok.decode(rebuilt).split(tok.eos_token)
    assert text[:len(text) - 1] == train[:len(text) - 1]


def test_bpe_is_trained_once_and_reused_from_the_cache(tmp_path):
    _write_lines(tmp_path / "train.txt", 40)
    kwargs = dict(block_size=8, vocab_size=300, cache_dir=str(tmp_path / "cache"))
    a = load_text_files(str(tmp_path / "train.txt"), **kwargs)
    path = Path(a.meta["tokenizer"])
    assert path.parent == tmp_path / "cache" and path.name.startswith("tokenizer-")
    stamp, content = path.stat().st_mtime_ns, path.read_text()
    b = load_text_files(str(tmp_path / "train.txt"), **kwargs)
    assert b.meta["tokenizer"] == str(path) and path.stat().st_mtime_ns == stamp
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.val.y, b.val.y)
    path.unlink()                                   # retraining gives the same file: deterministic
    load_text_files(str(tmp_path / "train.txt"), **kwargs)
    assert path.read_text() == content
    other = load_text_files(str(tmp_path / "train.txt"), **{**kwargs, "vocab_size": 280})
    assert other.meta["tokenizer"] != str(path) and other.meta["vocab_size"] <= 280
    # a local tokenizer folder gives the same ids
    _tokenizer(a).save_pretrained(str(tmp_path / "tok"))
    c = load_text_files(str(tmp_path / "train.txt"), tokenizer=str(tmp_path / "tok"), **kwargs)
    assert torch.equal(a.train.x, c.train.x) and c.meta["tokenizer"] == str(tmp_path / "tok")


def test_classification_rows_are_padded_and_masked_like_a_hand_built_batch(tmp_path):
    rows = [(_SENTENCES[i % 8] + " and more" * (i % 5), ["pos", "neg", "mid"][i % 3]) for i in range(30)]
    (tmp_path / "train.csv").write_text("text,label\n" + "".join(f"{t},{lab}\n" for t, lab in rows))
    (tmp_path / "val.csv").write_text("text,label\n" + "".join(f"{t},{lab}\n" for t, lab in rows[:5]))
    ds = load_text_files(str(tmp_path / "train.csv"), str(tmp_path / "val.csv"), task="classification",
                         label_column="label", max_length=12, vocab_size=300,
                         cache_dir=str(tmp_path / "cache"))
    assert ds.task == "classification" and ds.num_classes == 3 and ds.meta["labels"] == ["mid", "neg", "pos"]
    assert ds.input_shape == (12,) and len(ds.train) == 30 and len(ds.val) == 5
    tok = _tokenizer(ds)
    encoded = [[tok.bos_token_id] + tok.encode(t, add_special_tokens=False)[:10] + [tok.eos_token_id]
               for t, _ in rows]
    width = max(len(e) for e in encoded)
    ids = torch.full((30, width), ds.meta["pad_token_id"])
    mask = torch.zeros((30, width), dtype=torch.int64)
    for i, e in enumerate(encoded):
        ids[i, :len(e)], mask[i, :len(e)] = torch.tensor(e), 1
    assert width == 12 and mask.sum(dim=1).min() < 12      # some rows were truncated, some padded
    x, y = ds.train.batch(torch.arange(30))
    assert torch.equal(x["input_ids"], ids) and torch.equal(x["attention_mask"], mask)
    assert y.tolist() == [["mid", "neg", "pos"].index(lab) for _, lab in rows]
    # a batch of short rows is trimmed to its own longest row
    short = torch.tensor([0, 5])
    xs, ys = ds.train.batch(short)
    n = int(mask[short].sum(dim=1).max())
    assert torch.equal(xs["input_ids"], ids[short, :n]) and torch.equal(ys, y[short])


def test_classification_int_labels_keep_their_values_and_unseen_val_labels_fail(tmp_path):
    with open(tmp_path / "train.jsonl", "w") as f:
        f.writelines(json.dumps({"sentence": t, "y": i % 3}) + "\n" for i, t in enumerate(_SENTENCES * 3))
    with open(tmp_path / "val.jsonl", "w") as f:
        f.writelines(json.dumps({"sentence": t, "y": i % 4}) + "\n" for i, t in enumerate(_SENTENCES))
    kwargs = dict(task="classification", text_column="sentence", label_column="y", vocab_size=300,
                  cache_dir=str(tmp_path / "cache"))
    ds = load_text_files(str(tmp_path / "train.jsonl"), val_fraction=0.25, **kwargs)
    assert ds.meta["labels"] == [0, 1, 2] and len(ds.train) == 18 and len(ds.val) == 6
    _one_line_error("validation labels absent from the training rows: 3", load_text_files,
                    str(tmp_path / "train.jsonl"), str(tmp_path / "val.jsonl"), **kwargs)


def test_masked_lm_masks_about_the_rate_deterministically_and_ignores_the_rest(tmp_path):
    _write_lines(tmp_path / "train.txt", 300)
    ds = load_text_files(str(tmp_path / "train.txt"), task="masked_lm", max_length=16, vocab_size=300,
                         cache_dir=str(tmp_path / "cache"), mlm_probability=0.15)
    tok = _tokenizer(ds)
    assert ds.task == "mlm" and ds.num_classes == ds.meta["vocab_size"] == len(tok)
    idx = torch.arange(len(ds.train))
    plain = ds.train.input_ids[idx], ds.train.attention_mask[idx]
    x, y = ds.train.batch(idx, seed=4)
    ids = plain[0][:, :x["input_ids"].shape[1]]
    special = torch.isin(ids, torch.tensor(tok.all_special_ids))
    maskable = x["attention_mask"].bool() & ~special
    masked = y != -100
    assert not (masked & ~maskable).any()                      # never pad, <bos>, <eos>
    assert torch.equal(y[masked], ids[masked])
    assert torch.equal(x["input_ids"][~masked], ids[~masked])
    rate = masked.sum() / maskable.sum()
    assert 0.12 < rate < 0.20 and int(maskable.sum()) > 2000
    as_mask = (x["input_ids"][masked] == tok.mask_token_id).float().mean()
    kept = (x["input_ids"][masked] == ids[masked]).float().mean()
    assert 0.72 < as_mask < 0.88 and 0.04 < kept < 0.17
    again, y_again = ds.train.batch(idx, seed=4)
    other, _ = ds.train.batch(idx, seed=5)
    assert torch.equal(again["input_ids"], x["input_ids"]) and torch.equal(y_again, y)
    assert not torch.equal(other["input_ids"], x["input_ids"])
    assert _same([ds.val.batch(torch.arange(4))], [ds.val.batch(torch.arange(4), seed=0)])


def test_text_file_errors_are_one_line(tmp_path):
    cache = str(tmp_path / "cache")
    _one_line_error("does not exist", load_text_files, str(tmp_path / "none.txt"), cache_dir=cache)
    _one_line_error("matches no file", load_text_files, str(tmp_path / "*.parquet"), cache_dir=cache)
    (tmp_path / "a.doc").write_text("x")
    _one_line_error("format", load_text_files, str(tmp_path / "a.doc"), cache_dir=cache)
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    _one_line_error("no text", load_text_files, str(tmp_path / "blank.txt"), cache_dir=cache)
    _write_lines(tmp_path / "short.txt", 10)
    _one_line_error("block_size", load_text_files, str(tmp_path / "short.txt"), block_size=4096,
                    vocab_size=280, cache_dir=cache)
    (tmp_path / "rows.jsonl").write_text('{"body": "hello there"}\n' * 10)
    _one_line_error("column 'text' is not in .*columns: body", load_text_files,
                    str(tmp_path / "rows.jsonl"), cache_dir=cache)
    _one_line_error("column 'label'", load_text_files, str(tmp_path / "rows.jsonl"),
                    text_column="body", task="classification", cache_dir=cache)
    _one_line_error("unknown text task", load_text_files, str(tmp_path / "rows.jsonl"), task="qa")
    _one_line_error("neither", load_text_files, str(tmp_path / "short.txt"),
                    tokenizer=str(tmp_path / "no-tokenizer"), cache_dir=cache)


# ---------------------------------------------------------------- writers

@pytest.mark.skipif(bool(missing_files(FASHION_MNIST_ROOT)), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_png_round_trips_to_the_idx_pixels(tmp_path):
    counts = write_fashion_mnist_png(str(tmp_path / "fm"), train_limit=40, val_limit=15)
    assert counts["train"] == 40 and counts["val"] == 15 and counts["classes"][0] == "T-shirt_top"
    for split, limit in (("train", 40), ("val", 15)):
        images = read_idx(Path(FASHION_MNIST_ROOT) / IDX_FILES[f"{split}_images"])
        labels = read_idx(Path(FASHION_MNIST_ROOT) / IDX_FILES[f"{split}_labels"])
        files = sorted((tmp_path / "fm" / split).glob("*/*.png"))
        assert len(files) == limit
        for f in files:
            i = int(f.stem)
            with Image.open(f) as im:
                assert im.mode == "L" and np.array_equal(np.asarray(im), images[i])
            assert f.parent.name == counts["classes"][labels[i]]
    ds = load_image_folder(str(tmp_path / "fm" / "train"), val_root=str(tmp_path / "fm" / "val"),
                           mean=[0.0], std=[1.0])
    x, y = ds.val.batch(torch.arange(len(ds.val)))
    first = int(Path(ds.val.samples[0][0]).stem)
    assert x.shape == (15, 1, 28, 28)
    assert torch.equal((x[0, 0] * 255).round(), torch.tensor(images[first]).float())
    assert [ds.meta["classes"][c] for c in y] == [counts["classes"][labels[int(Path(p).stem)]]
                                                   for p, _ in ds.val.samples]
    again = write_fashion_mnist_png(str(tmp_path / "fm2"), train_limit=40, val_limit=15)
    assert sorted(p.name for p in (tmp_path / "fm2" / "train").glob("*/*.png")) == sorted(
        p.name for p in (tmp_path / "fm" / "train").glob("*/*.png")) and again == counts
    _one_line_error("not an empty folder", write_fashion_mnist_png, str(tmp_path / "fm"), train_limit=1)


def _fake_kjv():
    verses = []
    for b, book in enumerate(("Genesis", "Psalms", "Jude", "Revelation")):
        verses += [(book, f"verse {v} of {book}") for v in range(25 + 10 * b)]
    verses[39] = ("Psalms", "verse 0 of Genesis")     # a repeated verse at a held-out place
    return verses


def test_kjv_writer_holds_out_every_nth_verse_and_no_text_in_both(tmp_path, monkeypatch):
    verses = _fake_kjv()
    monkeypatch.setattr(writers, "kjv_verses", lambda: verses)
    counts = write_kjv(str(tmp_path / "kjv"), books=["genesis", "Revelation"], every=10)
    train = (tmp_path / "kjv" / "train.txt").read_text().splitlines()
    val = (tmp_path / "kjv" / "val.txt").read_text().splitlines()
    expected_val = [t for i, (_, t) in enumerate(verses) if (i + 1) % 10 == 0 and i != 39]
    assert val == expected_val and len(train) == len(verses) - len(expected_val) - 1
    assert not set(train) & set(val) and counts["train"] == len(train) and counts["val"] == len(val)
    rows = {part: [json.loads(line) for line in open(tmp_path / "kjv" / f"books_{part}.jsonl")]
            for part in ("train", "val")}
    assert {r["label"] for r in rows["train"]} == {"Genesis", "Revelation"} == set(counts["books"])
    assert [r["text"] for r in rows["val"]] == [t for t in val if "Genesis" in t or "Revelation" in t]
    wanted = [t for i, (b, t) in enumerate(verses) if b in ("Genesis", "Revelation") and (i + 1) % 10]
    assert [r["text"] for r in rows["train"]] == wanted and counts["books_train"] == len(wanted)
    _one_line_error("not an empty folder", write_kjv, str(tmp_path / "kjv"))
    _one_line_error("unknown KJV book 'Gen'", write_kjv, str(tmp_path / "k2"), books=["Gen"])


@pytest.mark.skipif(not kjv_available(), reason="Debian bible-kjv + bible-kjv-text not installed")
def test_kjv_writer_on_the_real_bible(tmp_path):
    counts = write_kjv(str(tmp_path / "kjv"))
    assert counts["train"] + counts["val"] <= 31102 and 1500 < counts["val"] <= 31102 // 20
    assert set(counts["books"]) == set(writers.DEFAULT_BOOKS) and counts["books_train"] > 8000
    val = set((tmp_path / "kjv" / "val.txt").read_text().splitlines())
    assert not val & set((tmp_path / "kjv" / "train.txt").read_text().splitlines())
