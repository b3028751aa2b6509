"""RMS normalisation over the channel axis without affine (CoB's rotation-invariant norm):
y = x / sqrt(mean_c x^2 + eps) at every position, as one autograd node (so Torch-Pruning's
DependencyGraph sees a channel pass-through)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from secateur.kernels._backend import acc_dtype, as_3d, backend_for, channel_dim, channel_tiles
from secateur.kernels._tiles import channel_tile


def rms_norm_forward_reference(x: Tensor, dim: int, eps: float) -> Tensor:
    xf = x.to(acc_dtype(x))
    inv = torch.rsqrt(xf.square().mean(dim, keepdim=True) + eps)
    return (xf * inv).to(x.dtype)


def rms_norm_backward_reference(x: Tensor, grad_out: Tensor, dim: int, eps: float) -> Tensor:
    """dL/dx = inv (g - y <g, y>/C) with y = x inv, inv = (mean x^2 + eps)^-1/2."""
    xf, gf = x.to(acc_dtype(x)), grad_out.to(acc_dtype(x))
    inv = torch.rsqrt(xf.square().mean(dim, keepdim=True) + eps)
    y = xf * inv
    return (inv * (gf - y * (gf * y).mean(dim, keepdim=True))).to(x.dtype)


# ---- Triton: BLOCK_P positions x all C channels per program, as in tsra.py.

@triton.jit
def _rms_fwd_kernel(x_ptr, out_ptr, P, C, INNER, eps, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    offs, m, ch, cmask = channel_tile(P, C, INNER, BLOCK_P, BLOCK_C)
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / C + eps)
    tl.store(out_ptr + offs, (x * inv[:, None]).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _rms_bwd_kernel(x_ptr, g_ptr, dx_ptr, P, C, INNER, eps, BLOCK_P: tl.constexpr,
                    BLOCK_C: tl.constexpr):
    offs, m, ch, cmask = channel_tile(P, C, INNER, BLOCK_P, BLOCK_C)
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / C + eps)
    y = x * inv[:, None]
    gy = tl.sum(g * y, axis=1) / C
    dx = inv[:, None] * (g - y * gy[:, None])
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=m)


def _grid(x: Tensor, dim: int):
    x3 = as_3d(x, dim)
    o, c, inner = x3.shape
    block_c, block_p = channel_tiles(c)
    return x3, c, inner, o * inner, block_c, block_p, (max(1, -(-(o * inner) // block_p)),)


def _rms_norm_triton_forward(x: Tensor, dim: int, eps: float) -> Tensor:
    x3, c, inner, positions, block_c, block_p, grid = _grid(x, dim)
    out = torch.empty_like(x3)
    _rms_fwd_kernel[grid](x3, out, positions, c, inner, eps, BLOCK_P=block_p, BLOCK_C=block_c)
    return out.view(x.shape)


def _rms_norm_triton_backward(x: Tensor, grad_out: Tensor, dim: int, eps: float) -> Tensor:
    x3, c, inner, positions, block_c, block_p, grid = _grid(x, dim)
    dx = torch.empty_like(x3)
    _rms_bwd_kernel[grid](x3, as_3d(grad_out, dim), dx, positions, c, inner, eps,
                          BLOCK_P=block_p, BLOCK_C=block_c)
    return dx.view(x.shape)


def rms_norm_forward_torch(x: Tensor, dim: int, eps: float) -> tuple[Tensor, Tensor]:
    """The CPU production forward: x^2 goes into the buffer that then receives the output (one
    activation-sized allocation). Returns (y in x's dtype, inv (outer, 1, inner) fp32/fp64)."""
    x3 = as_3d(x, dim).to(acc_dtype(x))
    buf = x3.square()
    inv = buf.sum(1, keepdim=True).div_(x3.shape[1]).add_(eps).rsqrt_()
    return torch.mul(x3, inv, out=buf).view(x.shape).to(x.dtype), inv


def rms_norm_backward_torch(x: Tensor, grad_out: Tensor, dim: int, inv: Tensor) -> Tensor:
    """The CPU production backward from the forward's inv: with <g, x> the per-position sum over
    channels, dL/dx = inv g - x inv^3 <g, x> / C (the reference's formula with y = x inv)."""
    x3, g3 = as_3d(x, dim).to(inv.dtype), as_3d(grad_out, dim).to(inv.dtype)
    buf = g3 * x3
    k = buf.sum(1, keepdim=True).mul_(inv.pow(3)).div_(-x3.shape[1])
    return torch.mul(g3, inv, out=buf).addcmul_(x3, k).view(x.shape).to(x.dtype)


class RMSNormFunction(torch.autograd.Function):
    """One autograd node; the torch path also keeps the per-position inv (1/C of x's size)."""

    @staticmethod
    def forward(ctx, x: Tensor, dim: int, eps: float) -> Tensor:
        ctx.args = (dim, eps)
        if backend_for(x) == "triton":
            ctx.save_for_backward(x)
            return _rms_norm_triton_forward(x, dim, eps)
        y, inv = rms_norm_forward_torch(x.detach(), dim, eps)
        ctx.save_for_backward(x, inv)
        return y

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, *inv = ctx.saved_tensors
        dim, eps = ctx.args
        if not inv:
            return _rms_norm_triton_backward(x, grad_out.contiguous(), dim, eps), None, None
        return rms_norm_backward_torch(x, grad_out, dim, inv[0]), None, None


def rms_norm2d(x: Tensor, dim: int = 1, eps: float = 1e-6) -> Tensor:
    """x / sqrt(mean over channel axis `dim` of x^2 + eps), no affine."""
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    return RMSNormFunction.apply(x, channel_dim(x, dim), float(eps))
