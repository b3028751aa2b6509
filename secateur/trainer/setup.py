"""Wiring from a validated Config to library objects: dataset, model, pruner, loss, LR schedule.
The library modules know nothing about runs; this is the only place that reads the config."""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from secateur.data import Dataset, Split, load_dataset, take
from secateur.trainer.config import Config, LRScheduleConfig, PruningConfig, resolve_model_class


def dataset_from_config(cfg: Config, cache_dir: str | Path | None = None) -> Dataset:
    """The configured dataset; `cache_dir` holds a trained tokenizer and Hugging Face datasets'
    cache (default .cache/secateur under the working folder)."""
    d = cfg.data
    if d.dataset == "image_folder":
        from secateur.data.folder import load_image_folder

        ds = load_image_folder(d.root, val_root=d.val_root, val_fraction=d.val_fraction,
                               image_size=d.image_size, channels=d.channels, mean=d.mean, std=d.std,
                               augment=d.augment, seed=d.subset_seed)
    elif d.dataset == "text_files":
        from secateur.data.hf_text import load_text_files

        from secateur.build import hf_path

        task = d.task or ("classification" if d.label_column else "causal_lm")
        tokenizer = d.tokenizer if d.tokenizer == "bpe" else str(hf_path(d.tokenizer))
        ds = load_text_files(d.train_files, val_files=d.val_files, val_fraction=d.val_fraction,
                             format=d.format, text_column=d.text_column, label_column=d.label_column,
                             task=task, tokenizer=tokenizer, vocab_size=d.vocab_size,
                             block_size=d.block_size, max_length=d.max_length,
                             cache_dir=str(cache_dir or Path(".cache") / "secateur"),
                             seed=d.subset_seed, mlm_probability=d.mlm_probability)
    else:
        return load_dataset(d.dataset, root=d.root, path=d.path, train_subset=d.train_subset,
                            val_subset=d.val_subset, subset_seed=d.subset_seed, block_size=d.block_size)
    if d.train_subset is not None or d.val_subset is not None:
        ds.train = take(ds.train, d.train_subset, d.subset_seed)
        ds.val = take(ds.val, d.val_subset, d.subset_seed + 1)
    return ds


_TASK_OF_DATA = {"lm": "causal_lm", "mlm": "masked_lm"}


def model_source(cfg: Config, ds: Dataset) -> dict[str, Any]:
    """The model's source dict (see secateur.build): the config's model section with the arguments
    the dataset determines filled in where the config leaves them out (input channels/features,
    classes, vocabulary; for Hugging Face models num_labels, vocab_size, pad_token_id, the task)."""
    m = cfg.model
    args = dict(m.args)
    if m.hf is not None:
        task = m.task or _TASK_OF_DATA.get(ds.task) or (
            "sequence_classification" if len(ds.input_shape) == 1 else "image_classification")
        derived: dict[str, Any] = {}
        if task in ("sequence_classification", "image_classification"):
            derived["num_labels"] = ds.num_classes
        if m.hf.config is not None and task in ("causal_lm", "masked_lm", "sequence_classification"):
            derived["vocab_size"] = ds.meta.get("vocab_size", ds.num_classes)
        if "pad_token_id" in ds.meta:
            derived["pad_token_id"] = ds.meta["pad_token_id"]
        for k, v in derived.items():
            args.setdefault(k, v)
        return {"hf": m.hf.model_dump(exclude_none=True), "task": task, "args": args}
    if m.name is not None:
        cls = resolve_model_class(m.name)
        params = inspect.signature(cls).parameters
        key = {"name": m.name}
    else:
        from secateur.build import import_target

        try:
            params = inspect.signature(import_target(m.target)).parameters
        except (TypeError, ValueError):
            params = {}
        key = {"target": m.target}
    derived = {"num_classes": ds.num_classes, "vocab": ds.num_classes, "vocab_size": ds.num_classes}
    if ds.task == "lm":
        derived.update(max_len=ds.input_shape[0])
    elif len(ds.input_shape) == 3:
        derived.update(in_channels=ds.input_shape[0], in_chans=ds.input_shape[0],
                       in_features=math.prod(ds.input_shape))
    # builders that pass **kwargs on (torchvision's, timm's) take num_classes by convention
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    for name, value in derived.items():
        if name not in args and (name in params or (var_kw and name == "num_classes")):
            args[name] = value
    return {**key, "args": args}


def model_args(cfg: Config, ds: Dataset) -> dict[str, Any]:
    """cfg.model.args plus what the dataset determines (see `model_source`)."""
    return model_source(cfg, ds)["args"]


def model_from_config(cfg: Config, ds: Dataset, pretrained: bool = True) -> nn.Module:
    """A fresh model (seeded by the caller) with the configured architecture."""
    from secateur.build import construct

    return construct(model_source(cfg, ds), pretrained=pretrained)


def example_batch(ds: Dataset, n: int = 2) -> Any:
    """The first `n` validation rows' inputs (a tensor or a dict of tensors): the example input
    every rank traces the model with."""
    x, _ = ds.val.batch(torch.arange(min(n, len(ds.val))))
    return x


def example_input(model: nn.Module, x: Any) -> Any:
    """`x` as the Pruner's example input for `model` (keywords for Hugging Face models)."""
    from secateur.build import is_hf, model_inputs

    args, kwargs = model_inputs(x, is_hf(model))
    return kwargs if kwargs else args[0]


