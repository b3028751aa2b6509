"""Models from a description: secateur's own by name, any importable callable, or a Hugging Face
model from a config or a local folder. One forward convention for all of them.

A *source* is a plain dict (JSON-safe, recorded in checkpoints and exports):
    {"name": "VGGTSRA", "args": {...}}                       secateur.models class
    {"target": "torchvision.models:mobilenet_v2", "args": {...}}
    {"target": "path/to/nets.py:Net", "args": {...}}         a file plus a name in it
    {"hf": {"config": {"model_type": "llama", ...}}, "task": "causal_lm"}
    {"hf": {"path": "DIR" | "pkg://package/sub"}, "task": "sequence_classification", "args": {...}}
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

HF_TASKS = ("causal_lm", "masked_lm", "sequence_classification", "image_classification")


class BuildError(ValueError):
    """A model source that cannot be built (one-line message naming the key at fault)."""


def import_target(target: str) -> Callable[..., nn.Module]:
    """The callable named by `target`: "pkg.mod:Name", "pkg.mod.Name" or "path/file.py:Name".
    Raises BuildError (one line) when it does not import or is not callable."""
    mod_name, sep, attr = target.rpartition(":")
    if not sep:
        mod_name, _, attr = target.rpartition(".")
    if not mod_name or not attr:
        raise BuildError(f"model.target: {target!r} is not 'module:name', 'module.name' or 'file.py:name'")
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name)
            if not path.is_file():
                raise BuildError(f"model.target: file {path} does not exist")
            key = f"_secateur_target_{abs(hash(str(path.resolve())))}"
            module = sys.modules.get(key)
            if module is None:
                spec = importlib.util.spec_from_file_location(key, path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[key] = module
                spec.loader.exec_module(module)
        else:
            module = importlib.import_module(mod_name)
    except BuildError:
        raise
    except Exception as err:
        raise BuildError(f"model.target: cannot import {mod_name!r} ({type(err).__name__}: "
                         f"{' '.join(str(err).split())})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise BuildError(f"model.target: {mod_name!r} has no callable {attr!r}")
    return fn


def bind_args(fn: Callable, args: dict[str, Any], where: str = "model.args") -> None:
    """Check that `fn(**args)` binds (names and required arguments). Raises BuildError."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return                      # builtins without a signature: the call itself will tell
    try:
        sig.bind(**args)
    except TypeError as err:
        raise BuildError(f"{where}: {err}") from None


def hf_path(path: str) -> Path:
    """A local Hugging Face folder; "pkg://package/sub" is a folder inside an installed package."""
    if path.startswith("pkg://"):
        pkg, _, sub = path[len("pkg://"):].partition("/")
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            raise BuildError(f"model.hf.path: package {pkg!r} is not installed")
        return Path(list(spec.submodule_search_locations)[0]) / sub
    return Path(path)


def _auto_class(task: str):
    import transformers as T

    return {"causal_lm": T.AutoModelForCausalLM, "masked_lm": T.AutoModelForMaskedLM,
            "sequence_classification": T.AutoModelForSequenceClassification,
            "image_classification": T.AutoModelForImageClassification}[task]


def hf_config(source: dict[str, Any]):
    """The transformers config a source describes (from `hf.config` or the folder's config.json),
    with `args` (e.g. num_labels, vocab_size) applied."""
    import transformers as T

    hf, args = source["hf"], dict(source.get("args") or {})
    try:
        if hf.get("config") is not None:
            conf = dict(hf["config"])
            model_type = conf.pop("model_type", None)
            if model_type is None:
                raise BuildError("model.hf.config: needs model_type (llama, bert, gpt2, vit, ...)")
            cfg = T.AutoConfig.for_model(model_type, **conf)
        else:
            path = hf_path(hf["path"])
            if not (path / "config.json").is_file():
                raise BuildError(f"model.hf.path: {path} holds no config.json")
            cfg = T.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except BuildError:
        raise
    except Exception as err:
        raise BuildError(f"model.hf: {type(err).__name__}: {' '.join(str(err).split())}") from None
    for k, v in args.items():
        setattr(cfg, k, v)
    if hasattr(cfg, "use_cache"):
        cfg.use_cache = False          # training: no key/value cache
    return cfg


