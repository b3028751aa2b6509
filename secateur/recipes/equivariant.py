"""Equivariance-aware structured pruning (METHODS.md E): train a C4-equivariant teacher, distill it
into a smaller C4 student, remove the lowest-L2 neurons of every hidden Linear of the head (never the
logits layer, never an equivariant module), fine-tune only when accuracy dropped by more than a
threshold, quantize the Linear layers to INT8, and measure accuracy on upright and 90-degree-rotated
images. The same steps run on a plain CNN baseline.

Each step is a function; `run_family` wires them for one model family. The YAML settings are
validated by `EquivariantConfig` (unknown keys and bad values become one `ConfigError` line).
"""
from __future__ import annotations

import copy
import math
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch
import torch.nn.functional as F
import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError, field_validator
from pydantic import model_validator
from torch import Tensor, nn

from secateur.data import Split, load_dataset
from secateur.models.c4cnn import C4CNN, PlainCNN, invariance_error
from secateur.pruning import UnitGroup, keep_units
from secateur.trainer.config import ConfigError, _format_errors

__all__ = ["ConfigError", "Data", "EquivariantConfig", "FinetuneResult", "Row", "accuracy", "adaptive_finetune",
           "distill", "distillation_loss", "fc_l2_prune", "l2_saliency", "load_config", "load_data",
           "param_count", "parse_config", "predict", "quantize_int8", "run_family", "size_on_disk", "train"]


# ----------------------------------------------------------------------------- configuration

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _odd(v: int) -> int:
    if v < 1 or v % 2 == 0:
        raise ValueError(f"must be a positive odd int, got {v}")
    return v


class DataSection(_Strict):
    """`train_subset` rows of the training split (the last `monitor` of them are held out to decide
    and stop fine-tuning), `test_subset` rows of the test split for every reported accuracy."""
    dataset: Literal["fashion_mnist", "mnist"] = "fashion_mnist"
    root: str | None = None
    train_subset: PositiveInt | None = 6000
    monitor: PositiveInt = 1000
    test_subset: PositiveInt | None = 2000
    batch_size: PositiveInt = 64
    eval_batch_size: PositiveInt = 500

    @model_validator(mode="after")
    def _monitor_fits(self) -> "DataSection":
        if self.train_subset is not None and self.monitor >= self.train_subset:
            raise ValueError(f"monitor ({self.monitor}) must be smaller than train_subset ({self.train_subset})")
        return self


class C4Section(_Strict):
    fields: list[PositiveInt] = Field(min_length=1)
    fc: list[PositiveInt] = Field(min_length=1)
    kernel_size: int = 5
    _k = field_validator("kernel_size")(_odd)


class PlainSection(_Strict):
    channels: list[PositiveInt] = Field(min_length=1)
    fc: list[PositiveInt] = Field(min_length=1)
    kernel_size: int = 5
    _k = field_validator("kernel_size")(_odd)


class TrainSection(_Strict):
    epochs: PositiveInt = 3
    lr: PositiveFloat = 1e-3


class DistillSection(TrainSection):
    """Loss alpha * T^2 * KL(teacher || student at temperature T) + (1 - alpha) * CE."""
    temperature: PositiveFloat = 4.0
    alpha: float = Field(0.7, ge=0.0, le=1.0)


class PruneSection(_Strict):
    ratios: list[float] = Field(default_factory=lambda: [0.3, 0.4, 0.5], min_length=1)

    @field_validator("ratios")
    @classmethod
    def _in_range(cls, v: list[float]) -> list[float]:
        bad = [r for r in v if not 0.0 <= r < 1.0]
        if bad:
            raise ValueError(f"every ratio must be in [0, 1), got {bad}")
        return v


