"""Kernels: the Triton path (interpreter on CPU, native on CUDA) against the torch reference,
forward and backward, odd shapes and low precision; float64 gradchecks of the references; TSRA's
equivariance to block-orthogonal rotations; fused statistics equal the sum of squared outputs."""
import pytest
import torch

from secateur.kernels import TSRA, RMSNorm2d, channel_sq_sum, gram, rms_norm2d, tsra
from secateur.kernels._backend import backend_for
from secateur.kernels.gram import gram_reference
from secateur.kernels.importance import channel_sq_sum_reference
from secateur.kernels.rms_norm import rms_norm_backward_reference, rms_norm_forward_reference
from secateur.kernels.tsra import tsra_backward_reference, tsra_forward_reference

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}
# (shape, channel dim, split): non-power-of-two channels and positions, tails, empty subspace
SHAPES = [((3, 7, 5, 3), 1, 3), ((6, 13), 1, None), ((2, 5, 33), -1, 10), ((4, 9, 2), 1, 0),
          ((2, 33, 3, 5), 1, 17)]


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv("SECATEUR_BACKEND", "triton")


def _rand(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype).to(DEV)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,dim,split", SHAPES)
def test_triton_tsra_matches_reference_forward_backward_and_stats(triton_backend, shape, dim, split, dtype):
    x = _rand(shape, dtype).requires_grad_()
    d = dim % len(shape)
    sp = shape[d] // 2 if split is None else split
    stats = torch.zeros(shape[d], device=DEV)
    y = tsra(x, dim, split, stats=stats)
    g = _rand(shape, dtype, 1)
    y.backward(g)
    ref = tsra_forward_reference(x.detach(), d, sp, 5.0, 0.5, 0.7, 1e-12)
    torch.testing.assert_close(y, ref, **TOL[dtype])
    torch.testing.assert_close(x.grad, tsra_backward_reference(x.detach(), g, d, sp, 5.0, 0.5, 0.7, 1e-12),
                               **TOL[dtype])
    # stats: per-channel sum over positions of the fp32 output
    out32 = tsra_forward_reference(x.detach().float(), d, sp, 5.0, 0.5, 0.7, 1e-12)
    expected = out32.square().sum([i for i in range(len(shape)) if i != d])
    torch.testing.assert_close(stats, expected, rtol=TOL[dtype]["rtol"] * 4, atol=TOL[dtype]["atol"] * 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,dim", [((3, 7, 5, 3), 1), ((6, 13), 1), ((2, 5, 33), -1)])
def test_triton_rms_norm_and_channel_sums_match_reference(triton_backend, shape, dim, dtype):
    x = _rand(shape, dtype).requires_grad_()
    d = dim % len(shape)
    y = rms_norm2d(x, dim)
    g = _rand(shape, dtype, 2)
    y.backward(g)
    torch.testing.assert_close(y, rms_norm_forward_reference(x.detach(), d, 1e-6), **TOL[dtype])
    torch.testing.assert_close(x.grad, rms_norm_backward_reference(x.detach(), g, d, 1e-6), **TOL[dtype])
    acc = torch.ones(shape[d], device=DEV)
    channel_sq_sum(x.detach(), dim, out=acc)
    torch.testing.assert_close(acc - 1, channel_sq_sum_reference(x.detach(), d), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(2, 5, 33), (3, 700, 130), (5000, 60)])
