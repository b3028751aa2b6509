"""nn.MultiheadAttention after its heads were cut.

torch's forward requires num_heads * head_dim == embed_dim (the inner width equals the input
width), so a module that lost heads, or whose input width was cut apart from its heads, runs this
forward instead: the same parameters (in_proj_weight rows [q | k | v], each num_heads * head_dim
wide; out_proj), the same state_dict keys and the same arguments, computed in plain torch
(scaled dot-product attention, Vaswani et al. 2017). Supported: fused q/k/v weights (the default
nn.MultiheadAttention), batch_first either way, key_padding_mask and attn_mask (bool or additive),
need_weights with average_attn_weights, is_causal, dropout.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _additive(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


class PrunedMultiheadAttention(nn.MultiheadAttention):
    """nn.MultiheadAttention whose inner width (num_heads * head_dim) may differ from embed_dim."""

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None,
                average_attn_weights: bool = True, is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        """Shapes as nn.MultiheadAttention: (L, N, E) or (N, L, E) with batch_first; returns the
        output (same layout, E = out_proj's width) and the attention weights (N, L, S), or per
        head (N, heads, L, S) when average_attn_weights is False, or None."""
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        if not self.batch_first or not batched:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        n, tq, _ = query.shape
        ts = key.shape[1]
        h, hd = self.num_heads, self.head_dim
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None,) * 3
        q = F.linear(query, w_q, b_q).view(n, tq, h, hd).transpose(1, 2)
        k = F.linear(key, w_k, b_k).view(n, ts, h, hd).transpose(1, 2)
        v = F.linear(value, w_v, b_v).view(n, ts, h, hd).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd)                 # (N, h, L, S)
        mask = _additive(attn_mask, scores.dtype)
        if mask is not None:
            scores = scores + (mask.view(n, h, tq, ts) if mask.dim() == 3 else mask)
        elif is_causal:
            causal = torch.ones(tq, ts, dtype=torch.bool, device=scores.device).triu(1)
            scores = scores + _additive(causal, scores.dtype)
        pad = _additive(key_padding_mask, scores.dtype)
        if pad is not None:
            scores = scores + pad.view(n, 1, 1, ts)
        weights = torch.softmax(scores, -1)
        attn = F.dropout(weights, self.dropout, self.training)
        out = self.out_proj((attn @ v).transpose(1, 2).reshape(n, tq, h * hd))
        if not self.batch_first or not batched:
            out = out.transpose(0, 1)
        if not batched:
            out = out.squeeze(1)
        if not need_weights:
            return out, None
        weights = weights.mean(1) if average_attn_weights else weights
        return out, (weights if batched else weights.squeeze(0))
