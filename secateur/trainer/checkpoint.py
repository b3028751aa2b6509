"""Atomic, self-describing checkpoints inside a run directory.

Layout of RUN_DIR/checkpoints/:
    step_00000100/
        meta.json          format, step, model spec (the current, possibly pruned, architecture),
                           config, LR-schedule position, data position, world size, ZeRO stage
        rank0.pt, rank1.pt per-rank state: RNG (python, numpy, torch[, cuda]), pruner state
                           (schedule position + this rank's importance accumulators), data position
        deepspeed/         DeepSpeed's own checkpoint of model + optimizer (engine.save_checkpoint)
        model.safetensors  weights only, instead of deepspeed/, for checkpoints written without an
                           engine (`secateur prune`)
        example_input.safetensors  the batch the model's groups are traced with (models that are
                           not secateur's own: meta holds their `source` and pruned `structure`)
    latest                 name of the newest complete checkpoint, written last

Writing goes to `.tmp-step_XXXXXXXX/` first; every file is fsynced, the folder is renamed to its
final name with os.replace, and only then is `latest` replaced (temp file + os.replace). A crash at
any point leaves the previous checkpoint and `latest` untouched.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

FORMAT = "secateur-checkpoint/1"
CKPT_DIR = "checkpoints"
DS_TAG = "deepspeed"
TMP_PREFIX = ".tmp-"


class CheckpointError(ValueError):
    """A run directory or checkpoint that cannot be used (one-line message)."""


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under `root` (files first, then their folders)."""
    for dirpath, _, files in os.walk(root, topdown=False):
        for name in files:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


def write_text_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` so that readers see the old or the new content, never a mix."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


def rng_state() -> dict[str, Any]:
    """This process's RNG states: python, numpy, torch CPU and (when present) every CUDA device."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def tmp_dir_for(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CKPT_DIR / f"{TMP_PREFIX}{step_name(step)}"


def begin(run_dir: Path, step: int) -> Path:
    """Fresh temp folder for the checkpoint of `step` (main rank only; others wait at a barrier)."""
    tmp = tmp_dir_for(run_dir, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def write_rank_state(tmp: Path, rank: int, state: dict[str, Any]) -> None:
    """Each rank's own state file (RNG, pruner accumulators, data position)."""
    path = tmp / f"rank{rank}.pt"
    torch.save(state, path)


def write_meta(tmp: Path, meta: dict[str, Any]) -> None:
    (tmp / "meta.json").write_text(json.dumps({"format": FORMAT, **meta}, indent=1, default=str))


def publish(run_dir: Path, step: int, keep: int | None = None) -> Path:
    """Make the temp checkpoint of `step` durable and current (main rank, after all ranks wrote).

    fsync everything, rename the folder to its final name, then point `latest` at it. Older
    checkpoints beyond the newest `keep` are removed afterwards.
    """
    ckpts = Path(run_dir) / CKPT_DIR
    tmp, final = tmp_dir_for(run_dir, step), ckpts / step_name(step)
    fsync_tree(tmp)
    if final.exists():        # a re-run of the same step (resumed run): the new copy wins
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_path(ckpts)
    write_text_atomic(ckpts / "latest", final.name + "\n")
    if keep is not None:
        done = sorted(p for p in ckpts.iterdir() if p.is_dir() and p.name.startswith("step_"))
        for old in done[:-keep]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    return final


def remove_stale_temps(run_dir: Path) -> None:
    """Delete half-written checkpoints left by a crash."""
    ckpts = Path(run_dir) / CKPT_DIR
    if ckpts.is_dir():
        for p in ckpts.iterdir():
            if p.name.startswith(TMP_PREFIX):
                shutil.rmtree(p) if p.is_dir() else p.unlink()


def latest(run_dir: str | Path) -> Path:
    """The newest complete checkpoint of a run (what `latest` points at)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist")
    pointer = run_dir / CKPT_DIR / "latest"
    if not pointer.is_file():
        raise CheckpointError(f"{run_dir} has no checkpoint (no {CKPT_DIR}/latest)")
    path = run_dir / CKPT_DIR / pointer.read_text().strip()
    if not (path / "meta.json").is_file():
        raise CheckpointError(f"{pointer} points at {path.name}, which is incomplete")
    return path


def read_meta(ckpt: Path) -> dict[str, Any]:
    meta = json.loads((Path(ckpt) / "meta.json").read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{ckpt} is not a {FORMAT} checkpoint")
    return meta


def read_rank_state(ckpt: Path, rank: int) -> dict[str, Any]:
    path = Path(ckpt) / f"rank{rank}.pt"
    if not path.is_file():
        return {}
    # our own file (RNG tuples, numpy state): not a weights-only payload
    return torch.load(path, weights_only=False)


def model_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """Model weights of a checkpoint, without DeepSpeed or a process group.

    Reads model.safetensors when present, else the module state of DeepSpeed's model-states
    file (whole tensors for ZeRO stages 0-2).
    """
    ckpt = Path(ckpt)
    if (ckpt / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(str(ckpt / "model.safetensors"))
    files = sorted((ckpt / DS_TAG).glob("mp_rank_*_model_states.pt"))
    if not files:
        raise CheckpointError(f"{ckpt} holds no model weights")
    return torch.load(files[0], map_location="cpu", weights_only=False)["module"]


def load_model(ckpt: Path) -> tuple[nn.Module, dict[str, Any]]:
    """(model with the checkpoint's architecture and weights, meta) from a checkpoint folder."""
    from secateur.trainer.export import EXAMPLE_FILE, load_example, rebuild

    meta = read_meta(ckpt)
    example = load_example(Path(ckpt) / EXAMPLE_FILE) if (Path(ckpt) / EXAMPLE_FILE).is_file() else None
    model, _ = rebuild(meta, example)
    model.load_state_dict(model_state_dict(ckpt))
    return model, meta


def write_weights_checkpoint(run_dir: Path, step: int, model: nn.Module, meta: dict[str, Any],
                             example: Any = None) -> Path:
    """A complete checkpoint holding weights only (model.safetensors) and, when given, the example
    batch its groups are traced with; written atomically."""
    from safetensors.torch import save_file

    tmp = begin(run_dir, step)
    if example is not None:
        from secateur.trainer.export import EXAMPLE_FILE, save_example

        save_example(example, tmp / EXAMPLE_FILE)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
              str(tmp / "model.safetensors"))
    write_meta(tmp, meta)
    return publish(run_dir, step)
