"""Batched Gram matrix G = W W^T (+ lam I) with fp32 accumulation: the projective criterion's
inner product of units and CoB's uncentred second moments of activations."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from secateur.kernels._backend import acc_dtype, backend_for


def gram_reference(w: Tensor, lam: float = 0.0) -> Tensor:
    """(..., n, m) -> (..., n, n) = w @ w.mT + lam*I; fp16/bf16/fp32 in, fp32 out; float64 stays."""
    w = w.to(acc_dtype(w))
    g = w @ w.mT
    if lam:
        g.diagonal(dim1=-2, dim2=-1).add_(lam)
    return g


def gram(w: Tensor, lam: float = 0.0) -> Tensor:
    """Batched Gram of the rows of `w` (..., n, m): (..., n, n) = w w^T + lam*I, accumulated in
    fp32 (float64 for float64 input). No autograd: importance is computed under no_grad."""
    if w.dim() < 2:
        raise ValueError(f"w must have shape (..., n, m), got {tuple(w.shape)}")
    if backend_for(w) == "triton":
        return _gram_triton(w, lam)
    return gram_reference(w, lam)


@triton.jit
def _gram_kernel(w_ptr, g_ptr, N, M, lam, stride_b, stride_n, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    # program (b, ti, tj) computes tile G[ti, tj] for tj >= ti and mirrors it to G[tj, ti]
    b = tl.program_id(0)
    ti = tl.program_id(1)
    tj = tl.program_id(2)
    if tj < ti:
        return
    rows_i = ti * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_j = tj * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N, BLOCK_N), dtype=tl.float32)
    base = w_ptr + b * stride_b
    for k0 in range(0, M, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(base + rows_i[:, None] * stride_n + ks[None, :],
                    mask=(rows_i[:, None] < N) & (ks[None, :] < M), other=0.0).to(tl.float32)
        c = tl.load(base + rows_j[:, None] * stride_n + ks[None, :],
                    mask=(rows_j[:, None] < N) & (ks[None, :] < M), other=0.0).to(tl.float32)
        acc += tl.dot(a, tl.trans(c), input_precision="ieee")
    acc += tl.where(rows_i[:, None] == rows_j[None, :], lam, 0.0)
    m = (rows_i[:, None] < N) & (rows_j[None, :] < N)
    out = g_ptr + b * N * N
    tl.store(out + rows_i[:, None] * N + rows_j[None, :], acc, mask=m)
    tl.store(out + rows_j[None, :] * N + rows_i[:, None], acc, mask=m)


def _gram_triton(w: Tensor, lam: float) -> Tensor:
    if w.dtype == torch.float64:     # no fp64 tensor-core path: the reference is exact and fast
        return gram_reference(w, lam)
    batch_shape, n, m = w.shape[:-2], w.shape[-2], w.shape[-1]
    w3 = w.contiguous().view(-1, n, m)
    g = torch.empty(w3.shape[0], n, n, dtype=torch.float32, device=w.device)
    block_n, block_k = 32, 32
    tiles = -(-n // block_n)
    _gram_kernel[(w3.shape[0], tiles, tiles)](w3, g, n, m, float(lam), n * m, m,
                                                BLOCK_N=block_n, BLOCK_K=block_k)
    return g.view(*batch_shape, n, n)
