"""RMS normalisation over the channel axis without affine (CoB's rotation-invariant norm):
y = x / sqrt(mean_c x^2 + eps) at every position, as one autograd node (so Torch-Pruning's
DependencyGraph sees a channel pass-through)."""
from __future__ import annotations

import torch
from torch import Tensor

from secateur.kernels._backend import backend_for, channel_dim


def rms_norm_forward_reference(x: Tensor, dim: int, eps: float) -> Tensor:
    xf = x if x.dtype == torch.float64 else x.float()
    inv = torch.rsqrt(xf.square().mean(dim, keepdim=True) + eps)
    return (xf * inv).to(x.dtype)


def rms_norm_backward_reference(x: Tensor, grad_out: Tensor, dim: int, eps: float) -> Tensor:
    """dL/dx = inv (g - y <g, y>/C) with y = x inv, inv = (mean x^2 + eps)^-1/2."""
    wide = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf, gf = x.to(wide), grad_out.to(wide)
    inv = torch.rsqrt(xf.square().mean(dim, keepdim=True) + eps)
    y = xf * inv
    return (inv * (gf - y * (gf * y).mean(dim, keepdim=True))).to(x.dtype)


def _rms_norm_triton_forward(x: Tensor, dim: int, eps: float) -> Tensor:
    raise NotImplementedError("the Triton RMSNorm forward is not written yet")


def _rms_norm_triton_backward(x: Tensor, grad_out: Tensor, dim: int, eps: float) -> Tensor:
    raise NotImplementedError("the Triton RMSNorm backward is not written yet")


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, dim: int, eps: float) -> Tensor:
        ctx.save_for_backward(x)
        ctx.args = (dim, eps)
        if backend_for(x) == "triton":
            return _rms_norm_triton_forward(x, dim, eps)
        return rms_norm_forward_reference(x, dim, eps)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (x,) = ctx.saved_tensors
        dim, eps = ctx.args
        if backend_for(x) == "triton":
            return _rms_norm_triton_backward(x, grad_out.contiguous(), dim, eps), None, None
        return rms_norm_backward_reference(x, grad_out, dim, eps), None, None


def rms_norm2d(x: Tensor, dim: int = 1, eps: float = 1e-6) -> Tensor:
    """x / sqrt(mean over channel axis `dim` of x^2 + eps), no affine."""
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    return RMSNormFunction.apply(x, channel_dim(x, dim), float(eps))