@dataclass
class Prepared:
    """What `preflight` built, handed to the Trainer so that a fresh run builds its model once."""
    data: Dataset
    model: nn.Module                 # built right after seed_everything(cfg.seed)
    rng: tuple[Any, Any, Tensor]     # (random, numpy, torch) generator states right after the build


def preflight(cfg: Config, source: str = "config") -> Prepared:
    """Build the data and the model and run one forward on a real batch, before any run folder is
    touched. The model is built as the Trainer would (seeded by cfg.seed) and returned with the
    generator states that followed its build, so a fresh run continues exactly as if the Trainer
    had built it. Raises ConfigError (one line) naming what failed."""
    import random

    import numpy as np

    from secateur.trainer.loop import seed_everything
    from secateur.build import BuildError, forward, is_hf
    from secateur.data import DataError
    from secateur.trainer.config import ConfigError

    try:
        ds = dataset_from_config(cfg)
    except DataError as err:
        raise ConfigError(f"{source}: data: {err}") from None
    if len(ds.train) < cfg.data.batch_size:
        raise ConfigError(f"{source}: data.batch_size {cfg.data.batch_size} is larger than the "
                          f"training split ({len(ds.train)} rows)")
    try:
        seed_everything(cfg.seed)
        model = model_from_config(cfg, ds)
        rng = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    except BuildError as err:
        raise ConfigError(f"{source}: {err}") from None
    except Exception as err:
        raise ConfigError(f"{source}: model: building it failed: {type(err).__name__}: "
                          f"{' '.join(str(err).split())}") from None
    x, y = ds.val.batch(torch.arange(min(2, len(ds.val))))
    try:
        with torch.no_grad():
            was = model.training
            model.eval()
            logits = forward(model, x, is_hf(model))
            model.train(was)
    except Exception as err:
        raise ConfigError(f"{source}: model: one forward on a batch of {cfg.data.dataset} failed: "
                          f"{type(err).__name__}: {' '.join(str(err).split())[:300]}") from None
    want = ds.num_classes
    if logits.shape[-1] != want:
        raise ConfigError(f"{source}: model: its output has {logits.shape[-1]} classes on the last "
                          f"axis, the data has {want} (set model.args)")
    try:
        loss_fn(logits, y)
    except Exception as err:
        hint = " (check model.task)" if cfg.model.hf is not None else ""
        raise ConfigError(f"{source}: model: its output {tuple(logits.shape)} does not fit the data's "
                          f"targets {tuple(y.shape)}{hint}: {' '.join(str(err).split())[:200]}") from None
    if cfg.pruning is not None and cfg.pruning.ignored_layers:
        names = dict(model.named_modules())
        bad = [n for n in cfg.pruning.ignored_layers if n not in names]
        if bad:
            raise ConfigError(f"{source}: pruning.ignored_layers: {', '.join(bad)} is not a module "
                              "name of the model")
    return Prepared(ds, model, rng)


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
                  min_units=pcfg.min_units, example_input=example_input,
                  ignored_layers=pcfg.ignored_layers, layers=pcfg.layers, unit_kinds=pcfg.units,
                  round_to=pcfg.round_to, verify=pcfg.verify, **pcfg.criterion_args)


def loss_fn(logits: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy; logits (B, C) with y (B,), or (B, T, V) with y (B, T); targets equal
    to -100 (padding, unmasked tokens) are ignored."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100)


def lr_at(step: int, base_lr: float, sched: LRScheduleConfig, max_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, then cosine to min_lr."""
    if step < sched.warmup_steps:
        return base_lr * (step + 1) / sched.warmup_steps
    decay = sched.decay_steps or max_steps
    if step >= decay:
        return sched.min_lr
    progress = (step - sched.warmup_steps) / max(1, decay - sched.warmup_steps)
    return sched.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (base_lr - sched.min_lr)


def unit_widths(model: nn.Module, groups: list | None = None) -> dict[str, int]:
    """Current width of every unit group, {group name: units}: `groups` (traced), else the
    model's declared groups, else {}."""
    if groups is not None:
        return {g.name: int(g.size) for g in groups}
    if not hasattr(model, "unit_groups"):
        return {}
    return {g.name: int(g.size) for g in model.unit_groups()}


def param_count(model: nn.Module) -> int:
    """Number of parameters (whole sizes: a ZeRO-3 partitioned parameter counts its ds_numel)."""
    return sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters())


@torch.no_grad()
def eval_totals(model: nn.Module, split: Split, idx: Tensor, batch_size: int,
                max_batches: int | None = None, device: torch.device | None = None) -> Tensor:
    """Summed loss, correct predictions and predictions (float64 (3,)) of `model` in eval mode
    over rows `idx` (LongTensor) of `split`, in batches of `batch_size` (at most max_batches).
    Targets equal to -100 are not counted."""
    from secateur.build import forward, is_hf, to_device

    hf = is_hf(model)
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64)
    for i, start in enumerate(range(0, len(idx), batch_size)):
        if max_batches is not None and i >= max_batches:
            break
        x, y = split.batch(idx[start:start + batch_size])
        logits = forward(model, to_device(x, device) if device is not None else x, hf)
        flat, target = logits.reshape(-1, logits.shape[-1]), y.to(logits.device).reshape(-1)
        valid = target != -100
        totals += torch.tensor([F.cross_entropy(flat, target, reduction="sum",
                                                ignore_index=-100).item(),
                                int((flat.argmax(-1)[valid] == target[valid]).sum()),
                                int(valid.sum())], dtype=torch.float64)
    model.train(was_training)
    return totals
