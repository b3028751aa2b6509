"""Attention modules, pruned in whole heads.

An attention module is recognised by its projections (children named like Hugging Face's and
timm's: separate `q_proj`/`k_proj`/`v_proj` or `query`/`key`/`value`, or a fused `qkv`/`c_attn`,
and an output projection `o_proj`/`out_proj`/`proj`/`dense`/`c_proj` when it lives inside) and
its head size (an attribute `head_dim`/`attention_head_size`/..., or the width over a head-count
attribute). A unit is one key/value head with the query heads that read it (grouped-query
attention: `num_heads / num_key_value_heads` query heads per KV head; plain multi-head attention:
one query head), so head_dim and the query/KV ratio never change. After a cut the module's own
head-count and width attributes are set from its weights, so its forward still works.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn

_Q = ("q_proj", "query", "q", "to_q", "wq", "q_lin")
_K = ("k_proj", "key", "k", "to_k", "wk", "k_lin")
_V = ("v_proj", "value", "v", "to_v", "wv", "v_lin")
_QKV = ("qkv", "c_attn", "Wqkv", "query_key_value", "qkv_proj", "in_proj", "to_qkv")
_O = ("o_proj", "out_proj", "proj", "dense", "c_proj", "wo", "out_lin", "to_out", "merge")
_HEAD_DIM = ("head_dim", "attention_head_size", "head_size", "hd", "d_head", "dim_head")
_HEADS = ("num_heads", "num_attention_heads", "n_head", "n_heads", "heads", "num_head", "nheads")
_KV_HEADS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "n_kv_head")
_WIDTH = ("all_head_size", "split_size", "inner_dim", "attn_dim")


def _proj_types() -> tuple[type, ...]:
    types: list[type] = [nn.Linear]
    try:
        from transformers.pytorch_utils import Conv1D
        types.append(Conv1D)
    except Exception:
        pass
    return tuple(types)


def _out_axis(m: nn.Module) -> int:
    """Axis of a projection's weight that indexes its outputs (HF Conv1D stores (in, out))."""
    return 0 if isinstance(m, nn.Linear) else 1


def _width(m: nn.Module) -> int:
    return m.weight.shape[_out_axis(m)]


def _child(m: nn.Module, names: tuple[str, ...]) -> str | None:
    kinds = _proj_types()
    for n in names:
        c = getattr(m, n, None)
        if isinstance(c, kinds):
            return n
    return None


