"""Per-channel sum of squares of any activation: activation-magnitude importance accumulated on
the fly (TSRA fuses the same sum into its forward; this op serves every other activation)."""
from __future__ import annotations

import torch
from torch import Tensor

from secateur.kernels._backend import backend_for, channel_dim, reduce_dims


def channel_sq_sum_reference(x: Tensor, dim: int = 1) -> Tensor:
    """fp32 (C,) sum over every axis but `dim` of x**2."""
    dim = channel_dim(x, dim)
    xf = x.detach().float()
    if x.dim() == 1:
        return xf.square()
    return torch.linalg.vector_norm(xf, dim=reduce_dims(x, dim)).square()


def channel_sq_sum(x: Tensor, dim: int = 1, out: Tensor | None = None) -> Tensor:
    """Per-channel sum of squares of `x` over every axis except `dim`, fp32 (C,).
    With `out` (fp32, (C,)) the sum is added into it in place and `out` is returned."""
    dim = channel_dim(x, dim)
    c = x.shape[dim]
    if out is not None and (out.shape != (c,) or out.dtype != torch.float32):
        raise ValueError(f"out must be a float32 tensor of shape ({c},), got {out.dtype} {tuple(out.shape)}")
    if backend_for(x) == "triton":
        s = _channel_sq_sum_triton(x, dim)
    else:
        s = channel_sq_sum_reference(x, dim)
    if out is None:
        return s
    return out.add_(s)


def _channel_sq_sum_triton(x: Tensor, dim: int) -> Tensor:
    raise NotImplementedError("the Triton channel_sq_sum kernel is not written yet")