class FinetuneSection(_Strict):
    """Adaptive fine-tuning: runs only if monitor accuracy fell by more than `threshold` points.
    scope 'head' trains the FC head on frozen conv features; 'all' trains the whole network."""
    threshold: float = Field(2.0, ge=0.0)
    lr: PositiveFloat = 1e-3
    factor: float = Field(0.5, gt=0.0, lt=1.0)
    patience: int = Field(3, ge=0)
    early_stop: PositiveInt = 5
    max_epochs: int = Field(20, ge=0)
    scope: Literal["head", "all"] = "head"


class EquivariantConfig(_Strict):
    seed: int = 0
    data: DataSection = Field(default_factory=DataSection)
    teacher: C4Section = Field(default_factory=lambda: C4Section(fields=[16, 32], fc=[256]))
    student: C4Section = Field(default_factory=lambda: C4Section(fields=[8, 16], fc=[128]))
    plain_teacher: PlainSection = Field(default_factory=lambda: PlainSection(channels=[20, 40], fc=[256]))
    plain_student: PlainSection = Field(default_factory=lambda: PlainSection(channels=[10, 20], fc=[128]))
    train: TrainSection = Field(default_factory=TrainSection)
    distill: DistillSection = Field(default_factory=DistillSection)
    prune: PruneSection = Field(default_factory=PruneSection)
    finetune: FinetuneSection = Field(default_factory=FinetuneSection)
    quantize: bool = True


def parse_config(data: object, source: str = "config") -> EquivariantConfig:
    """Validate a parsed YAML document (None = all defaults). Raises ConfigError: one line naming
    every problem (unknown keys, values out of range)."""
    try:
        return EquivariantConfig.model_validate({} if data is None else data)
    except ValidationError as err:
        raise ConfigError(f"{source}: {_format_errors(err)}") from None


