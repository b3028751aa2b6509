"""A C4-equivariant CNN (e2cnn) with a plain, prunable fully connected head, and a plain CNN baseline.

C4CNN: per block R2Conv (C4, regular representation) -> InnerBatchNorm -> ReLU -> PointwiseMaxPool(2),
then GroupPooling (max over the 4 rotations of each field) and a global average pool. The pooled
vector is invariant to 90-degree rotations of the input (exactly, up to float rounding, when every
pooled map has an even side), so any MLP on top keeps the whole network invariant. Only that MLP
(plain nn.Linear + ReLU) is prunable; the equivariant stack is never touched.

PlainCNN: Conv2d -> BatchNorm2d -> ReLU -> MaxPool2d(2) per block, global average pool and the same
head. Its features are not rotation invariant.

e2cnn is imported inside C4CNN's constructor so `import secateur.models` works without it.
"""
from __future__ import annotations

import warnings
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from secateur.pruning.groups import Slot, UnitGroup


def _positive_ints(name: str, values: Sequence[int], allow_empty: bool = False) -> list[int]:
    vals = [int(v) for v in values]
    if (not vals and not allow_empty) or any(v < 1 for v in vals):
        raise ValueError(f"{name} must be a {'' if allow_empty else 'non-empty '}list of positive ints, "
                         f"got {list(values)}")
    return vals


