"""Exact greedy projective pruning on the GPU: the whole removal loop in one CUDA C kernel.

The torch reference is ``secateur.pruning.projective.greedy(W, r, lam, mode="exact")``; this
module produces the same removal order without a host round trip per step: G = W W^T and
H = (G + lam I)^-1 are built on the device with torch, then one cooperative launch of
``greedy_projective.cu`` runs all r steps (scores, argmin, O(n^2) downdate) on the device.

CuPy is imported lazily, so importing this module works without it; only running or
compile-checking the kernel needs it (``pip install secateur[cuda]``).
"""

from __future__ import annotations

import functools
import math
import numbers
from pathlib import Path
from typing import Any

import numpy as np
import torch

SOURCE_PATH = Path(__file__).with_name("greedy_projective.cu")
KERNEL_NAMES = {torch.float32: "greedy_projective_f32", torch.float64: "greedy_projective_f64"}
BLOCK = 256  # threads per block; must equal GP_BLOCK in the .cu source
LD_MULTIPLE = 32  # rows padded to 32 elements: no cache line is shared by two rows


def _cupy() -> Any:
    try:
        import cupy
    except ImportError as exc:
        raise RuntimeError(
            "the CUDA greedy kernel needs CuPy: pip install 'secateur[cuda]' (cupy-cuda12x)"
        ) from exc
    return cupy


def source() -> str:
    """The CUDA C source of the kernel (both float32 and float64 entry points)."""
    return SOURCE_PATH.read_text()


def compile_check(arch: str = "90") -> bytes:
    """Compile the kernel source to a cubin with nvcc; works on a machine without a GPU.

    arch: compute capability as bare digits ("90" = H100). Returns the cubin bytes, which
    contain both entry points ``greedy_projective_f32`` and ``greedy_projective_f64``.
    """
    if not isinstance(arch, str) or not arch.isdigit():
        raise ValueError(f"arch must be bare digits such as '90', got {arch!r}")
    cupy = _cupy()
    return cupy.cuda.compiler.compile_using_nvcc(source(), arch=arch)


@functools.lru_cache(maxsize=None)
def _module(device_index: int) -> Any:
    # One RawModule per device: NVRTC compiles on first use (CuPy also caches the cubin on disk).
    cupy = _cupy()
    with cupy.cuda.Device(device_index):
        return cupy.RawModule(code=source(), enable_cooperative_groups=True)


def _cupy_stream(cupy: Any, dev: torch.device) -> Any:
    # Launch on torch's current stream so the kernel is ordered after the torch ops making H.
    stream = torch.cuda.current_stream(dev)
    if hasattr(cupy.cuda.Stream, "from_external") and hasattr(stream, "__cuda_stream__"):
        return cupy.cuda.Stream.from_external(stream)
    return cupy.cuda.ExternalStream(stream.cuda_stream, dev.index)


def _launch(cupy: Any, H: torch.Tensor, n: int, ld: int, r: int, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One cooperative launch over H (n, ld) in place; returns order int32 (r,), dist2 float64 (r,)."""
    dev = H.device
    order = torch.empty(r, dtype=torch.int32, device=dev)
    dist2 = torch.empty(r, dtype=torch.float64, device=dev)
    alive = torch.empty(n, dtype=torch.int8, device=dev)
    with torch.cuda.device(dev), cupy.cuda.Device(dev.index), _cupy_stream(cupy, dev):
        kernel = _module(dev.index).get_function(KERNEL_NAMES[H.dtype])
        n_sm = cupy.cuda.Device(dev.index).attributes["MultiProcessorCount"]
        # At most one block per SM (always co-resident) and no block without rows.
        grid = max(1, min(n_sm, -(-n // (BLOCK // 32))))
        part_score = torch.empty(2 * grid, dtype=torch.float64, device=dev)
        part_index = torch.empty(2 * grid, dtype=torch.int32, device=dev)
        barrier = torch.zeros(2, dtype=torch.int32, device=dev)
        bufs = [cupy.from_dlpack(t) for t in (H, order, dist2, alive, part_score, part_index)]
        bar = cupy.from_dlpack(barrier).view(cupy.uint32)
        scalars = (np.int32(n), np.int32(ld), np.int32(r), np.float64(lam))
        kernel((grid,), (BLOCK,), (bufs[0], *scalars, *bufs[1:], bar))
    return order, dist2


def _as_torch_cuda(W: Any) -> torch.Tensor:
    if not isinstance(W, torch.Tensor):
        cupy = _cupy()
        if not isinstance(W, cupy.ndarray):
            raise ValueError(f"W must be a torch tensor or a cupy array, got {type(W).__name__}")
        W = torch.from_dlpack(W)
    if not W.is_cuda:
        W = W.cuda()
    return W


def greedy_order_cuda(
    W: Any,
    r: int,
    lam: float = 1e-3,
    dtype: torch.dtype | None = None,
    return_dist: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact greedy projective removal order, computed in one kernel launch.

    W: (n, m) weight rows (or (n, ...) filters, flattened), a CUDA torch tensor or a cupy
    array; r: number of rows to remove, 0 <= r <= n; lam: ridge lambda >= 0 (lam = 0 needs
    full row rank, n <= m); dtype: working precision, torch.float32 or torch.float64
    (default: float64 for float64 input, else float32).

    Returns order: LongTensor (r,) on W's device, order[t] = row removed at step t (each step
    removes the alive row with the smallest residual d_i, ties -> smallest index). With
    return_dist=True also returns dist: float64 (r,), d of each removed row at its step.
    Raises RuntimeError when CuPy or a CUDA GPU is missing.
    """
    if not isinstance(r, (int, np.integer)) or isinstance(r, bool):
        raise ValueError(f"r must be an int, got {type(r).__name__}")
    if not (isinstance(lam, numbers.Real) and math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam must be a finite float >= 0, got {lam!r}")
    if dtype is not None and dtype not in KERNEL_NAMES:
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    cupy = _cupy()
    if not torch.cuda.is_available() or not cupy.cuda.is_available():
        raise RuntimeError("greedy_order_cuda needs a CUDA GPU (torch and cupy see none)")
    W = _as_torch_cuda(W)
    if W.ndim < 2:
        raise ValueError(f"W must have shape (n, m, ...), got {tuple(W.shape)}")
    W = W.detach().flatten(1)
    n = W.shape[0]
    if not 0 <= r <= n:
        raise ValueError(f"r must be in [0, {n}], got {r}")
    if dtype is None:
        dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    dev = W.device
    if r == 0:
        empty = torch.empty(0, dtype=torch.long, device=dev)
        return (empty, torch.empty(0, dtype=torch.float64, device=dev)) if return_dist else empty

    # H = (W W^T + lam I)^-1 in float64 (no TF32, stable Cholesky), symmetrised so that
    # H_kj == H_jk bitwise; only the downdates run in the working precision.
    W = W.double()
    G = W @ W.mT
    G.diagonal().add_(lam)
    L, info = torch.linalg.cholesky_ex(G)
    if int(info) != 0:
        raise ValueError(
            f"W W^T + lam I is not positive definite (lam={lam}): use lam > 0 for wide or "
            "rank-deficient W"
        )
    Hs = torch.cholesky_inverse(L)
    ld = -(-n // LD_MULTIPLE) * LD_MULTIPLE
    H = torch.zeros(n, ld, dtype=dtype, device=dev)
    H[:, :n] = (0.5 * (Hs + Hs.mT)).to(dtype)

    order, dist2 = _launch(cupy, H, n, ld, r, lam)
    order = order.long()
    if return_dist:
        return order, dist2.clamp_min(0).sqrt()
    return order
