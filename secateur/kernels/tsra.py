"""Two-subspace radial activation (logistic TSRA, METHODS A.1) as one autograd node.

Channels split into U = [0, split) and V = [split, C). At each position (all other axes),
    r = |x_U| / (|x| + eps),  g_U = sigmoid(a (r - b_u)),  g_V = sigmoid(a (r - b_v)),
    out = [g_U x_U, g_V x_V].
The gains depend only on the two subspace norms, so tsra(R x) = R tsra(x) for any block-diagonal
orthogonal R: the property change-of-basis pruning needs. Being a single autograd Function also
lets Torch-Pruning's DependencyGraph treat it as a channel pass-through.

With `stats` (fp32 (C,)) the forward also adds the per-channel sum of out**2: activation-magnitude
importance at no extra launch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from secateur.kernels._backend import acc_dtype, as_3d, backend_for, channel_dim, channel_tiles
from secateur.kernels._tiles import channel_tile
from secateur.kernels.importance import sq_sum_3d


def _gains(x: Tensor, dim: int, split: int, a: float, b_u: float, b_v: float, eps: float):
    """Per-position gains g_U, g_V and the pieces the backward needs (fp32 or wider)."""
    xu, xv = x.narrow(dim, 0, split), x.narrow(dim, split, x.shape[dim] - split)
    su2 = xu.square().sum(dim, keepdim=True)
    sv2 = xv.square().sum(dim, keepdim=True)
    su, s = su2.sqrt(), (su2 + sv2).sqrt()
    return (*_gains_from_norms(su, s, a, b_u, b_v, eps), su, s)


def _gains_from_norms(su: Tensor, s: Tensor, a: float, b_u: float, b_v: float,
                      eps: float) -> tuple[Tensor, Tensor]:
    """g_U, g_V from the per-position norms |x_U| and |x|."""
    r = su / (s + eps)
    return torch.sigmoid(a * (r - b_u)), torch.sigmoid(a * (r - b_v))


def tsra_forward_reference(x: Tensor, dim: int, split: int, a: float, b_u: float, b_v: float,
                           eps: float) -> Tensor:
    """The TSRA output, computed in fp32 (float64 stays float64), returned in x's dtype."""
    xf = x.to(acc_dtype(x))
    gu, gv, _, _ = _gains(xf, dim, split, a, b_u, b_v, eps)
    c = x.shape[dim]
    out = torch.cat([xf.narrow(dim, 0, split) * gu, xf.narrow(dim, split, c - split) * gv], dim)
    return out.to(x.dtype)


def tsra_backward_reference(x: Tensor, grad_out: Tensor, dim: int, split: int, a: float,
                            b_u: float, b_v: float, eps: float) -> Tensor:
    """dL/dx of TSRA given dL/dout, one pass over the channels of each position.

    With A = <gout_U, x_U>, B = <gout_V, x_V> and G = a (A g_U(1-g_U) + B g_V(1-g_V)) = dL/dr:
        dL/dx_U = g_U gout_U + G x_U (1/(s_U (s+eps)) - s_U/(s (s+eps)^2))
        dL/dx_V = g_V gout_V - G x_V s_U/(s (s+eps)^2)
    (terms with s_U = 0 or s = 0 are taken as 0: r has a kink there)."""
    wide = acc_dtype(x)
    xf, gf = x.to(wide), grad_out.to(wide)
    c = x.shape[dim]
    gu, gv, su, s = _gains(xf, dim, split, a, b_u, b_v, eps)
    xu, xv = xf.narrow(dim, 0, split), xf.narrow(dim, split, c - split)
    gou, gov = gf.narrow(dim, 0, split), gf.narrow(dim, split, c - split)
    cu, cv = _input_coefs((gou * xu).sum(dim, keepdim=True), (gov * xv).sum(dim, keepdim=True),
                          gu, gv, su, s, a, eps)
    return torch.cat([gu * gou + cu * xu, gv * gov + cv * xv], dim).to(x.dtype)


def _input_coefs(big_a: Tensor, big_b: Tensor, gu: Tensor, gv: Tensor, su: Tensor, s: Tensor,
                 a: float, eps: float) -> tuple[Tensor, Tensor]:
    """Per-position c_U, c_V with dL/dx_Z = g_Z gout_Z + c_Z x_Z (see tsra_backward_reference)."""
    tiny = torch.finfo(su.dtype).tiny
    g = a * (big_a * gu * (1 - gu) + big_b * gv * (1 - gv))
    se = s + eps
    inv_su = torch.where(su > 0, 1.0 / su.clamp_min(tiny), torch.zeros_like(su))
    inv_s = torch.where(s > 0, 1.0 / s.clamp_min(tiny), torch.zeros_like(s))
    cross = su * inv_s / (se * se)               # -dr/d|x| part shared by both subspaces
    return g * (inv_su / se - cross), -g * cross