def test_torch_channels_last_sum_of_squares_matches_float64_brute_force(shape, dtype):
    """The torch path sums channels-last activations a block of rows at a time (the larger
    shapes span several blocks, one with a short last block)."""
    from secateur.kernels.importance import ROW_BLOCK_ELEMENTS
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    got = channel_sq_sum(x, -1)
    assert got.dtype == torch.float32 and got.shape == (shape[-1],)
    expected = x.double().square().sum(tuple(range(x.dim() - 1)))
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    if x.numel() > ROW_BLOCK_ELEMENTS:
        assert (x.numel() // shape[-1]) % (ROW_BLOCK_ELEMENTS // shape[-1]) != 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5, 37), (33, 17), (2, 3, 45, 70)])
def test_triton_gram_matches_reference_and_is_symmetric(triton_backend, shape, dtype):
    w = _rand(shape, dtype)
    g = gram(w, 0.25)
    assert g.dtype == torch.float32 and g.shape == shape[:-1] + (shape[-2],)
    torch.testing.assert_close(g, gram_reference(w, 0.25), rtol=1e-5, atol=1e-4)
    assert torch.equal(g, g.mT)


def test_reference_gradients_pass_float64_gradcheck():
    x = torch.randn(3, 7, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: tsra(t, 1, 3), (x,))
    assert torch.autograd.gradcheck(lambda t: tsra(t, -1), (torch.randn(5, 6, dtype=torch.float64,
                                                                         requires_grad=True),))
    assert torch.autograd.gradcheck(lambda t: rms_norm2d(t, 1), (x,))


def _block_orthogonal(sizes, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.block_diag(*[torch.linalg.qr(torch.randn(s, s, generator=g, dtype=torch.float64))[0]
                              for s in sizes])


def test_tsra_is_equivariant_to_block_rotations_and_not_to_mixing_ones():
    x = torch.randn(11, 8, dtype=torch.float64)
    r = _block_orthogonal([3, 5], 0)
    torch.testing.assert_close(tsra(x @ r.T, 1, 3), tsra(x, 1, 3) @ r.T, rtol=1e-12, atol=1e-12)
    mix = _block_orthogonal([8], 1)
    assert (tsra(x @ mix.T, 1, 3) - tsra(x, 1, 3) @ mix.T).abs().max() > 1e-2
    # conv layout: rotate the channel axis at every position
    xc = torch.randn(2, 8, 3, 3, dtype=torch.float64)
    rot = lambda t: torch.einsum("ij,bjhw->bihw", r, t)  # noqa: E731
    torch.testing.assert_close(tsra(rot(xc), 1, 3), rot(tsra(xc, 1, 3)), rtol=1e-12, atol=1e-12)


def test_modules_track_statistics_on_the_fly():
    m = TSRA(split=2)
    x1, x2 = torch.randn(4, 5, 3, 3), torch.randn(2, 5, 3, 3)
    m(x1)
    assert m.stats is None                        # off until asked
    m.track_stats(True)
    y1, y2 = m(x1), m(x2)
    torch.testing.assert_close(m.stats, y1.square().sum((0, 2, 3)) + y2.square().sum((0, 2, 3)))
    assert m.stats_count == 4 * 9 + 2 * 9
    m.reset_stats()
    assert m.stats is None and m.stats_count == 0
    m(torch.randn(2, 7, 3, 3))                    # width changed: the buffer follows
    assert m.stats.shape == (7,)
    torch.testing.assert_close(RMSNorm2d()(x1), rms_norm_forward_reference(x1, 1, 1e-6))


def test_bad_arguments_raise_one_clear_error(monkeypatch):
    x = torch.randn(2, 6)
    for call, word in [(lambda: tsra(x, 1, 7), "split"), (lambda: tsra(x, 3), "dim"),
                       (lambda: tsra(x, stats=torch.zeros(5)), "stats"),
                       (lambda: channel_sq_sum(x, out=torch.zeros(6, dtype=torch.float64)), "out"),
                       (lambda: gram(torch.ones(3)), "w"), (lambda: rms_norm2d(x, eps=-1.0), "eps")]:
        with pytest.raises(ValueError, match=word):
            call()
    monkeypatch.setenv("SECATEUR_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="SECATEUR_BACKEND"):
        backend_for(x)
    monkeypatch.setenv("SECATEUR_BACKEND", "torch")
    assert backend_for(x) == "torch"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape,dim,split", SHAPES)
def test_torch_production_path_matches_the_reference(monkeypatch, shape, dim, split, dtype):
    # the CPU path (one buffer, gains saved for the backward) against the unfused reference
    monkeypatch.setenv("SECATEUR_BACKEND", "torch")
    x = _rand(shape, dtype).requires_grad_()
    g = _rand(shape, dtype, 1)
    d = dim % len(shape)
    sp = shape[d] // 2 if split is None else split
    stats = torch.zeros(shape[d], device=DEV)
    y = tsra(x, dim, split, stats=stats)
    y.backward(g)
    tol = TOL.get(dtype, dict(rtol=1e-12, atol=1e-12))
    xd = x.detach()
    torch.testing.assert_close(y, tsra_forward_reference(xd, d, sp, 5.0, 0.5, 0.7, 1e-12), **tol)
    torch.testing.assert_close(x.grad, tsra_backward_reference(xd, g, d, sp, 5.0, 0.5, 0.7, 1e-12), **tol)
    out = tsra_forward_reference(xd.double(), d, sp, 5.0, 0.5, 0.7, 1e-12)
    expected = out.square().sum([i for i in range(len(shape)) if i != d]).float()
    torch.testing.assert_close(stats, expected, rtol=1e-4 if dtype != torch.bfloat16 else 2e-2, atol=1e-4)
    x.grad = None
    y = rms_norm2d(x, dim)
    y.backward(g)
    torch.testing.assert_close(y, rms_norm_forward_reference(xd, d, 1e-6), **tol)
    torch.testing.assert_close(x.grad, rms_norm_backward_reference(xd, g, d, 1e-6), **tol)


def test_bench_command_writes_its_json(tmp_path, capsys):
    import json

    from secateur.cli import main

    out = tmp_path / "k.json"
    assert main(["bench", "kernels", "--quick", "--repeats", "1", "--no-compile", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    ops = {(o["op"], o["device"], o["backend"]) for o in res["ops"]}
    assert {("tsra_fwd_stats", "cpu", "torch"), ("gram", "cpu", "torch")} <= ops
    assert all(o["ms"] > 0 and (o["GB/s"] or o["GFLOP/s"]) > 0 for o in res["ops"])
    assert [o["shape"] for o in res["tsra_stats_overhead_cpu"]] == [[64, 128, 16, 16], [32, 64, 16, 16]]
    assert all("overhead_pct" in o for o in res["tsra_stats_overhead_cpu"])
    assert "tsra_fwd_stats" in capsys.readouterr().out
