"""pytest-benchmark suites, one per kernel op, on the torch path (CPU) and, when a GPU is
present, the Triton path. Run: `make bench` or
    .venv/bin/python -m pytest benchmarks/bench_kernels.py --benchmark-only
Timings only: nothing here asserts a speed."""
import pytest
import torch

from secateur.kernels import channel_sq_sum, gram, rms_norm2d, tsra

DEVICES = [("cpu", "torch")] + ([("cuda", "torch"), ("cuda", "triton")] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES, ids=lambda p: f"{p[0]}-{p[1]}")
def dev(request, monkeypatch):
    device, backend = request.param
    monkeypatch.setenv("SECATEUR_BACKEND", backend)
    return device


def _sync(dev):
    if dev == "cuda":
        torch.cuda.synchronize()


def _act(dev):
    return torch.randn(32, 64, 16, 16, device=dev)


def test_tsra_forward(benchmark, dev):
    x = _act(dev)
    benchmark(lambda: (tsra(x), _sync(dev)))


def test_tsra_forward_with_stats(benchmark, dev):
    x, stats = _act(dev), torch.zeros(64, device=dev)
    benchmark(lambda: (tsra(x, stats=stats), _sync(dev)))


def test_tsra_forward_backward(benchmark, dev):
    x = _act(dev).requires_grad_()
    g = torch.randn_like(x)
    benchmark(lambda: (tsra(x).backward(g), _sync(dev)))


def test_rms_norm2d_forward_backward(benchmark, dev):
    x = _act(dev).requires_grad_()
    g = torch.randn_like(x)
    benchmark(lambda: (rms_norm2d(x).backward(g), _sync(dev)))


def test_channel_sq_sum(benchmark, dev):
    x = _act(dev)
    benchmark(lambda: (channel_sq_sum(x), _sync(dev)))


def test_gram(benchmark, dev):
    w = torch.randn(512, 1024, device=dev)
    benchmark(lambda: (gram(w, 1e-3), _sync(dev)))