# ---- Triton: one program holds BLOCK_P positions x all C channels (position p = o*INNER + i of
# the (outer, C, inner) layout), so each norm, gain and backward reduction is one pass in registers.

@triton.jit
def _gains_tl(x, cmask, in_u, a, b_u, b_v, eps):
    xu = tl.where(in_u & cmask, x, 0.0)
    xv = tl.where((~in_u) & cmask, x, 0.0)
    su2 = tl.sum(xu * xu, axis=1)
    sv2 = tl.sum(xv * xv, axis=1)
    su = tl.sqrt(su2)
    s = tl.sqrt(su2 + sv2)
    r = su / (s + eps)
    gu = tl.sigmoid(a * (r - b_u))
    gv = tl.sigmoid(a * (r - b_v))
    return gu, gv, su, s

@triton.jit
def _tsra_fwd_kernel(x_ptr, out_ptr, stats_ptr, P, C, INNER, split, a, b_u, b_v, eps,
        HAS_STATS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    offs, m, ch, cmask = channel_tile(P, C, INNER, BLOCK_P, BLOCK_C)
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    in_u = (ch < split)[None, :]
    gu, gv, su, s = _gains_tl(x, cmask[None, :], in_u, a, b_u, b_v, eps)
    out = x * tl.where(in_u, gu[:, None], gv[:, None])
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=m)
    if HAS_STATS:
        sq = tl.where(m, out * out, 0.0)
        tl.atomic_add(stats_ptr + ch, tl.sum(sq, axis=0), mask=cmask)

@triton.jit
def _tsra_bwd_kernel(x_ptr, g_ptr, dx_ptr, P, C, INNER, split, a, b_u, b_v, eps,
        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    offs, m, ch, cmask = channel_tile(P, C, INNER, BLOCK_P, BLOCK_C)
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    go = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
    in_u = (ch < split)[None, :]
    gu, gv, su, s = _gains_tl(x, cmask[None, :], in_u, a, b_u, b_v, eps)
    big_a = tl.sum(tl.where(in_u, go * x, 0.0), axis=1)
    big_b = tl.sum(tl.where(in_u, 0.0, go * x), axis=1)
    g = a * (big_a * gu * (1 - gu) + big_b * gv * (1 - gv))
    se = s + eps
    inv_su = tl.where(su > 0, 1.0 / tl.maximum(su, 1e-30), 0.0)
    inv_s = tl.where(s > 0, 1.0 / tl.maximum(s, 1e-30), 0.0)
    cross = su * inv_s / (se * se)
    coef = tl.where(in_u, (g * (inv_su / se - cross))[:, None], (-g * cross)[:, None])
    dx = tl.where(in_u, gu[:, None], gv[:, None]) * go + coef * x
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=m)


