"""A small pre-LayerNorm causal transformer (character-level language model) whose MLP hidden
units and attention heads are prunable, layer by layer."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from secateur.pruning.groups import Slot, UnitGroup


class Attention(nn.Module):
    """Multi-head causal self-attention with separate q/k/v projections so heads can be sliced;
    the number of heads follows the projections' width."""

    def __init__(self, d_model: int, n_heads: int, head_dim: int) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.q, self.k, self.v = (nn.Linear(d_model, n_heads * head_dim) for _ in range(3))
        self.heads = nn.Identity()      # (B, T, heads*head_dim): where head statistics are read
        self.out = nn.Linear(n_heads * head_dim, d_model)

    @property
    def n_heads(self) -> int:
        return self.q.out_features // self.head_dim

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
                   for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(self.heads(y.transpose(1, 2).reshape(b, t, -1)))


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, head_dim: int, d_ff: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = Attention(d_model, n_heads, head_dim)
        self.fc1, self.act, self.fc2 = nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


class TinyTransformer(nn.Module):
    """vocab: tokens; n_heads and d_ff: one value for all layers or one per layer (pruned specs)."""

    def __init__(self, vocab: int, d_model: int = 64, n_heads: int | Sequence[int] = 4,
                 n_layers: int = 2, d_ff: int | Sequence[int] = 256, max_len: int = 64,
                 head_dim: int | None = None) -> None:
        super().__init__()
        heads = [n_heads] * n_layers if isinstance(n_heads, int) else list(n_heads)
        ffs = [d_ff] * n_layers if isinstance(d_ff, int) else list(d_ff)
        if len(heads) != n_layers or len(ffs) != n_layers:
            raise ValueError(f"n_heads and d_ff need one value or {n_layers} values")
        if head_dim is None:
            if d_model % heads[0]:
                raise ValueError(f"d_model={d_model} must be divisible by n_heads={heads[0]}")
            head_dim = d_model // heads[0]
        if min(heads) < 1 or min(ffs) < 1 or vocab < 1 or max_len < 1:
            raise ValueError("vocab, max_len, n_heads and d_ff must be positive")
        self.vocab, self.d_model, self.max_len, self.head_dim = vocab, d_model, max_len, head_dim
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, h, head_dim, f) for h, f in zip(heads, ffs))
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, x: Tensor) -> Tensor:
        t = x.shape[1]
        if t > self.max_len:
            raise ValueError(f"sequence length {t} exceeds max_len={self.max_len}")
        h = self.tok(x) + self.pos(torch.arange(t, device=x.device))
        for blk in self.blocks:
            h = blk(h)
        return self.head(self.ln(h))

    def unit_groups(self) -> list[UnitGroup]:
        groups = []
        for i, b in enumerate(self.blocks):
            a, hd = b.attn, self.head_dim
            groups.append(UnitGroup(
                name=f"blocks.{i}.attn", producers=[Slot(p, n, 0, hd) for p in (a.q, a.k, a.v)
                                                    for n in ("weight", "bias")],
                consumers=[Slot(a.out, "weight", 1, hd)], activation=a.heads, act_dim=-1))
            groups.append(UnitGroup(
                name=f"blocks.{i}.mlp", producers=[Slot(b.fc1, "weight", 0), Slot(b.fc1, "bias", 0)],
                consumers=[Slot(b.fc2, "weight", 1)], activation=b.act, act_dim=-1))
        return groups

    def spec(self) -> dict:
        return {"name": "TinyTransformer", "args": {
            "vocab": self.vocab, "d_model": self.d_model, "max_len": self.max_len,
            "n_layers": len(self.blocks), "head_dim": self.head_dim,
            "n_heads": [b.attn.n_heads for b in self.blocks],
            "d_ff": [b.fc1.out_features for b in self.blocks]}}
