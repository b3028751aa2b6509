"""Offline data loaders and the sharded, resumable batch order."""
import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from secateur.data import (DataError, ShardedOrder, check_available, load_dataset, read_idx,
                           shard_range)
from secateur.data.idx import FASHION_MNIST_ROOT
from secateur.data.text import _VERSE_REF, load_text


def _write_idx(path, arr: np.ndarray, code: int) -> None:
    header = struct.pack(">BBBB", 0, 0, code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(arr.dtype.newbyteorder(">")).tobytes())


def test_read_idx_parses_header_and_big_endian_payload(tmp_path):
    img = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    ints = np.array([[1, -2], [70000, 3]], dtype=np.int32)
    _write_idx(tmp_path / "a.gz", img, 0x08)
    _write_idx(tmp_path / "b.gz", ints, 0x0C)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), img)
    assert np.array_equal(read_idx(tmp_path / "b.gz"), ints)


def test_read_idx_rejects_truncated_payload(tmp_path):
    header = struct.pack(">BBBB", 0, 0, 8, 1) + struct.pack(">I", 10)
    with gzip.open(tmp_path / "bad.gz", "wb") as f:
        f.write(header + bytes(5))
    with pytest.raises(DataError, match="payload"):
        read_idx(tmp_path / "bad.gz")


def test_fashion_mnist_has_the_published_split_and_balanced_classes():
    ds = load_dataset("fashion_mnist")
    assert ds.train.x.shape == (60000, 1, 28, 28) and ds.val.x.shape == (10000, 1, 28, 28)
    # Fashion-MNIST: 6,000 training and 1,000 test images per class
    assert torch.bincount(ds.train.y).tolist() == [6000] * 10
    assert torch.bincount(ds.val.y).tolist() == [1000] * 10
    assert abs(ds.train.x.mean().item()) < 1e-4 and abs(ds.train.x.std().item() - 1) < 1e-3


def test_subsets_are_deterministic_and_seed_dependent():
    a = load_dataset("digits", train_subset=100, val_subset=50, subset_seed=3)
    b = load_dataset("digits", train_subset=100, val_subset=50, subset_seed=3)
    c = load_dataset("digits", train_subset=100, val_subset=50, subset_seed=4)
    assert len(a.train) == 100 and len(a.val) == 50
    assert torch.equal(a.train.y, b.train.y) and torch.equal(a.train.x, b.train.x)
    assert not torch.equal(a.train.y, c.train.y)


def test_subset_larger_than_split_is_a_data_error():
    with pytest.raises(DataError, match="subset size"):
        load_dataset("digits", train_subset=10**6)


def test_mnist_subset_and_digits_splits_are_disjoint_and_complete():
    for name, total in (("mnist", 5000), ("digits", 1797)):
        ds = load_dataset(name)
        assert len(ds.train) + len(ds.val) == total
        assert ds.num_classes == 10 and set(ds.val.y.tolist()) == set(range(10))


def test_sharded_order_gives_each_sample_once_per_epoch_across_ranks():
    n, bs, world = 50, 4, 3
    orders = [ShardedOrder(n, bs, r, world, seed=7) for r in range(world)]
    steps = n // (bs * world)                      # 4 full global batches, 2 samples dropped
    seen = torch.cat([o.next() for _ in range(steps) for o in orders])
    assert len(seen) == steps * bs * world and len(set(seen.tolist())) == len(seen)
    # the next draw starts epoch 1 with a different permutation
    nxt = orders[0].next()
    assert orders[0].epoch == 1 and orders[0].cursor == bs * world
    assert not torch.equal(nxt, torch.randperm(n, generator=torch.Generator().manual_seed(7 * 1_000_003))[:bs])


def test_sharded_order_resumes_the_exact_sequence():
    ref = ShardedOrder(30, 4, 1, 2, seed=1)
    seq = [ref.next() for _ in range(20)]
    a = ShardedOrder(30, 4, 1, 2, seed=1)
    for _ in range(7):
        a.next()
    b = ShardedOrder(30, 4, 1, 2, seed=1)
    b.load_state_dict(a.state_dict())
    assert all(torch.equal(b.next(), s) for s in seq[7:])


def test_shard_range_partitions_the_split():
    parts = [list(shard_range(11, r, 3)) for r in range(3)]
    assert sorted(sum(parts, [])) == list(range(11))


def test_cifar10_reads_a_local_copy_of_the_pickle_batches(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(4, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=4).tolist()
        batches[name] = (data, labels)
        with open(root / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels}, f)
    ds = load_dataset("cifar10", root=str(tmp_path))
    assert ds.train.x.shape == (20, 3, 32, 32) and ds.val.x.shape == (4, 3, 32, 32)
    assert ds.train.y.tolist() == sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    # standardisation is affine per channel: ordering of the raw pixels is preserved
    raw = torch.from_numpy(batches["test_batch"][0].reshape(4, 3, 32, 32)).float()
    assert torch.equal(ds.val.x[0, 0].flatten().argsort(stable=True), raw[0, 0].flatten().argsort(stable=True))


def test_missing_datasets_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match="CIFAR-10 not found") as err:
        check_available("cifar10", root=str(tmp_path))
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="Fashion-MNIST not found"):
        check_available("fashion_mnist", root=str(tmp_path))
    with pytest.raises(DataError, match="does not exist"):
        check_available("text", path=str(tmp_path / "nope.txt"))
    check_available("fashion_mnist", root=FASHION_MNIST_ROOT)


def test_text_windows_predict_the_next_character(tmp_path):
    text = "the quick brown fox jumps over the lazy dog. " * 20
    (tmp_path / "c.txt").write_text(text)
    ds = load_text(tmp_path / "c.txt", block_size=16, val_fraction=0.25)
    vocab = ds.meta["vocab"]
    decode = lambda ids: "".join(vocab[i] for i in ids.tolist())  # noqa: E731
    assert ds.task == "lm" and ds.num_classes == len(set(text))
    assert decode(ds.train.x[0]) == text[:16] and decode(ds.train.y[0]) == text[1:17]
    assert decode(ds.train.x[1]) == text[16:32]


def test_kjv_verse_references_are_stripped():
    sample = "Ge1:1 In the beginning God created.\nRev22:21 The grace of our Lord.\n"
    assert _VERSE_REF.sub("", sample) == "In the beginning God created.\nThe grace of our Lord.\n"
