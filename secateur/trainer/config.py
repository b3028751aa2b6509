"""Run configuration: one YAML file names the model, data, optimizer, LR schedule, pruning and
DeepSpeed settings. It is validated completely (pydantic, unknown keys forbidden, datasets looked
up on disk, model arguments checked against the model's signature) before any work starts; every
problem becomes one `ConfigError` line.
"""
from __future__ import annotations

import glob
import inspect
import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

CRITERIA = ("random", "l2", "activation", "projective", "cob", "cosep", "fold")
SUPPORTED_ZERO_STAGES = (0, 1, 2, 3)


class ConfigError(ValueError):
    """An invalid run configuration; its message is a single line meant for the user."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class HFConfig(_Strict):
    """A Hugging Face model: `config` (a config dict with model_type; random init) or `path` (a local
    folder, or "pkg://package/sub" inside an installed package; loaded with from_pretrained, offline)."""

    config: dict[str, Any] | None = None
    path: str | None = None

    @model_validator(mode="after")
    def _one(self) -> "HFConfig":
        if (self.config is None) == (self.path is None):
            raise ValueError("give exactly one of config or path")
        return self


HF_TASKS = ("causal_lm", "masked_lm", "sequence_classification", "image_classification")


class ModelConfig(_Strict):
    """Exactly one of:
    `name`: a model class of secateur.models (e.g. VGGTSRA, MLP, TinyTransformer; case and
    underscores ignored); `target`: any importable callable returning an nn.Module
    ("torchvision.models.mobilenet_v2", "mypkg.nets:Net", "path/to/nets.py:Net");
    `hf`: a Hugging Face model (see HFConfig) with a `task` (default: from the data).
    `args`: constructor arguments (for `hf`: config attributes such as num_labels). Input
    channels, class count and vocabulary size are filled in from the dataset when left out."""

    name: str | None = None
    target: str | None = None
    hf: HFConfig | None = None
    task: Literal[HF_TASKS] | None = None  # type: ignore[valid-type]
    args: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_source(self) -> "ModelConfig":
        given = [k for k in ("name", "target", "hf") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of name, target or hf" +
                             (f" (got {', '.join(given)})" if given else ""))
        if self.task is not None and self.hf is None:
            raise ValueError("task applies to hf models only")
        return self


DATASETS = ("fashion_mnist", "mnist", "digits", "text", "cifar10", "image_folder", "text_files")
_DATA_KEYS = {  # keys that only some datasets read: a key set for another dataset is a mistake
    "image_folder": {"root", "val_root", "val_fraction", "image_size", "channels", "mean", "std",
                     "augment"},
    "text_files": {"train_files", "val_files", "val_fraction", "format", "text_column",
                   "label_column", "task", "tokenizer", "vocab_size", "block_size", "max_length",
                   "mlm_probability"},
    "text": {"path", "block_size"}, "fashion_mnist": {"root"}, "cifar10": {"root"},
    "mnist": set(), "digits": set(),
}


class DataConfig(_Strict):
    """Dataset and batching. `batch_size` is the micro-batch of one rank.

    image_folder: `root` (class sub-folders, torchvision ImageFolder), `val_root` or a held-out
    `val_fraction`, `image_size`, `channels` (1 or 3), `mean`/`std`, `augment`.
    text_files: local text/json/jsonl/csv/parquet `train_files` (+ `val_files`) read by Hugging Face
    datasets, `tokenizer` ("bpe": trained on the corpus, or a local folder), `task` causal_lm (packed
    blocks of `block_size`), classification (`text_column`, `label_column`) or masked_lm."""

    dataset: Literal[DATASETS]  # type: ignore[valid-type]
    root: str | None = None          # fashion_mnist / cifar10 / image_folder folder
    path: str | None = None          # text corpus file ("kjv" or unset: the Debian KJV text)
    train_subset: Annotated[int, Field(gt=0)] | None = None
    val_subset: Annotated[int, Field(gt=0)] | None = None
    subset_seed: int = 0
    batch_size: Annotated[int, Field(gt=0)] = 64
    eval_batch_size: Annotated[int, Field(gt=0)] = 256
    block_size: Annotated[int, Field(gt=0)] = 64     # text windows
    num_workers: Annotated[int, Field(ge=0)] = 0     # DataLoader worker processes per rank
    # image_folder
    val_root: str | None = None
    val_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.1
    image_size: Annotated[int, Field(gt=0)] | None = None
    channels: Literal[1, 3] | None = None
    mean: list[float] | None = None
    std: list[Annotated[float, Field(gt=0)]] | None = None
    augment: bool = False
    # text_files
    train_files: str | list[str] | None = None
    val_files: str | list[str] | None = None
    format: Literal["text", "json", "csv", "parquet"] | None = None
    text_column: str = "text"
    label_column: str | None = None
    task: Literal["causal_lm", "masked_lm", "classification"] | None = None
    tokenizer: str = "bpe"
    vocab_size: Annotated[int, Field(ge=64)] = 4096
    max_length: Annotated[int, Field(gt=0)] = 128
    mlm_probability: Annotated[float, Field(gt=0, lt=1)] = 0.15

    @model_validator(mode="after")
    def _keys_fit_dataset(self) -> "DataConfig":
        owned = set().union(*_DATA_KEYS.values())
        allowed = _DATA_KEYS[self.dataset]
        fields = type(self).model_fields
        stray = sorted(k for k in owned - allowed if getattr(self, k) != fields[k].default)
        if stray:
            raise ValueError(f"{', '.join(stray)} do(es) not apply to dataset {self.dataset}")
        if self.dataset == "image_folder" and self.root is None:
            raise ValueError("image_folder needs root (a folder of class sub-folders)")
        if self.dataset == "text_files":
            if self.train_files is None:
                raise ValueError("text_files needs train_files")
            if self.task == "classification" and self.label_column is None:
                raise ValueError("task classification needs label_column")
        if self.mean is not None and self.std is not None and len(self.mean) != len(self.std):
            raise ValueError("mean and std need the same length")
        return self


class OptimizerConfig(_Strict):
    """A torch optimizer handed to deepspeed.initialize (no DeepSpeed optimizer ops are built).
    Weight decay applies to tensors with >= 2 dims only (not biases)."""

    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: Annotated[float, Field(gt=0)] = 1e-3
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.999)
    eps: Annotated[float, Field(gt=0)] = 1e-8
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    nesterov: bool = False
    grad_clip: Annotated[float, Field(ge=0)] = 1.0   # 0 disables clipping


class LRScheduleConfig(_Strict):
    """Linear warm-up to optimizer.lr, then cosine decay to min_lr at decay_steps (default
    max_steps). A pure function of the step, so it continues across engine rebuilds and resumes."""

    warmup_steps: Annotated[int, Field(ge=0)] = 0
    min_lr: Annotated[float, Field(ge=0)] = 0.0
    decay_steps: Annotated[int, Field(gt=0)] | None = None


class RatioRule(_Strict):
    """Remove floor(ratio * width) units per event: per layer, per TSRA subspace, or globally
    across layers (lowest normalised scores)."""

    kind: Literal["ratio"]
    ratio: float
    scope: Literal["global", "per_layer", "per_subspace", "uniform"] = "per_layer"

    @field_validator("ratio")
    @classmethod
    def _ratio_in_range(cls, v: float) -> float:
        if not (0.0 <= v < 1.0):
            raise ValueError(f"ratio must be in [0, 1), got {v}")
        return v


class ThresholdRule(_Strict):
    """Remove every unit whose importance is below a cutoff: value * max / mean / median of the
    layer's importances, or a z-score below value.

    A cutoff that can lie above a layer's best unit would remove every unit on some data (the
    pruner then keeps only `min_units` per group: a 110k-parameter model became 52), so values
    are refused unless the best unit always survives: prop_of_max in [0, 1), prop_of_avg and
    prop_of_med in [0, 1] (the maximum is never below the mean, nor the median), zscore <= 0
    (the best unit's z-score is never negative)."""

    kind: Literal["threshold"]
    method: Literal["prop_of_max", "prop_of_avg", "prop_of_med", "zscore"]
    value: float
    scope: Literal["per_layer", "per_subspace", "uniform"] = "per_layer"

    @model_validator(mode="after")
    def _keeps_some_units(self) -> "ThresholdRule":
        if not math.isfinite(self.value):
            raise ValueError(f"threshold value must be finite, got {self.value}")
        if self.method == "prop_of_max" and not 0.0 <= self.value < 1.0:
            raise ValueError(f"prop_of_max must be in [0, 1) (a cutoff of {self.value} x max would "
                             "remove every unit)")
        if self.method in ("prop_of_avg", "prop_of_med") and not 0.0 <= self.value <= 1.0:
            what = "mean" if self.method == "prop_of_avg" else "median"
            raise ValueError(f"{self.method} must be in [0, 1], got {self.value} (a cutoff above "
                             f"the layer's {what} would remove every unit when the scores are "
                             "alike)")
        if self.method == "zscore" and self.value > 0:
            raise ValueError(f"zscore must be <= 0, got {self.value} (a cutoff above the mean "
                             "would remove every unit of a layer whose best units are alike)")
        return self


class OneshotSchedule(_Strict):
    kind: Literal["oneshot"]
    at: Annotated[int, Field(ge=1)]


class IterativeSchedule(_Strict):
    """A pruning event every `every` steps from `start` to `end` (inclusive)."""

    kind: Literal["iterative"]
    start: Annotated[int, Field(ge=1)]
    end: Annotated[int, Field(ge=1)]
    every: Annotated[int, Field(ge=1)]

    @model_validator(mode="after")
    def _ordered(self) -> "IterativeSchedule":
        if self.end < self.start:
            raise ValueError(f"end ({self.end}) must be >= start ({self.start})")
        return self


class AGPSchedule(_Strict):
    """Automated gradual pruning: events every `every` steps from `start` to `end`, removing
    units so that the pruned fraction of each group follows the cubic ramp to `target`."""

    kind: Literal["agp"]
    start: Annotated[int, Field(ge=1)]
    end: Annotated[int, Field(ge=1)]
    every: Annotated[int, Field(ge=1)]
    target: float

    @model_validator(mode="after")
    def _valid(self) -> "AGPSchedule":
        if self.end < self.start:
            raise ValueError(f"end ({self.end}) must be >= start ({self.start})")
        if not 0.0 < self.target < 1.0:
            raise ValueError(f"target must be in (0, 1), got {self.target} (the fraction of each "
                             "group's units removed by the end)")
        return self


Rule = Annotated[Union[RatioRule, ThresholdRule], Field(discriminator="kind")]
Schedule = Annotated[Union[OneshotSchedule, IterativeSchedule, AGPSchedule], Field(discriminator="kind")]


class PruningConfig(_Strict):
    """What to prune and when. `ignored_layers`: module names whose outputs keep their size;
    `layers`: prune only the unit groups of these names; `units`: only groups of these kinds
    (channels, heads, mlp, hidden); `round_to`: kept widths are multiples of this (whole heads);
    `verify`: try each traced group's cut on a copy first (see secateur.pruning.Pruner)."""

    criterion: Literal[CRITERIA]  # type: ignore[valid-type]
    criterion_args: dict[str, Any] = Field(default_factory=dict)
    rule: Rule = Field(default_factory=lambda: RatioRule(kind="ratio", ratio=0.0))
    schedule: Schedule
    min_units: Annotated[int, Field(ge=1)] = 1
    ignored_layers: list[str] = Field(default_factory=list)
    layers: list[str] | None = None
    units: list[Literal["channels", "heads", "mlp", "hidden"]] | None = None
    round_to: Annotated[int, Field(gt=0)] | None = None
    verify: bool = True


class TrainConfig(_Strict):
    max_steps: Annotated[int, Field(gt=0)]
    eval_interval: Annotated[int, Field(gt=0)] = 100
    eval_batches: Annotated[int, Field(gt=0)] | None = None     # None: the whole val split
    checkpoint_interval: Annotated[int, Field(gt=0)] | None = None  # None: events + end only
    checkpoint_at_prune: bool = True
    keep_checkpoints: Annotated[int, Field(gt=0)] = 3
    deterministic: bool = False      # torch.use_deterministic_algorithms, for exact resume
    threads: Annotated[int, Field(gt=0)] | None = None   # torch threads per rank
    progress: bool = True            # tqdm bar on rank 0
    verify_ranks: bool = True        # after each event, check all ranks hold the same weights
    # steps with a non-finite loss or gradient skipped (update not applied) before the run stops
    skip_nonfinite: Annotated[int, Field(ge=0)] = 0
    # seconds a collective may wait for the other ranks before the job ends with an error
    collective_timeout_s: Annotated[float, Field(gt=0)] = 1800.0


class DeepSpeedConfig(_Strict):
    """DeepSpeed settings. `precision`: the dtype the model trains in, "fp32" (default), "bf16" or
    "fp16" (dynamic loss scaling), with fp32 master weights and optimizer state that pruning
    events cut like the weights; the same as extra {bf16: {enabled: true}} or {fp16: {enabled:
    true}}, whose further keys (loss_scale, initial_scale_power, ...) apply either way."""

    zero_stage: int = 0
    gradient_accumulation_steps: Annotated[int, Field(gt=0)] = 1
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    extra: dict[str, Any] = Field(default_factory=dict)   # more DeepSpeed JSON keys, merged in

    @model_validator(mode="after")
    def _one_precision(self) -> "DeepSpeedConfig":
        modes = {self.precision} - {"fp32"}
        for name in ("bf16", "fp16"):
            section = self.extra.get(name)
            if section is not None and not isinstance(section, dict):
                raise ValueError(f"extra.{name} must be a mapping such as {{enabled: true}} "
                                 f"(or set deepspeed.precision: {name})")
            if section and section.get("enabled"):
                modes.add(name)
        if len(modes) > 1:
            raise ValueError("bf16 and fp16 cannot both be enabled")
        if modes and "data_types" in self.extra:
            raise ValueError("extra.data_types does not combine with bf16/fp16 here (pruning reads "
                             "the fp32 masters of DeepSpeed's ZeRO and fp16 optimizers only)")
        return self

    @field_validator("zero_stage")
    @classmethod
    def _supported_stage(cls, v: int) -> int:
        if v not in SUPPORTED_ZERO_STAGES:
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {v}")
        return v

    @field_validator("extra")
    @classmethod
    def _no_conflicts(cls, v: dict) -> dict:
        owned = {"train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps",
                 "zero_optimization", "optimizer", "scheduler", "gradient_clipping"}
        clash = sorted(owned & set(v))
        if clash:
            raise ValueError(f"set {', '.join(clash)} through the config's own keys, not deepspeed.extra")
        return v


class DistillConfig(_Strict):
    """Logit distillation while the model is pruned (secateur.trainer.distill): loss =
    (1 - weight) * CE + weight * T^2 * KL(teacher || student). `teacher`: "snapshot" (a frozen copy
    taken just before the first pruning event) or a folder (a secateur run, a `secateur export`,
    or a Hugging Face folder for a Hugging Face model)."""

    teacher: str = "snapshot"
    temperature: Annotated[float, Field(gt=0)] = 2.0
    weight: Annotated[float, Field(ge=0, le=1)] = 0.5


class Config(_Strict):
    seed: int = 0
    model: ModelConfig
    data: DataConfig
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    lr_schedule: LRScheduleConfig = Field(default_factory=LRScheduleConfig)
    pruning: PruningConfig | None = None
    distill: DistillConfig | None = None
    train: TrainConfig
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)