def _launch_args(x: Tensor, dim: int):
    x3 = as_3d(x, dim)
    o, c, inner = x3.shape
    block_c, block_p = channel_tiles(c)
    positions = o * inner
    grid = (max(1, -(-positions // block_p)),)
    return x3, c, inner, positions, block_c, block_p, grid


def _tsra_triton_forward(x: Tensor, dim: int, split: int, a: float, b_u: float, b_v: float,
                         eps: float, stats: Tensor | None) -> Tensor:
    x3, c, inner, positions, block_c, block_p, grid = _launch_args(x, dim)
    out = torch.empty_like(x3)
    _tsra_fwd_kernel[grid](x3, out, stats if stats is not None else out, positions, c, inner,
                           split, a, b_u, b_v, eps, HAS_STATS=stats is not None,
                           BLOCK_P=block_p, BLOCK_C=block_c)
    return out.view(x.shape)


def _tsra_triton_backward(x: Tensor, grad_out: Tensor, dim: int, split: int, a: float, b_u: float,
                          b_v: float, eps: float) -> Tensor:
    x3, c, inner, positions, block_c, block_p, grid = _launch_args(x, dim)
    g3 = as_3d(grad_out, dim)
    dx = torch.empty_like(x3)
    _tsra_bwd_kernel[grid](x3, g3, dx, positions, c, inner, split, a, b_u, b_v, eps,
                           BLOCK_P=block_p, BLOCK_C=block_c)
    return dx.view(x.shape)


def tsra_forward_torch(x: Tensor, dim: int, split: int, a: float, b_u: float, b_v: float,
                       eps: float, stats: Tensor | None) -> tuple[Tensor, tuple[Tensor, ...]]:
    """The CPU production forward: the reference's function in fewer memory passes and one
    activation-sized allocation. x^2 is formed once, into the buffer that then receives the
    output, and serves the subspace norms (a reduction over channels). The statistics take one
    more read: a reduction over the contiguous positions of the output (conv), or a GEMV of g^2
    against x^2 before it is overwritten (linear: no contiguous positions to reduce).

    Returns (out in x's dtype, (s_U, s)): the per-position norms, each (outer, 1, inner) in
    fp32/fp64, from which the production backward rebuilds the gains."""
    x3 = as_3d(x, dim).to(acc_dtype(x))                     # (outer, C, inner)
    c, inner = x3.shape[1], x3.shape[2]
    buf = x3.square()
    su2 = buf[:, :split].sum(1, keepdim=True)
    su = su2.sqrt()
    s = (su2 + buf[:, split:].sum(1, keepdim=True)).sqrt_()
    gu, gv = _gains_from_norms(su, s, a, b_u, b_v, eps)     # (outer, 1, inner)
    if stats is not None and inner == 1:
        for lo, hi, g in ((0, split, gu), (split, c, gv)):
            stats[lo:hi] += (g.square().view(1, -1) @ buf[:, lo:hi, 0]).view(-1).to(stats.dtype)
    torch.mul(x3[:, :split], gu, out=buf[:, :split])         # x^2 is no longer needed
    torch.mul(x3[:, split:], gv, out=buf[:, split:])
    if stats is not None and inner > 1:
        stats += sq_sum_3d(buf).to(stats.dtype)
    return buf.view(x.shape).to(x.dtype), (su, s)


def tsra_backward_torch(x: Tensor, grad_out: Tensor, dim: int, split: int, a: float, b_u: float,
                        b_v: float, eps: float, norms: tuple[Tensor, Tensor]) -> Tensor:
    """The CPU production backward (same formula as `tsra_backward_reference`) from the forward's
    per-position norms (s_U, s): two reductions over channels and one activation-sized
    buffer that holds gout*x, then dL/dx."""
    su, s = norms
    gu, gv = _gains_from_norms(su, s, a, b_u, b_v, eps)
    x3, g3 = as_3d(x, dim).to(su.dtype), as_3d(grad_out, dim).to(su.dtype)
    buf = g3 * x3
    cu, cv = _input_coefs(buf[:, :split].sum(1, keepdim=True), buf[:, split:].sum(1, keepdim=True),
                          gu, gv, su, s, a, eps)
    torch.mul(g3[:, :split], gu, out=buf[:, :split]).addcmul_(x3[:, :split], cu)   # gout*x is spent
    torch.mul(g3[:, split:], gv, out=buf[:, split:]).addcmul_(x3[:, split:], cv)
    return buf.view(x.shape).to(x.dtype)


class TSRAFunction(torch.autograd.Function):
    """One autograd node for TSRA. The Triton path saves only x and recomputes the gains in its
    backward kernel; the torch path also keeps the two per-position subspace norms (2/C of x's size)."""

    @staticmethod
    def forward(ctx, x: Tensor, dim: int, split: int, a: float, b_u: float, b_v: float,
                eps: float, stats: Tensor | None) -> Tensor:
        ctx.args = (dim, split, a, b_u, b_v, eps)
        if backend_for(x) == "triton":
            ctx.save_for_backward(x)
            return _tsra_triton_forward(x, dim, split, a, b_u, b_v, eps, stats)
        out, saved = tsra_forward_torch(x.detach(), dim, split, a, b_u, b_v, eps, stats)
        ctx.save_for_backward(x, *saved)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, *saved = ctx.saved_tensors
        dim, split, a, b_u, b_v, eps = ctx.args
        if not saved:
            gx = _tsra_triton_backward(x, grad_out.contiguous(), dim, split, a, b_u, b_v, eps)
        else:
            gx = tsra_backward_torch(x, grad_out, dim, split, a, b_u, b_v, eps, (saved[0], saved[1]))
        return gx, None, None, None, None, None, None, None


def tsra(x: Tensor, dim: int = 1, split: int | None = None, a: float = 5.0, b_u: float = 0.5,
         b_v: float = 0.7, eps: float = 1e-12, stats: Tensor | None = None) -> Tensor:
    """Logistic TSRA of `x` over channel axis `dim` (U = first `split` channels, default C//2).
    `stats`: optional fp32 (C,) buffer; the forward adds sum over positions of out**2 into it."""
    dim = channel_dim(x, dim)
    c = x.shape[dim]
    split = c // 2 if split is None else int(split)
    if not 0 <= split <= c:
        raise ValueError(f"split must be in [0, {c}] for {c} channels, got {split}")
    if stats is not None and (stats.shape != (c,) or stats.dtype != torch.float32):
        raise ValueError(f"stats must be a float32 tensor of shape ({c},), got "
                         f"{stats.dtype} {tuple(stats.shape)}")
    return TSRAFunction.apply(x, dim, split, float(a), float(b_u), float(b_v), float(eps), stats)
