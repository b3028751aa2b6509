"""Change of basis (METHODS A.3-A.5): per TSRA subspace, the eigenvectors of the uncentred second
moment of the post-activations give a rotation that concentrates activation energy in the first
units. TSRA is equivariant to block-orthogonal rotations and RMSNorm without affine is invariant,
so the rotation is absorbed exactly into the producer rows and consumer columns; afterwards a
unit's activation magnitude is the square root of its eigenvalue."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from secateur.kernels import gram


class SubspaceMoments:
    """Streaming H_Z^T H_Z per subspace (sizes: units per subspace, in order), float64. The
    activations are never stored: each batch adds its Gram matrix."""

    def __init__(self, sizes: list[int]) -> None:
        if any(s < 0 for s in sizes) or not sizes:
            raise ValueError(f"sizes must be non-negative subspace widths, got {sizes}")
        self.sizes = list(sizes)
        self.moments = [torch.zeros(s, s, dtype=torch.float64) for s in sizes]
        self.count = torch.zeros((), dtype=torch.float64)

    def update(self, h: Tensor) -> None:
        """h (M, d): M activation vectors of d = sum(sizes) units."""
        if h.dim() != 2 or h.shape[1] != sum(self.sizes):
            raise ValueError(f"h must be (M, {sum(self.sizes)}), got {tuple(h.shape)}")
        start = 0
        for i, s in enumerate(self.sizes):
            if s:
                block = h[:, start:start + s].detach().T.contiguous()
                self.moments[i] += gram(block).to(torch.float64).cpu()
            start += s
        self.count += h.shape[0]

    def tensors(self) -> list[Tensor]:
        """The additive accumulators (sum them over ranks in place)."""
        return self.moments + [self.count]

    def state_dict(self) -> dict[str, Any]:
        return {"sizes": self.sizes, "moments": [m.clone() for m in self.moments],
                "count": self.count.clone()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if list(sd["sizes"]) != self.sizes:
            raise ValueError(f"state: sizes {sd['sizes']} do not match {self.sizes}")
        for m, v in zip(self.moments, sd["moments"]):
            m.copy_(v)
        self.count.copy_(sd["count"])


def rotations(moments: SubspaceMoments) -> list[tuple[Tensor, Tensor]]:
    """Per subspace (R, eigvals): eigenvalues descending, R = eigenvectors^T (rows are principal
    directions), so rotated unit j carries eigenvalue j of the subspace's second moment."""
    out = []
    for m in moments.moments:
        if m.shape[0] == 0:
            out.append((m.clone(), m.new_zeros(0)))
            continue
        vals, vecs = torch.linalg.eigh(m)
        order = torch.argsort(vals, descending=True)
        out.append((vecs[:, order].T.contiguous(), vals[order]))
    return out


def rotate_producer(weight: Tensor, bias: Tensor | None, R: Tensor, start: int) -> tuple[Tensor, Tensor | None]:
    """New producer (rows start..start+d rotated: W_Z <- R W_Z, b_Z <- R b_Z); conv filters are
    flattened for the product."""
    d = R.shape[0]
    w = weight.detach().clone()
    flat = w.reshape(w.shape[0], -1)
    flat[start:start + d] = R.to(w.dtype) @ flat[start:start + d]
    b = None
    if bias is not None:
        b = bias.detach().clone()
        b[start:start + d] = R.to(b.dtype) @ b[start:start + d]
    return w, b


def rotate_consumer(weight: Tensor, R: Tensor, start: int) -> Tensor:
    """New consumer with input columns start..start+d multiplied by R^T (axis 1; conv kernels
    keep their spatial layout)."""
    d = R.shape[0]
    w = weight.detach().clone()
    cols = w.movedim(1, -1)                     # (out, [kh, kw,] in)
    cols[..., start:start + d] = cols[..., start:start + d] @ R.T.to(w.dtype)
    return cols.movedim(-1, 1).contiguous()