def load_config(path: str | Path) -> EquivariantConfig:
    """Read and validate the pipeline's YAML file (e.g. configs/recipes/equivariant.yaml)."""
    try:
        text = Path(path).read_text()
        return parse_config(yaml.safe_load(text), str(path))
    except OSError as err:
        raise ConfigError(f"cannot read config file {path} ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None


# ----------------------------------------------------------------------------- data

@dataclass
class Data:
    """train: images used for gradient steps; monitor: held out from the training subset (fine-tuning
    trigger, LR plateau, early stopping); test: every reported accuracy. x: (N, C, H, W) float32."""
    train: Split
    monitor: Split
    test: Split
    num_classes: int
    in_channels: int


def load_data(cfg: DataSection, seed: int = 0) -> Data:
    """The configured subsets (standardised with the training subset's statistics), with the last
    `cfg.monitor` training rows split off as the monitor set."""
    ds = load_dataset(cfg.dataset, root=cfg.root, train_subset=cfg.train_subset,
                      val_subset=cfg.test_subset, subset_seed=seed)
    n = len(ds.train)
    if cfg.monitor >= n:
        raise ConfigError(f"data.monitor ({cfg.monitor}) must be smaller than the training split ({n})")
    cut = n - cfg.monitor  # the subset is already a seeded permutation: the tail is a random sample
    train = Split(ds.train.x[:cut], ds.train.y[:cut])
    monitor = Split(ds.train.x[cut:], ds.train.y[cut:])
    return Data(train, monitor, ds.val, ds.num_classes, int(ds.input_shape[0]))


# ----------------------------------------------------------------------------- training

def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor,
                      temperature: float = 4.0, alpha: float = 0.7) -> Tensor:
    """alpha * T^2 * KL(p_t || p_s) + (1 - alpha) * CE(student_logits, targets), batch mean.

    p_t = softmax(teacher_logits / T), p_s = softmax(student_logits / T); logits (B, K), targets (B,).
    The KL runs from the teacher to the student (Hinton et al.'s soft-target loss up to a constant);
    the T^2 factor keeps its gradient scale independent of T."""
    log_ps = F.log_softmax(student_logits / temperature, dim=1)
    log_pt = F.log_softmax(teacher_logits / temperature, dim=1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(dim=1).mean()
    return alpha * temperature ** 2 * kl + (1.0 - alpha) * F.cross_entropy(student_logits, targets)


def _epoch(module: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, batch_size: int,
           gen: torch.Generator, soft: Tensor | None = None, temperature: float = 4.0,
           alpha: float = 0.7) -> float:
    """One shuffled pass; soft: teacher logits aligned with x (distillation) or None (CE)."""
    module.train()
    perm = torch.randperm(len(x), generator=gen)
    total = 0.0
    for i in range(0, len(x), batch_size):
        idx = perm[i:i + batch_size]
        out = module(x[idx])
        loss = (F.cross_entropy(out, y[idx]) if soft is None
                else distillation_loss(out, soft[idx], y[idx], temperature, alpha))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += float(loss.detach()) * len(idx)
    return total / len(x)


def train(model: nn.Module, split: Split, cfg: TrainSection, batch_size: int = 64, seed: int = 0) -> list[float]:
    """Adam + cross-entropy for cfg.epochs epochs; returns the mean loss of each epoch."""
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(seed)
    return [_epoch(model, opt, split.x, split.y, batch_size, gen) for _ in range(cfg.epochs)]


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int = 500) -> Tensor:
    """Logits (N, K) in eval mode, in batches."""
    model.eval()
    return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def distill(student: nn.Module, teacher: nn.Module, split: Split, cfg: DistillSection,
            batch_size: int = 64, seed: int = 0) -> list[float]:
    """Train `student` on the teacher's soft targets (teacher in eval mode, logits computed once:
    there is no augmentation, so they are the same every epoch). Returns per-epoch mean losses."""
    soft = predict(teacher, split.x)
    opt = torch.optim.Adam(student.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(seed)
    return [_epoch(student, opt, split.x, split.y, batch_size, gen, soft, cfg.temperature, cfg.alpha)
            for _ in range(cfg.epochs)]


def accuracy(model: nn.Module, split: Split, rotate: int = 0, batch_size: int = 500) -> float:
    """Top-1 accuracy in percent; rotate=k turns every image by k*90 degrees (torch.rot90 on H, W)."""
    x = torch.rot90(split.x, rotate, dims=(2, 3)) if rotate % 4 else split.x
    return 100.0 * float((predict(model, x, batch_size).argmax(1) == split.y).float().mean())


# ----------------------------------------------------------------------------- pruning

def l2_saliency(group: UnitGroup) -> Tensor:
    """(n,) L2 norm of each unit's incoming weight row (the bias is left out, METHODS E.2)."""
    return group.producer_weight_rows().double().norm(dim=1)


def fc_l2_prune(model: nn.Module, ratio: float,
                optimizer: torch.optim.Optimizer | None = None) -> list[tuple[str, int, int]]:
    """Remove floor(ratio * n) lowest-L2 neurons from every hidden Linear of the model's head.

    Works on `model.unit_groups()` (C4CNN / PlainCNN: one group per hidden Linear; the logits layer is
    only ever a consumer, so its outputs are never removed and no convolution is touched). All
    saliencies are read from the unpruned weights before any surgery, so removing inputs of a later
    layer does not change its ranking. Ties keep the lower index. At least one unit survives.
    Returns (group name, units before, units after) per group."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    groups = model.unit_groups()
    scores = [l2_saliency(g) for g in groups]
    report = []
    for g, s in zip(groups, scores):
        n = g.size
        r = min(int(math.floor(ratio * n + 1e-9)), n - 1)
        keep = torch.argsort(s, stable=True)[r:]
        if r:
            keep_units(g, keep, optimizer)
        report.append((g.name, n, g.size))
    return report


# ----------------------------------------------------------------------------- fine-tuning

@dataclass
class FinetuneResult:
    """ran: whether the drop exceeded the threshold; epochs: epochs trained; accuracies in percent
    on the monitor split (after = after restoring the best epoch)."""
    ran: bool
    epochs: int
    monitor_before: float
    monitor_pruned: float
    monitor_after: float


def adaptive_finetune(model: C4CNN | PlainCNN, data: Data, monitor_before: float, cfg: FinetuneSection,
                      batch_size: int = 64, seed: int = 0) -> FinetuneResult:
    """Fine-tune a pruned model only if its monitor accuracy fell more than cfg.threshold points below
    `monitor_before` (the unpruned model's). Adam(lr), ReduceLROnPlateau on monitor accuracy
    (factor, patience), early stopping after `early_stop` epochs without improvement, at most
    `max_epochs`; the best epoch's weights are restored. scope='head' trains only the FC head on conv
    features computed once (the conv stack and its BatchNorm statistics stay exactly as they were)."""
    pruned = accuracy(model, data.monitor)
    if monitor_before - pruned <= cfg.threshold or cfg.max_epochs == 0:
        return FinetuneResult(False, 0, monitor_before, pruned, pruned)
    if cfg.scope == "head":
        with torch.no_grad():
            model.eval()
            feats = [torch.cat([model.features(s.x[i:i + 500]) for i in range(0, len(s.x), 500)])
                     for s in (data.train, data.monitor)]
        module, train_x, mon = model.head, feats[0], Split(feats[1], data.monitor.y)
    else:
        module, train_x, mon = model, data.train.x, data.monitor
    opt = torch.optim.Adam(module.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=cfg.factor, patience=cfg.patience)
    gen = torch.Generator().manual_seed(seed)
    best, best_state, stale, epochs = pruned, copy.deepcopy(module.state_dict()), 0, 0
    while epochs < cfg.max_epochs and stale < cfg.early_stop:
        _epoch(module, opt, train_x, data.train.y, batch_size, gen)
        epochs += 1
        acc = accuracy(module, mon)
        sched.step(acc)
        if acc > best:
            best, best_state, stale = acc, copy.deepcopy(module.state_dict()), 0
        else:
            stale += 1
    module.eval()
    module.load_state_dict(best_state)
    return FinetuneResult(True, epochs, monitor_before, pruned, best)


# ----------------------------------------------------------------------------- compression, size

def quantize_int8(model: nn.Module) -> nn.Module:
    """A copy with every nn.Linear replaced by a dynamically quantized INT8 Linear (weights int8,
    activations quantized per batch at run time; CPU inference). Convolutions stay float32."""
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's migration notice and a per-tensor qscheme note
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def param_count(model: nn.Module) -> int:
    """Number of weights and biases, counting dynamically quantized Linear weights too."""
    from torch.ao.nn.quantized.dynamic import Linear as QLinear

    n = sum(p.numel() for p in model.parameters())
    for m in model.modules():
        if isinstance(m, QLinear):
            w, b = m.weight(), m.bias()
            n += w.numel() + (b.numel() if b is not None else 0)
    return n


def size_on_disk(model: nn.Module, full: bool = False) -> int:
    """Bytes of torch.save(state) in eval mode. state = `model.weights_state_dict()` (parameters and
    BatchNorm statistics: what is stored beside the spec) when the model has it and full=False, else
    the whole state_dict (for C4CNN that adds e2cnn's sampled basis and expanded filters)."""
    model.eval()
    state = model.state_dict() if full or not hasattr(model, "weights_state_dict") else model.weights_state_dict()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "model.pt")
        torch.save(state, path)
        return os.path.getsize(path)


# ----------------------------------------------------------------------------- the pipeline

@dataclass
class Row:
    """One measured model. Accuracies in percent on the test subset; gap = upright - rotated 90;
    equiv_error: `invariance_error` of the conv stack's pooled features; size_bytes / full_size_bytes:
    `size_on_disk` of the weights / of the whole state_dict; note: how the row came to be."""
    family: str
    stage: str
    fc: list[int]
    params: int
    size_bytes: int
    acc: float
    acc_rot90: float
    equiv_error: float
    full_size_bytes: int = 0
    note: str = ""
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def gap(self) -> float:
        return self.acc - self.acc_rot90


def measure(model: nn.Module, family: str, stage: str, data: Data, probe: Tensor, note: str = "",
            fc: list[int] | None = None, eval_batch_size: int = 500) -> Row:
    """Accuracy upright and rotated by 90 degrees, parameters, sizes on disk, invariance error."""
    model.eval()
    return Row(family, stage, list(fc if fc is not None else model.fc_widths()), param_count(model),
               size_on_disk(model), accuracy(model, data.test, 0, eval_batch_size),
               accuracy(model, data.test, 1, eval_batch_size), invariance_error(model, probe),
               size_on_disk(model, full=True), note)


def build(section: C4Section | PlainSection, data: Data, seed: int) -> C4CNN | PlainCNN:
    torch.manual_seed(seed)
    if isinstance(section, C4Section):
        return C4CNN(data.in_channels, data.num_classes, section.fields, section.fc, section.kernel_size)
    return PlainCNN(data.in_channels, data.num_classes, section.channels, section.fc, section.kernel_size)


def run_family(family: Literal["c4", "plain"], cfg: EquivariantConfig, data: Data,
               log: Callable[[str], None] = print) -> list[Row]:
    """Teacher -> distilled student -> FC L2 pruning at each ratio -> adaptive fine-tuning -> INT8,
    for the C4 family or the plain baseline. Returns one Row per measured model."""
    t_sec, s_sec = (cfg.teacher, cfg.student) if family == "c4" else (cfg.plain_teacher, cfg.plain_student)
    bs, ebs, seed = cfg.data.batch_size, cfg.data.eval_batch_size, cfg.seed
    probe = data.test.x[:64]
    rows: list[Row] = []
    t0 = time.perf_counter()

    def add(model: nn.Module, stage: str, note: str = "", fc: list[int] | None = None) -> None:
        rows.append(measure(model, family, stage, data, probe, note, fc, ebs))
        rows[-1].seconds = time.perf_counter() - t0
        r = rows[-1]
        log(f"[{family} {r.seconds:6.0f}s] {stage:<18} fc={r.fc} params={r.params} acc={r.acc:.2f} "
            f"rot90={r.acc_rot90:.2f} equiv_err={r.equiv_error:.1e} {note}")

    teacher = build(t_sec, data, seed)
    losses = train(teacher, data.train, cfg.train, bs, seed)
    add(teacher, "teacher", f"trained {cfg.train.epochs} ep, final loss {losses[-1]:.3f}")
    student = build(s_sec, data, seed + 1)
    losses = distill(student, teacher, data.train, cfg.distill, bs, seed + 1)
    add(student, "student (KD)", f"distilled {cfg.distill.epochs} ep, final loss {losses[-1]:.3f}")
    monitor_before = accuracy(student, data.monitor, 0, ebs)
    for ratio in cfg.prune.ratios:
        pruned = copy.deepcopy(student)
        fc_l2_prune(pruned, ratio)
        pct = f"{100 * ratio:.0f}%"
        add(pruned, f"pruned {pct}", "no fine-tuning")
        res = adaptive_finetune(pruned, data, monitor_before, cfg.finetune, bs, seed + 2)
        drop = res.monitor_before - res.monitor_pruned
        note = (f"monitor drop {drop:.2f} pts -> fine-tuned {res.epochs} ep ({cfg.finetune.scope})" if res.ran
                else f"monitor drop {drop:.2f} pts <= {cfg.finetune.threshold}: no fine-tuning")
        add(pruned, f"pruned {pct} + FT", note)
        rows[-1].extra = {"finetune": vars(res)}
        if cfg.quantize:
            add(quantize_int8(pruned), f"pruned {pct} + FT + INT8", "dynamic INT8 Linear", pruned.fc_widths())
    return rows