class _PooledCNN(nn.Module):
    """Shared part of both CNNs: `conv_features(x)` -> (N, C, H, W) is defined by the subclass;
    `features(x)` global-average-pools it to (N, C); `head` is
    [Linear -> ReLU] per hidden width -> Linear(num_classes)."""

    head: nn.Sequential

    def _set_common(self, in_channels: int, num_classes: int, fc: Sequence[int], kernel_size: int) -> list[int]:
        """Validate and store the arguments both CNNs share; returns the FC widths as ints."""
        if kernel_size < 1 or kernel_size % 2 == 0:
            # an odd kernel centred on a pixel keeps the sampling grid invariant under rot90
            raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size}")
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.in_channels, self.num_classes, self.kernel_size = in_channels, num_classes, kernel_size
        return _positive_ints("fc", fc, allow_empty=True)

    def _build_head(self, in_features: int, fc: Sequence[int], num_classes: int) -> None:
        layers: list[nn.Module] = []
        c = in_features
        for f in fc:
            layers += [nn.Linear(c, f), nn.ReLU()]
            c = f
        layers.append(nn.Linear(c, num_classes))
        self.head = nn.Sequential(*layers)

    def conv_features(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def features(self, x: Tensor) -> Tensor:
        """x: (N, in_channels, H, W) -> (N, C) pooled conv features (the head's input)."""
        return self.conv_features(x).mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, in_channels, H, W) -> logits (N, num_classes)."""
        return self.head(self.features(x))

    def hidden_linears(self) -> list[nn.Linear]:
        """The prunable hidden Linear layers, input to output (the logits layer excluded)."""
        return [m for m in self.head if isinstance(m, nn.Linear)][:-1]

    @property
    def logits_layer(self) -> nn.Linear:
        return self.head[-1]

    def fc_widths(self) -> list[int]:
        return [lin.out_features for lin in self.hidden_linears()]

    def unit_groups(self) -> list[UnitGroup]:
        """One group per hidden Linear: its weight rows and bias (producers), the next Linear's
        weight columns (consumers), the ReLU after it (activation)."""
        linears = [m for m in self.head if isinstance(m, nn.Linear)]
        groups = []
        for j, lin in enumerate(linears[:-1]):
            i = list(self.head).index(lin)
            groups.append(UnitGroup(name=f"head.{i}", producers=[Slot(lin, "weight", 0), Slot(lin, "bias", 0)],
                                    consumers=[Slot(linears[j + 1], "weight", 1)],
                                    activation=self.head[i + 1], act_dim=1))
        return groups

    def _args(self) -> dict[str, Any]:
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        """JSON-able architecture with the current (possibly pruned) FC widths."""
        return {"name": type(self).__name__, "args": {**self._args(), "fc": self.fc_widths()}}

    def _derived_buffers(self) -> set[str]:
        """Buffer names that follow from the architecture and the parameters (e2cnn's sampled
        filter basis, expanded filters and biases, index tables): all but BatchNorm statistics."""
        stats = {f"{name}.{b}" if name else b for name, mod in self.named_modules()
                 if isinstance(mod, nn.modules.batchnorm._NormBase) for b, _ in mod.named_buffers(recurse=False)}
        return {n for n, _ in self.named_buffers()} - stats

    def weights_state_dict(self) -> dict[str, Tensor]:
        """The state that, with `spec()`, rebuilds the model: parameters (also dynamically quantized
        Linear weights) and BatchNorm statistics; the constructor and eval() recreate the rest."""
        derived = self._derived_buffers()
        return {k: v for k, v in self.state_dict().items() if k not in derived}

    def load_weights(self, state: dict[str, Tensor]) -> None:
        """Load a `weights_state_dict()` into a model built from the same spec."""
        mode = self.training
        self.train()  # drops expanded filters; train(False) below rebuilds them from the loaded weights
        try:
            result = self.load_state_dict(state, strict=False)
        except RuntimeError as err:  # shape mismatches
            raise ValueError(f"state: does not match this architecture ({' '.join(str(err).split())})") from None
        finally:
            self.train(mode)
        missing = set(result.missing_keys) - self._derived_buffers()
        if result.unexpected_keys or missing:
            raise ValueError(f"state: does not match this architecture (missing {sorted(missing)}, "
                             f"unexpected {result.unexpected_keys})")

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "_PooledCNN":
        """A fresh model (new weights) with the architecture of `spec`, ready for load_state_dict."""
        if not isinstance(spec, dict) or spec.get("name") != cls.__name__:
            got = spec.get("name") if isinstance(spec, dict) else spec
            raise ValueError(f"spec: expected a {cls.__name__} spec, got {got!r}")
        return cls(**spec.get("args", {}))


class C4CNN(_PooledCNN):
    """C4-equivariant conv stack (e2cnn) + prunable FC head.

    fields: regular C4 fields per block (each = 4 channels); fc: hidden FC widths; input
    (N, in_channels, H, W) with H, W divisible by 2**len(fields) for exact invariance.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, fields: Sequence[int] = (8, 16),
                 fc: Sequence[int] = (128,), kernel_size: int = 5) -> None:
        super().__init__()
        from e2cnn import gspaces
        from e2cnn import nn as enn

        self.fields = _positive_ints("fields", fields)
        fc = self._set_common(in_channels, num_classes, fc, kernel_size)
        gs = gspaces.Rot2dOnR2(N=4)
        self.in_type = enn.FieldType(gs, in_channels * [gs.trivial_repr])
        blocks: list[Any] = []
        t_in = self.in_type
        for f in self.fields:
            t = enn.FieldType(gs, f * [gs.regular_repr])
            with warnings.catch_warnings():
                # e2cnn 0.2.3 indexes with a uint8 mask while sampling its basis (harmless)
                warnings.filterwarnings("ignore", message="indexing with dtype torch.uint8")
                conv = enn.R2Conv(t_in, t, kernel_size=kernel_size, padding=kernel_size // 2)
            blocks += [conv, enn.InnerBatchNorm(t), enn.ReLU(t, inplace=True), enn.PointwiseMaxPool(t, 2)]
            t_in = t
        self.equivariant = enn.SequentialModule(*blocks)
        self.gpool = enn.GroupPooling(t_in)
        self._build_head(self.fields[-1], fc, num_classes)

    def train(self, mode: bool = True) -> "C4CNN":
        # R2Conv.eval() expands and caches its filter; without no_grad the cached filter is a
        # non-leaf tensor and the model can no longer be deep-copied (quantize_dynamic copies it)
        with torch.no_grad():
            return super().train(mode)

    def conv_features(self, x: Tensor) -> Tensor:
        """x: (N, in_channels, H, W) -> (N, fields[-1], H/2^B, W/2^B): group-pooled maps, whose
        channels are rotation invariant and whose spatial layout rotates with the input."""
        from e2cnn.nn import GeometricTensor

        y = self.equivariant(GeometricTensor(x, self.in_type))
        return self.gpool(y).tensor

    def _args(self) -> dict[str, Any]:
        return {"in_channels": self.in_channels, "num_classes": self.num_classes,
                "fields": list(self.fields), "kernel_size": self.kernel_size}


class PlainCNN(_PooledCNN):
    """Non-equivariant baseline: Conv2d -> BatchNorm2d -> ReLU -> MaxPool2d(2) per width in
    `channels`, global average pool, the same prunable FC head."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, channels: Sequence[int] = (16, 32),
                 fc: Sequence[int] = (128,), kernel_size: int = 5) -> None:
        super().__init__()
        self.channels = _positive_ints("channels", channels)
        fc = self._set_common(in_channels, num_classes, fc, kernel_size)
        layers: list[nn.Module] = []
        c = in_channels
        for w in self.channels:
            layers += [nn.Conv2d(c, w, kernel_size, padding=kernel_size // 2), nn.BatchNorm2d(w),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c = w
        self.convs = nn.Sequential(*layers)
        self._build_head(c, fc, num_classes)

    def conv_features(self, x: Tensor) -> Tensor:
        """x: (N, in_channels, H, W) -> (N, channels[-1], H/2^B, W/2^B)."""
        return self.convs(x)

    def _args(self) -> dict[str, Any]:
        return {"in_channels": self.in_channels, "num_classes": self.num_classes,
                "channels": list(self.channels), "kernel_size": self.kernel_size}


@torch.no_grad()
def invariance_error(model: nn.Module, x: Tensor, ks: Sequence[int] = (1, 2, 3)) -> float:
    """Relative rotation-invariance error of the conv stack's pooled features f = model.features:
    max over k in `ks` and the batch of |f(rot90^k x) - f(x)|, divided by max |f(x)|.

    x: (N, C, H, W); rotation in the (H, W) plane, counter-clockwise. All rotations run in one
    batched forward pass. The model is evaluated in its current mode (use eval() for BatchNorm
    running statistics)."""
    ks = [int(k) for k in ks]
    xs = torch.cat([x] + [torch.rot90(x, k, dims=(2, 3)) for k in ks])
    f = model.features(xs).reshape(len(ks) + 1, x.shape[0], -1)
    scale = f[0].abs().max().clamp_min(torch.finfo(f.dtype).tiny)
    return float((f[1:] - f[0]).abs().max() / scale)