def construct(source: dict[str, Any], pretrained: bool = True) -> nn.Module:
    """A model built from `source` (see the module docstring). `pretrained=False` builds a Hugging
    Face folder's architecture without reading its weights (when weights are loaded afterwards).
    Raises BuildError (one line) for a source that cannot be built."""
    args = dict(source.get("args") or {})
    if "name" in source and source["name"] is not None:
        from secateur.trainer.config import resolve_model_class
        cls = resolve_model_class(source["name"])
        return cls(**args)
    if source.get("target"):
        fn = import_target(source["target"])
        bind_args(fn, args)
        try:
            model = fn(**args)
        except Exception as err:
            raise BuildError(f"model: {source['target']}(**args) failed: {type(err).__name__}: "
                             f"{' '.join(str(err).split())}") from None
        if not isinstance(model, nn.Module):
            raise BuildError(f"model.target: {source['target']} returned {type(model).__name__}, "
                             "not a torch.nn.Module")
        return model
    if source.get("hf"):
        task = source.get("task")
        if task not in HF_TASKS:
            raise BuildError(f"model.task: {task!r} is not one of {', '.join(HF_TASKS)}")
        cfg = hf_config(source)
        auto = _auto_class(task)
        try:
            if source["hf"].get("path") and pretrained:
                return auto.from_pretrained(str(hf_path(source["hf"]["path"])), config=cfg,
                                            local_files_only=True)
            return auto.from_config(cfg)
        except Exception as err:
            raise BuildError(f"model.hf: {type(err).__name__}: {' '.join(str(err).split())}") from None
    raise BuildError("model: give one of name, target or hf")


def is_hf(model: nn.Module) -> bool:
    """A transformers PreTrainedModel (without importing transformers when it is not loaded)."""
    tr = sys.modules.get("transformers")
    return tr is not None and isinstance(model, tr.PreTrainedModel)


def model_inputs(x: Tensor | dict[str, Tensor], hf: bool) -> tuple[tuple, dict[str, Tensor]]:
    """(positional, keyword) inputs for one batch: a dict becomes keywords; a Hugging Face model
    gets `pixel_values` (float) or `input_ids` (integer) by keyword."""
    if isinstance(x, dict):
        return (), x
    if hf:
        return (), {"pixel_values" if x.is_floating_point() else "input_ids": x}
    return (x,), {}


def logits_of(out: Any) -> Tensor:
    """The logits of a model output: a tensor, a Hugging Face ModelOutput (`.logits`) or a tuple
    whose first entry is the logits."""
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(f"model output of type {type(out).__name__} has no logits")


def forward(model: nn.Module, x: Tensor | dict[str, Tensor], hf: bool = False) -> Tensor:
    """Logits of `model` on one batch (see `model_inputs`, `logits_of`)."""
    args, kwargs = model_inputs(x, hf)
    return logits_of(model(*args, **kwargs))


def to_device(x: Any, device: torch.device) -> Any:
    """A batch (tensor or dict of tensors) on `device`."""
    if isinstance(x, dict):
        return {k: v.to(device, non_blocking=True) for k, v in x.items()}
    return x.to(device, non_blocking=True)


def freeze_source(source: dict[str, Any]) -> dict[str, Any]:
    """`source` without references to files: a Hugging Face folder becomes its config (with the
    source's args applied), so the architecture can be rebuilt where the folder does not exist."""
    if not (source.get("hf") or {}).get("path"):
        return source
    conf = hf_config(source).to_dict()
    for k in ("architectures", "transformers_version", "_name_or_path", "torch_dtype", "dtype"):
        conf.pop(k, None)
    return {"hf": {"config": conf}, "task": source["task"], "args": {}}
