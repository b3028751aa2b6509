"""One registry of layer kinds: how each layer's tensors and size attributes follow its units.

For a module and a side ("out": the channels it produces, "in": the channels it reads) a kind
says which tensors carry that axis (`(name, axis)` pairs), whether both sides are one axis
(norms, depthwise convolutions), how many consecutive channels must go together (`tie`: the
channels of one GroupNorm group) and how to reset the module's size attributes from its
tensors after a cut. A module the registry cannot handle gets a one-line reason instead; the
tracer then leaves only the groups that touch it unpruned.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from secateur.pruning.attention import AttentionSpec, attention_spec

Axes = list[tuple[str, int]]


@dataclass
class LayerKind:
    """How one module's tensors follow its units (see the module docstring)."""
    out: Axes
    inp: Axes
    coupled: bool = False          # in and out are one axis (norms, depthwise conv)
    role: str = "layer"            # "layer" (producer/consumer) or "norm" (rides along)
    tie: int = 1                   # channels that must leave together (GroupNorm group)
    sync: Callable[[nn.Module], None] = field(default=lambda m: None)
    attention: AttentionSpec | None = None


def _conv1d_hf() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:               # transformers is optional
        return None
    return Conv1D


def _set_attrs(m: nn.Module, **values: int) -> None:
    for k, v in values.items():
        if hasattr(m, k):
            setattr(m, k, int(v))


def _sync_linear(m: nn.Module) -> None:
    _set_attrs(m, out_features=m.weight.shape[0], in_features=m.weight.shape[1])


def _sync_conv(m: nn.Module) -> None:
    _set_attrs(m, out_channels=m.weight.shape[0], in_channels=m.weight.shape[1] * m.groups)


def _sync_depthwise(m: nn.Module) -> None:
    n = m.weight.shape[0]
    _set_attrs(m, out_channels=n, in_channels=n, groups=n)


def _sync_convt(m: nn.Module) -> None:
    _set_attrs(m, in_channels=m.weight.shape[0], out_channels=m.weight.shape[1] * m.groups)


def _sync_conv1d_hf(m: nn.Module) -> None:
    _set_attrs(m, nx=m.weight.shape[0], nf=m.weight.shape[1])


def _norm_width(m: nn.Module) -> int | None:
    for name in ("weight", "bias", "running_mean", "running_var"):
        t = getattr(m, name, None)
        if t is not None and t.dim() == 1:
            return t.shape[0]
    return None


def _sync_bn(m: nn.Module) -> None:
    n = _norm_width(m)
    if n is not None:
        m.num_features = n


def _sync_ln(m: nn.Module, n: int | None = None) -> None:
    n = _norm_width(m) if n is None else n
    if n is not None:
        m.normalized_shape = (n,)


def _sync_gn(m: nn.Module) -> None:
    n = _norm_width(m)
    if n is not None:
        per = m.num_channels // m.num_groups
        m.num_groups, m.num_channels = n // per, n


def _sync_channelwise(m: nn.Module) -> None:
    """Custom norm-like modules (LlamaRMSNorm, LayerScale): update size attributes that held the
    old width (the weight already has the new one)."""
    n = _norm_width(m)
    old = getattr(m, "_secateur_width", None)
    if n is None:
        return
    for k in ("hidden_size", "dim", "num_features", "embed_dim", "normalized_shape"):
        v = getattr(m, k, None)
        if isinstance(v, int) and (old is None or v == old):
            setattr(m, k, n)
        elif isinstance(v, (tuple, list)) and len(v) == 1 and (old is None or v[0] == old):
            setattr(m, k, type(v)([n]))
    m._secateur_width = n


def channelwise(m: nn.Module) -> bool:
    """A leaf module whose parameters are all 1-d of one length (a per-channel scale/shift:
    LlamaRMSNorm, T5LayerNorm, LayerScale). Such a module follows its input's channels."""
    if any(True for _ in m.children()):
        return False
    ps = list(m.parameters(recurse=False))
    return bool(ps) and all(p.dim() == 1 for p in ps) and len({p.shape[0] for p in ps}) == 1


_NORM_TENSORS = [("weight", 0), ("bias", 0), ("running_mean", 0), ("running_var", 0)]


def layer_kind(m: nn.Module) -> LayerKind | str:
    """The module's kind, or a one-line reason why its units cannot be cut."""
    conv1d = _conv1d_hf()
    if isinstance(m, nn.Linear):
        return LayerKind([("weight", 0), ("bias", 0)], [("weight", 1)], sync=_sync_linear)
    if conv1d is not None and isinstance(m, conv1d):
        return LayerKind([("weight", 1), ("bias", 0)], [("weight", 0)], sync=_sync_conv1d_hf)
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        if m.groups != 1:
            return f"grouped transposed convolution (groups={m.groups}) is left untouched"
        return LayerKind([("weight", 1), ("bias", 0)], [("weight", 0)], sync=_sync_convt)
    if isinstance(m, nn.modules.conv._ConvNd):
        if m.groups == 1:
            return LayerKind([("weight", 0), ("bias", 0)], [("weight", 1)], sync=_sync_conv)
        if m.groups == m.in_channels == m.out_channels:
            ax = [("weight", 0), ("bias", 0)]
            return LayerKind(ax, ax, coupled=True, role="norm", sync=_sync_depthwise)
        return (f"grouped convolution (groups={m.groups}, {m.in_channels}->{m.out_channels}) "
                "keeps its channels: its groups are left untouched")
    if isinstance(m, nn.modules.batchnorm._BatchNorm) or isinstance(m, nn.modules.instancenorm._InstanceNorm):
        return LayerKind(_NORM_TENSORS, _NORM_TENSORS, coupled=True, role="norm", sync=_sync_bn)
    if isinstance(m, (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))):
        if len(m.normalized_shape) != 1:
            return f"normalizes over {len(m.normalized_shape)} axes (normalized_shape={tuple(m.normalized_shape)})"
        ax = [("weight", 0), ("bias", 0)]
        return LayerKind(ax, ax, coupled=True, role="norm", sync=_sync_ln)
    if isinstance(m, nn.GroupNorm):
        ax = [("weight", 0), ("bias", 0)]
        return LayerKind(ax, ax, coupled=True, role="norm", tie=m.num_channels // m.num_groups,
                         sync=_sync_gn)
    if isinstance(m, nn.PReLU):
        ax = [("weight", 0)] if m.num_parameters > 1 else []
        return LayerKind(ax, ax, coupled=True, role="norm",
                         sync=lambda mm: _set_attrs(mm, num_parameters=mm.weight.numel()))
    if isinstance(m, nn.Embedding):
        return LayerKind([("weight", 1)], [], sync=lambda mm: _set_attrs(mm, embedding_dim=mm.weight.shape[1]))
    if isinstance(m, nn.MultiheadAttention) and attention_spec(m) is None:
        return ("nn.MultiheadAttention with separate key/value widths, bias_k/bias_v or "
                "add_zero_attn is left untouched")
    spec = attention_spec(m)
    if spec is not None:
        return LayerKind(spec.out_axes(), spec.in_axes(), role="layer", sync=spec.sync, attention=spec)
    if channelwise(m):
        ax = [(n, 0) for n, _ in m.named_parameters(recurse=False)]
        m._secateur_width = _norm_width(m)
        return LayerKind(ax, ax, coupled=True, role="norm", sync=_sync_channelwise)
    if any(True for _ in m.parameters(recurse=False)):
        return f"{type(m).__name__} has parameters secateur does not know how to cut"
    return LayerKind([], [], coupled=True, role="norm")