_UNION_TAGS = {"ratio", "threshold", "oneshot", "iterative", "agp"}


def _format_errors(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        # drop the tag pydantic inserts for discriminated unions (pruning.rule.ratio.ratio)
        raw = [str(p) for p in e["loc"]]
        loc = ".".join(p for i, p in enumerate(raw)
                       if not (i > 0 and raw[i - 1] in ("rule", "schedule") and p in _UNION_TAGS))
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown key '{loc}'")
        elif e["type"] == "missing":
            parts.append(f"missing key '{loc}'")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def parse_config(data: Any, source: str = "config") -> Config:
    """Validate a mapping (parsed YAML) into a Config. Raises ConfigError (one line)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{source}: {_format_errors(err)}") from None


def load_config(path: str | Path) -> Config:
    """Read and validate a YAML config file (schema only; see `check_config` for the rest)."""
    return parse_config(read_yaml(path), str(path))


def resolve_model_class(name: str) -> type:
    """The secateur.models class called `name` (case and underscores ignored)."""
    import secateur.models as models

    key = name.replace("_", "").lower()
    for attr in dir(models):
        obj = getattr(models, attr)
        if inspect.isclass(obj) and attr.replace("_", "").lower() == key and hasattr(obj, "spec"):
            return obj
    known = sorted(a for a in dir(models) if inspect.isclass(getattr(models, a))
                   and hasattr(getattr(models, a), "spec"))
    raise ConfigError(f"model.name: unknown model {name!r}; choose one of {', '.join(known)}")


def _check_data_files(d: DataConfig) -> None:
    from secateur.data import DataError

    def files(v: str | list[str] | None) -> list[str]:
        return [] if v is None else [v] if isinstance(v, str) else list(v)

    if d.dataset == "image_folder":
        for key in ("root", "val_root"):
            v = getattr(d, key)
            if v is not None and not Path(v).is_dir():
                raise DataError(f"{key}: folder {v} does not exist")
    elif d.dataset == "text_files":
        for key in ("train_files", "val_files"):
            for f in files(getattr(d, key)):
                if not Path(f).is_file() and not glob.glob(f):
                    raise DataError(f"{key}: file {f} does not exist")
        if d.tokenizer != "bpe":
            from secateur.build import hf_path

            if not hf_path(d.tokenizer).exists():
                raise DataError(f"tokenizer: {d.tokenizer} is neither 'bpe' nor an existing folder")


def _type_name(hint: Any) -> str:
    """`hint` in words: "an integer", "a list of integers or null", ..."""
    import collections.abc
    import typing

    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
             type(None): "null", dict: "a mapping", list: "a list"}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in names:
        return names[hint]
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        parts = " or ".join(_type_name(a) for a in args).split(" or ")
        return " or ".join(dict.fromkeys(parts))        # each alternative once
    if origin in (list, tuple, collections.abc.Sequence, set, frozenset) and args:
        inner = _type_name(args[0])
        for art in ("an ", "a "):
            inner = inner.replace(art, "")
        return f"a list of {inner.replace('integer', 'integers').replace('number', 'numbers').replace('string', 'strings')}"
    return getattr(hint, "__name__", str(hint))


def _typed_args(fn: Any, args: dict[str, Any], where: str, owner: str) -> dict[str, Any]:
    """`args` checked against `fn`'s annotations (strict: no bool for a number, no number for a
    string; a number written as text, such as YAML's `1e-3`, is read as the number). Returns
    them with such numbers converted; arguments without a usable annotation pass unchanged.
    Raises ConfigError (one line) naming the argument."""
    import typing

    from pydantic import TypeAdapter

    try:
        hints = typing.get_type_hints(fn)
    except Exception:         # annotations that do not evaluate here: nothing to check against
        hints = {}
    out = {}
    for name, value in args.items():
        hint = hints.get(name, Any)
        try:
            adapter = TypeAdapter(hint)
        except Exception:
            out[name] = value
            continue
        try:
            out[name] = adapter.validate_python(value, strict=True)
            continue
        except ValidationError:
            pass
        try:
            if isinstance(value, str) and set(getattr(hint, "__args__", (hint,))) & {int, float}:
                out[name] = adapter.validate_python(value)
                continue
        except ValidationError:
            pass
        raise ConfigError(f"{where}.{name}: {owner} expects {_type_name(hint)}, got "
                          f"{json.dumps(value) if _jsonable(value) else repr(value)}")
    return out


def check_criterion_args(criterion: str, args: dict[str, Any],
                         where: str = "criterion_args") -> dict[str, Any]:
    """Check `args` against the criterion class's constructor (secateur.pruning.criteria): every
    name is one it takes, every value has its annotated type (numbers written as text, such as
    YAML's `1e-3`, are read as numbers), and the criterion's own range checks pass. Returns the
    arguments with such numbers converted. Raises ConfigError (one line)."""
    from secateur.pruning.criteria import CRITERIA as CLASSES

    if not isinstance(args, dict):
        raise ConfigError(f"{where}: expected a mapping of argument names to values")
    cls = CLASSES[criterion]
    params = [n for n, p in inspect.signature(cls.__init__).parameters.items()
              if n not in ("self", "groups") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    unknown = sorted(set(args) - set(params))
    if unknown:
        raise ConfigError(f"{where}: criterion {criterion} takes no argument "
                          f"{', '.join(repr(u) for u in unknown)} (it takes "
                          f"{', '.join(params) if params else 'none'})")
    out = _typed_args(cls.__init__, args, where, f"criterion {criterion}")
    trial = dict(out)
    if criterion == "cosep":
        trial.setdefault("num_classes", 2)      # the pruner fills it in from the model
    try:
        cls([], **trial)                         # the criterion's own range checks, no groups
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{where}: {' '.join(str(err).split())}") from None
    return out


# DeepSpeed config keys (merged in through deepspeed.extra) whose values have one JSON type
_DS_MAPPINGS = ("amp", "activation_checkpointing", "flops_profiler", "comms_logger", "tensorboard",
                "wandb", "csv_monitor", "comet", "aio", "checkpoint", "data_efficiency",
                "curriculum_learning", "compression_training", "autotuning", "elasticity",
                "pipeline", "sparse_attention", "nebula", "data_types", "monitor_config",
                "torch_autocast", "compile", "hybrid_engine", "eigenvalue",
                "progressive_layer_drop", "weight_quantization", "timers")
_DS_TYPES: dict[str, tuple[type, ...]] = {
    **{k: (dict,) for k in _DS_MAPPINGS},
    **{k: (bool,) for k in ("wall_clock_breakdown", "memory_breakdown", "prescale_gradients",
                            "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer",
                            "dump_state", "sparse_gradients", "disable_allgather",
                            "fp32_allreduce", "dataloader_drop_last", "disable_python_gc",
                            "use_data_before_expert_parallelism", "check_overflow")},
    "steps_per_print": (int,), "gradient_predivide_factor": (int, float),
    "communication_data_type": (str,), "seq_parallel_communication_data_type": (str,),
    "gradient_allreduce_op": (str,), "log_level": (str,),
}


def _check_deepspeed_extra(extra: dict[str, Any], source: str) -> None:
    """deepspeed.extra values of a known key must have its JSON type (a section is a mapping:
    `activation_checkpointing: true` is refused, as DeepSpeed would fail on it mid-set-up)."""
    for key, value in extra.items():
        want = _DS_TYPES.get(key)
        if want is None or value is None:
            continue
        ok = isinstance(value, want) and not (isinstance(value, bool) and bool not in want)
        if not ok:
            kind = {dict: "a mapping", bool: "true or false", int: "an integer",
                    float: "a number", str: "a string"}[want[0]]
            raise ConfigError(f"{source}: deepspeed.extra.{key} must be {kind}, got "
                              f"{json.dumps(value) if _jsonable(value) else repr(value)}")


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def check_config(cfg: Config, source: str = "config") -> None:
    """Checks beyond the schema: the dataset is on disk, the model exists and accepts its
    arguments, the schedule fits in max_steps. Raises ConfigError (one line). (That the model runs
    on the data is checked by `setup.preflight`, which builds both.)"""
    from secateur.build import BuildError, hf_config, import_target
    from secateur.data import DataError, check_available

    try:
        if cfg.data.dataset in ("image_folder", "text_files"):
            _check_data_files(cfg.data)
        else:
            check_available(cfg.data.dataset, cfg.data.root, cfg.data.path)
    except DataError as err:
        raise ConfigError(f"{source}: data: {err}") from None
    m = cfg.model
    try:
        if m.name is not None:
            cls = resolve_model_class(m.name)
            params = inspect.signature(cls).parameters
            if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
                unknown = sorted(set(m.args) - set(params))
                if unknown:
                    raise ConfigError(f"{source}: model.args: {cls.__name__} has no argument "
                                      f"{', '.join(repr(u) for u in unknown)}")
            m.args = _typed_args(cls.__init__, m.args, f"{source}: model.args", cls.__name__)
        elif m.target is not None:
            fn = import_target(m.target)
            params = _signature_params(fn)
            if params is not None and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
                unknown = sorted(set(m.args) - set(params))
                if unknown:
                    raise ConfigError(f"{source}: model.args: {m.target} has no argument "
                                      f"{', '.join(repr(u) for u in unknown)}")
        else:
            hf_config({"hf": m.hf.model_dump(), "args": m.args})
    except BuildError as err:
        raise ConfigError(f"{source}: {err}") from None
    if cfg.distill is not None:
        t = cfg.distill.teacher
        if t == "snapshot" and cfg.pruning is None:
            raise ConfigError(f"{source}: distill.teacher: a snapshot is taken at the first pruning "
                              "event, and this run has no pruning; give a teacher folder")
        if t != "snapshot" and not Path(t).is_dir():
            raise ConfigError(f"{source}: distill.teacher: {t} is neither 'snapshot' nor a folder")
    ds = cfg.deepspeed
    if cfg.pruning is not None:
        sched = cfg.pruning.schedule
        first = sched.at if sched.kind == "oneshot" else sched.start
        if first > cfg.train.max_steps:
            raise ConfigError(f"{source}: pruning.schedule starts at step {first}, after "
                              f"train.max_steps ({cfg.train.max_steps})")
        cfg.pruning.criterion_args = check_criterion_args(
            cfg.pruning.criterion, cfg.pruning.criterion_args, f"{source}: pruning.criterion_args")
    _check_deepspeed_extra(ds.extra, source)
    if ds.precision == "fp16" or (ds.extra.get("fp16") or {}).get("enabled"):
        import torch   # DeepSpeed's own test: a CUDA device, or a CPU whose oneDNN does fp16

        try:
            cpu_fp16 = bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
        except (AttributeError, RuntimeError):
            cpu_fp16 = False
        if not torch.cuda.is_available() and not cpu_fp16:
            raise ConfigError(f"{source}: deepspeed: fp16 needs a CUDA GPU or a CPU with fp16 "
                              "support, which this machine lacks (DeepSpeed refuses it); use bf16")


def _signature_params(fn: Any) -> dict | None:
    try:
        return dict(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None


def apply_overrides(data: dict[str, Any], sets: list[str]) -> dict[str, Any]:
    """A copy of the raw config mapping with `key.path=value` overrides applied (values parsed as
    YAML: `train.max_steps=50`, `model.args.widths=[16, 32]`, `pruning=null`). Raises ConfigError
    (one line) for a malformed override or a path through a non-mapping."""
    import copy

    out = copy.deepcopy(data)
    for item in sets:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not p for p in key.split(".")):
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML") from None
        node = out
        parts = key.split(".")
        for i, p in enumerate(parts[:-1]):
            nxt = node.get(p) if isinstance(node, dict) else None
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(parts[:i + 1])} is not a mapping")
            node = nxt
        node[parts[-1]] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The raw mapping of a YAML config file. Raises ConfigError (one line)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def load_and_check(path: str | Path, sets: list[str] = ()) -> Config:
    """Read, override (`--set key=value` items), validate and check a config file: everything
    that can be checked before training."""
    data = apply_overrides(read_yaml(path), list(sets))
    source = str(path) + (" with --set" if sets else "")
    cfg = parse_config(data, source)
    check_config(cfg, source)
    return cfg
