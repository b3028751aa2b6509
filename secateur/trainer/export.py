"""Export a run's latest (possibly pruned) model, and load it back in one call.

OUT/ holds:
    model.safetensors        the weights
    secateur.json            how to rebuild the architecture: `spec` (secateur's own models) or the
                             `source` it was built from (no files needed: a Hugging Face folder is
                             recorded as its config) plus the `structure` (kept original units per
                             group) to replay on it
    example_input.safetensors  the inputs the groups are traced with (models that are not secateur's)
    model.json               the spec again, for secateur's own models
    hf/                      Hugging Face models whose pruned widths fit their config class:
                             `save_pretrained` output (AutoModel...from_pretrained loads it),
                             with the run's tokenizer (AutoTokenizer.from_pretrained loads it)
    tokenizer/               the run's tokenizer, when it has one
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from secateur.trainer import checkpoint as ckpt

FORMAT = "secateur-pruned/1"
EXAMPLE_FILE = "example_input.safetensors"

LOAD_SNIPPET = """\
import secateur
model = secateur.load_pruned("{dir}")"""


def save_example(x: Any, path: Path) -> None:
    """Write an example batch (a tensor or a dict of tensors) as safetensors."""
    from safetensors.torch import save_file

    tensors = dict(x) if isinstance(x, dict) else {"x": x}
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))


def load_example(path: Path) -> Any:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    return tensors["x"] if set(tensors) == {"x"} else tensors


def rebuild(arch: dict[str, Any], example: Any = None, pretrained: bool = False) -> tuple[nn.Module, list | None]:
    """(model, traced groups or None) with the architecture `arch` describes (a checkpoint's meta
    or an export's secateur.json): secateur's own models from `spec`; others built from `source`
    and cut to `structure`, traced with `example` (the example batch). Weights are not loaded."""
    from secateur.build import construct
    from secateur.trainer.setup import example_input

    if arch.get("spec"):
        from secateur.models import build_model

        return build_model(arch["spec"]), None
    model = construct(arch["source"], pretrained=pretrained)
    if not arch.get("structure"):
        return model, None
    if example is None:
        raise ckpt.CheckpointError("the structure needs an example input to trace the model with")
    return model, replay_structure(model, None, arch, example_input(model, example))


def replay_structure(model: nn.Module, groups: list | None, arch: dict[str, Any], example: Any) -> list:
    """Cut freshly built `model` to `arch["structure"]` (kept original units per group) through
    `groups` (a Pruner's), or through groups traced as recorded (`structure_ignored_layers`) with
    `example` (the model's example input). Returns the groups. Raises ValueError (one line) when
    the structure does not belong to this model."""
    from secateur.pruning import build_groups, structure

    if groups is None:
        named = dict(model.named_modules())
        groups = build_groups(model, example, [named[n] for n in arch.get("structure_ignored_layers", [])],
                              verify=False)
    structure.apply(groups, arch["structure"])
    return groups


def load_pruned(path: str | Path, map_location: str = "cpu") -> nn.Module:
    """The exported model of folder `path` (written by `secateur export`), weights loaded, in eval
    mode. Raises CheckpointError (one line) when the folder is not an export."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "secateur.json").is_file():
        raise ckpt.CheckpointError(f"{path} is not a secateur export (no secateur.json)")
    arch = json.loads((path / "secateur.json").read_text())
    if arch.get("format") != FORMAT:
        raise ckpt.CheckpointError(f"{path}/secateur.json is not in format {FORMAT}")
    example = load_example(path / EXAMPLE_FILE) if (path / EXAMPLE_FILE).is_file() else None
    model, _ = rebuild(arch, example)
    model.load_state_dict(load_file(str(path / "model.safetensors"), device=map_location))
    return model.eval()


def export_run(run_dir: str | Path, out_dir: str | Path | None = None,
               overwrite: bool = False) -> tuple[Path, str | None]:
    """Export the run's latest checkpoint into OUT (default RUN_DIR/export; see the module
    docstring). Returns (OUT, note): the note says why there is no `hf/` folder for a Hugging Face
    model whose widths do not fit its config class, else None.

    OUT must be new or empty (an earlier export only with `overwrite`): anything else, a run or
    a checkpoint folder included, is refused with a one-line CheckpointError before any work."""
    from safetensors.torch import save_file

    from secateur.build import freeze_source, is_hf
    from secateur.trainer import runfolder

    runfolder.check_new_folder(Path(out_dir) if out_dir is not None else Path(run_dir) / "export",
                               "--out", source=run_dir, replaceable="export", overwrite=overwrite)

    path = ckpt.latest(run_dir)
    meta = ckpt.read_meta(path)
    example = load_example(path / EXAMPLE_FILE) if (path / EXAMPLE_FILE).is_file() else None
    model, _ = rebuild(meta, example)
    model.load_state_dict(ckpt.model_state_dict(path))
    model.eval()
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "export"
    out.mkdir(parents=True, exist_ok=True)
    arch = {"format": FORMAT, "step": meta["step"], "params": sum(p.numel() for p in model.parameters())}
    if meta.get("spec"):
        arch["spec"] = meta["spec"]
        (out / "model.json").write_text(json.dumps(meta["spec"], indent=1))
    else:
        arch.update(source=freeze_source(meta["source"]), structure=meta.get("structure"),
                    structure_ignored_layers=meta.get("structure_ignored_layers", []))
        if example is not None:
            shutil.copyfile(path / EXAMPLE_FILE, out / EXAMPLE_FILE)
    # safetensors refuses shared or non-contiguous storage: give every tensor its own copy
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"step": str(meta["step"]), "source": str(path)})
    note = None
    if is_hf(model):
        from secateur.hf_export import save_pretrained_pruned

        hf_dir = out / "hf"
        if hf_dir.exists():
            shutil.rmtree(hf_dir)
        probe = example if isinstance(example, dict) else None
        note = save_pretrained_pruned(model, hf_dir, probe=probe)
        arch["hf"] = "hf" if note is None else None
        arch["hf_note"] = note
    tok = meta.get("tokenizer")
    if tok and Path(tok).exists():
        dest = out / "tokenizer"
        if dest.exists():
            shutil.rmtree(dest)
        if Path(tok).is_dir():
            shutil.copytree(tok, dest)
        else:
            dest.mkdir()
            shutil.copyfile(tok, dest / "tokenizer.json")
        if arch.get("hf"):   # a complete Hugging Face folder: model and tokenizer side by side
            from secateur.data.hf_text import open_tokenizer
            open_tokenizer(tok).save_pretrained(str(out / "hf"))
    (out / "secateur.json").write_text(json.dumps(arch, indent=1))
    return out, note
