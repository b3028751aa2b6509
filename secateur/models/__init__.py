"""secateur's models. Each declares its prunable unit groups (`unit_groups()`) and describes its
current (possibly pruned) architecture (`spec()`); `build_model(spec)` rebuilds it."""
from __future__ import annotations

from typing import Any

from torch import nn

from secateur.models.c4cnn import C4CNN, PlainCNN
from secateur.models.mlp import MLP
from secateur.models.transformer import TinyTransformer
from secateur.models.vgg import VGGTSRA

__all__ = ["C4CNN", "MLP", "PlainCNN", "TinyTransformer", "VGGTSRA", "build_model"]


def build_model(spec: dict[str, Any]) -> nn.Module:
    """A fresh model with the architecture of `spec` (from `model.spec()`), weights uninitialised
    for loading."""
    import secateur.models as models

    name = spec.get("name") if isinstance(spec, dict) else None
    cls = getattr(models, str(name), None)
    if not isinstance(cls, type) or not hasattr(cls, "spec"):
        raise ValueError(f"spec: unknown model {name!r}")
    return cls(**spec.get("args", {}))