def _int_attr(m: nn.Module, names: tuple[str, ...]) -> tuple[str, int] | None:
    for n in names:
        v = getattr(m, n, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return n, v
    return None


@dataclass
class AttentionSpec:
    """Where an attention module keeps its heads. Names are child names of the module.
    `q`, `k`, `v` are set for separate projections, `qkv` for a fused one (rows [q | k | v]);
    `o` is None when the output projection lives outside the module (Hugging Face BERT)."""
    _ref: "weakref.ref[nn.Module]"
    head_dim: int
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None
    o: str | None = None

    @property
    def module(self) -> nn.Module:
        return self._ref()

    def proj(self, name: str) -> nn.Module:
        return self.module if name == "" else getattr(self.module, name)

    def _fused(self) -> tuple[str, str, int]:
        """(weight name, bias name, output axis) of the fused q/k/v tensor; nn.MultiheadAttention
        keeps it on the module itself (qkv == "") as in_proj_weight / in_proj_bias."""
        if self.qkv == "":
            return "in_proj_weight", "in_proj_bias", 0
        return "weight", "bias", _out_axis(self.proj(self.qkv))

    def _prefix(self, child: str, name: str) -> str:
        return f"{child}.{name}" if child else name

    @property
    def q_width(self) -> int:
        if self.qkv is None:
            return _width(self.proj(self.q))
        w, _, ax = self._fused()
        return getattr(self.proj(self.qkv), w).shape[ax] // 3

    @property
    def kv_width(self) -> int:
        return _width(self.proj(self.k)) if self.qkv is None else self.q_width

    @property
    def n_heads(self) -> int:
        return self.q_width // self.head_dim

    @property
    def n_kv_heads(self) -> int:
        return self.kv_width // self.head_dim

    # ---- axes seen from outside the module (the tracer's in/out sides) ------------------------
    def in_axes(self) -> list[tuple[str, int]]:
        """Tensors that read the module's input (hidden) channels."""
        if self.qkv is not None:
            w, _, ax = self._fused()
            return [(self._prefix(self.qkv, w), 1 - ax)]
        return [(f"{n}.weight", 1 - _out_axis(self.proj(n))) for n in (self.q, self.k, self.v)]

    def out_axes(self) -> list[tuple[str, int]]:
        """Tensors that produce the module's output channels: the output projection's rows, or
        (output projection outside) the value rows - heads are tied by `head_units`."""
        if self.o is not None:
            o = self.proj(self.o)
            return [(f"{self.o}.weight", _out_axis(o)), (f"{self.o}.bias", 0)]
        if self.qkv is not None:
            w, b, ax = self._fused()
            return [(self._prefix(self.qkv, w), ax), (self._prefix(self.qkv, b), 0)]
        return [(f"{n}.{t}", _out_axis(self.proj(n)) if t == "weight" else 0)
                for n in (self.q, self.k, self.v) for t in ("weight", "bias")]

    # ---- the head units ---------------------------------------------------------------------------
    def head_slots(self) -> list[tuple[str, str, int, Tensor]]:
        """(child, tensor name, axis, index table (units, k)) for every tensor a head unit owns
        inside the module: query/key/value rows, and the output projection's columns when it is
        inside. Unit j = KV head j with its query heads j*r .. j*r + r - 1 (r = query/KV ratio)."""
        hd, nq, nkv = self.head_dim, self.n_heads, self.n_kv_heads
        r = nq // nkv
        q_idx = torch.arange(nq * hd).reshape(nkv, r * hd)
        kv_idx = torch.arange(nkv * hd).reshape(nkv, hd)
        out = []
        if self.qkv is not None:
            w, b, ax = self._fused()
            d = nq * hd
            fused = torch.cat([q_idx, kv_idx + d, kv_idx + 2 * d], 1)
            out += [(self.qkv, w, ax, fused), (self.qkv, b, 0, fused)]
        else:
            for n, idx in ((self.q, q_idx), (self.k, kv_idx), (self.v, kv_idx)):
                p = self.proj(n)
                out += [(n, "weight", _out_axis(p), idx), (n, "bias", 0, idx)]
        if self.o is not None:
            o = self.proj(self.o)
            out.append((self.o, "weight", 1 - _out_axis(o), q_idx))
        return [s for s in out if getattr(self.proj(s[0]), s[1], None) is not None]

    def context_units(self) -> Tensor:
        """(units, r * head_dim): the module's output channels (output projection outside) that
        each head unit owns."""
        hd, nq, nkv = self.head_dim, self.n_heads, self.n_kv_heads
        return torch.arange(nq * hd).reshape(nkv, (nq // nkv) * hd)

    def sync(self, m: nn.Module | None = None) -> None:
        """Set the module's head-count and width attributes from its weights."""
        m = self.module
        if isinstance(m, nn.MultiheadAttention):
            _sync_mha(m, self)
            return
        old = (self._heads0, self._kv0, self._w0)
        nq, nkv, w = self.n_heads, self.n_kv_heads, self.q_width
        for names, before, now in ((_HEADS, old[0], nq), (_KV_HEADS, old[1], nkv), (_WIDTH, old[2], w)):
            for n in names:
                v = getattr(m, n, None)
                if isinstance(v, int) and not isinstance(v, bool) and v == before:
                    setattr(m, n, now)
        self._heads0, self._kv0, self._w0 = nq, nkv, w

    def __post_init__(self) -> None:
        self._heads0, self._kv0, self._w0 = self.n_heads, self.n_kv_heads, self.q_width


def _sync_mha(m: nn.MultiheadAttention, spec: AttentionSpec) -> None:
    """nn.MultiheadAttention after a cut: heads from the fused rows, embed_dim (= kdim = vdim) from
    the output projection; its own forward requires num_heads * head_dim == embed_dim, so a cut
    module runs secateur's equivalent forward (same parameters and state_dict keys)."""
    from secateur.pruning.mha import PrunedMultiheadAttention
    m.num_heads = spec.n_heads
    e = m.out_proj.weight.shape[0]
    m.embed_dim = m.kdim = m.vdim = e
    if type(m) is nn.MultiheadAttention:
        m.__class__ = PrunedMultiheadAttention


_SPECS: "weakref.WeakKeyDictionary[nn.Module, AttentionSpec]" = weakref.WeakKeyDictionary()


def attention_spec(m: nn.Module) -> AttentionSpec | None:
    """The module's AttentionSpec, or None when it does not look like attention."""
    if m in _SPECS:
        return _SPECS[m]
    if isinstance(m, nn.MultiheadAttention):
        if not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn:
            return None
        spec = AttentionSpec(weakref.ref(m), m.head_dim, qkv="", o="out_proj")
        _SPECS[m] = spec
        return spec
    q, k, v = _child(m, _Q), _child(m, _K), _child(m, _V)
    qkv = None if (q and k and v) else _child(m, _QKV)
    if not (q and k and v) and qkv is None:
        return None
    o = _child(m, _O)
    if o in (q, k, v, qkv):
        o = None
    hd = _int_attr(m, _HEAD_DIM)
    if qkv is not None:
        width = _width(getattr(m, qkv))
        if width % 3:
            return None
        width //= 3
    else:
        width = _width(getattr(m, q))
    if hd is None:
        heads = _int_attr(m, _HEADS)
        if heads is None or width % heads[1]:
            return None
        head_dim = width // heads[1]
    else:
        head_dim = hd[1]
    spec = AttentionSpec(weakref.ref(m), head_dim, q=q if qkv is None else None, k=k if qkv is None else None,
                         v=v if qkv is None else None, qkv=qkv, o=o)
    if spec.q_width % head_dim or spec.kv_width % head_dim or spec.n_heads % max(spec.n_kv_heads, 1):
        return None
    if qkv is None and _width(getattr(m, v)) != spec.kv_width:
        return None
    _SPECS[m] = spec
    return spec
