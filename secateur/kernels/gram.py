"""Batched Gram matrix G = W W^T (+ lam I) with fp32 accumulation: the projective criterion's
inner product of units and CoB's uncentred second moments of activations."""
from __future__ import annotations

import torch
from torch import Tensor

from secateur.kernels._backend import backend_for


def gram_reference(w: Tensor, lam: float = 0.0) -> Tensor:
    """(..., n, m) -> (..., n, n) = w @ w.mT + lam*I; fp16/bf16/fp32 in, fp32 out; float64 stays."""
    acc = torch.float64 if w.dtype == torch.float64 else torch.float32
    w = w.to(acc)
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


def _gram_triton(w: Tensor, lam: float) -> Tensor:
    raise NotImplementedError("the Triton gram kernel is not written yet")
