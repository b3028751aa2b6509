"""Wiring from a validated Config to library objects: dataset, model, pruner, loss, LR schedule.
The library modules know nothing about runs; this is the only place that reads the config."""
from __future__ import annotations

import inspect
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from secateur.data import Dataset, Split, load_dataset
from secateur.trainer.config import Config, LRScheduleConfig, PruningConfig, resolve_model_class


def dataset_from_config(cfg: Config) -> Dataset:
    d = cfg.data
    return load_dataset(d.dataset, root=d.root, path=d.path, train_subset=d.train_subset,
                        val_subset=d.val_subset, subset_seed=d.subset_seed, block_size=d.block_size)


def model_args(cfg: Config, ds: Dataset) -> dict[str, Any]:
    """cfg.model.args plus what the dataset determines (input channels/features, classes, vocab),
    for the constructor arguments the config leaves out."""
    cls = resolve_model_class(cfg.model.name)
    params = inspect.signature(cls).parameters
    args = dict(cfg.model.args)
    derived = {"num_classes": ds.num_classes, "vocab": ds.num_classes, "vocab_size": ds.num_classes}
    if ds.task == "lm":
        derived.update(max_len=ds.input_shape[0])
    else:
        derived.update(in_channels=ds.input_shape[0], in_features=math.prod(ds.input_shape))
    for name, value in derived.items():
        if name in params and name not in args:
            args[name] = value
    return args


def model_from_config(cfg: Config, ds: Dataset) -> nn.Module:
    """A fresh model (seeded by the caller) with the configured architecture."""
    return resolve_model_class(cfg.model.name)(**model_args(cfg, ds))


def pruner_from_config(pcfg: PruningConfig, model: nn.Module, example_input: Tensor | None):
    """A secateur.pruning.Pruner for the configured criterion, rule and schedule."""
    from secateur.pruning import Pruner, Rule, Schedule

    rule = pcfg.rule
    if rule.kind == "ratio":
        rule_obj = Rule(kind="ratio", value=rule.ratio, scope=rule.scope)
    else:
        rule_obj = Rule(kind=rule.method, value=rule.value, scope=rule.scope)
    s = pcfg.schedule
    if s.kind == "oneshot":
        sched = Schedule(kind="oneshot", start=s.at, end=s.at, every=1)
    elif s.kind == "iterative":
        sched = Schedule(kind="iterative", start=s.start, end=s.end, every=s.every)
    else:
        sched = Schedule(kind="agp", start=s.start, end=s.end, every=s.every, target=s.target)
    return Pruner(model, criterion=pcfg.criterion, rule=rule_obj, schedule=sched,
                  min_units=pcfg.min_units, example_input=example_input, **pcfg.criterion_args)


def loss_fn(logits: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy; logits (B, C) with y (B,), or (B, T, V) with y (B, T)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def lr_at(step: int, base_lr: float, sched: LRScheduleConfig, max_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, then cosine to min_lr."""
    if step < sched.warmup_steps:
        return base_lr * (step + 1) / sched.warmup_steps
    decay = sched.decay_steps or max_steps
    if step >= decay:
        return sched.min_lr
    progress = (step - sched.warmup_steps) / max(1, decay - sched.warmup_steps)
    return sched.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (base_lr - sched.min_lr)


def unit_widths(model: nn.Module) -> dict[str, int]:
    """Current width of every unit group, {group name: units}; {} for models without groups."""
    if not hasattr(model, "unit_groups"):
        return {}
    return {g.name: int(g.size) for g in model.unit_groups()}


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def eval_totals(model: nn.Module, split: Split, idx: Tensor, batch_size: int,
                max_batches: int | None = None, device: torch.device | None = None) -> Tensor:
    """Summed loss, correct predictions and predictions (float64 (3,)) of `model` in eval mode
    over rows `idx` (LongTensor) of `split`, in batches of `batch_size` (at most max_batches)."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64)
    for i, start in enumerate(range(0, len(idx), batch_size)):
        if max_batches is not None and i >= max_batches:
            break
        x, y = split.batch(idx[start:start + batch_size])
        logits = model(x.to(device) if device is not None else x)
        flat, target = logits.reshape(-1, logits.shape[-1]), y.to(logits.device).reshape(-1)
        totals += torch.tensor([F.cross_entropy(flat, target, reduction="sum").item(),
                                int((flat.argmax(-1) == target).sum()), target.numel()],
                               dtype=torch.float64)
    model.train(was_training)
    return totals
