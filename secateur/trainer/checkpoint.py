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
        manifest.json      size and sha256 of every other file in the folder, written last
    latest                 name of the newest complete checkpoint, written last

Writing goes to `.tmp-step_XXXXXXXX/` first; the manifest is written once every rank has written
its files, every file is fsynced, the folder is renamed to its final name with os.replace, and
only then is `latest` replaced (temp file + os.replace). A crash at any point leaves the previous
checkpoint and `latest` untouched.

Reading (`latest`) trusts nothing on disk: the checkpoint `latest` names is verified against its
manifest; when `latest` is missing, garbage, or names a checkpoint that fails (a flipped byte, a
truncated or deleted file), the newest checkpoint folder that verifies is used instead, with a
one-line warning on stderr naming what was skipped. When none verifies: CheckpointError (the CLI
prints it as one line and exits 2). Checkpoints written before manifests existed (no
manifest.json, and a meta.json without the `manifest` field that newer ones carry) are accepted
with a one-line warning that they cannot be verified; a newer one whose manifest is gone is
damaged.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from secateur.gpucheck.wheels import sha256

FORMAT = "secateur-checkpoint/1"
CKPT_DIR = "checkpoints"
DS_TAG = "deepspeed"
TMP_PREFIX = ".tmp-"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "secateur-manifest/1"
_STEP_RE = re.compile(r"^step_\d{8}$")


class CheckpointError(ValueError):
    """A run directory or checkpoint that cannot be used (one-line message)."""


def step_name(step: int) -> str:
    """Folder name of the checkpoint of `step` (step_00000042)."""
    return f"step_{step:08d}"


def warn(message: str) -> None:
    """One `warning: ...` line on stderr, from the main rank only (RANK unset or 0)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"warning: {message}", file=sys.stderr, flush=True)


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


def _files(folder: Path) -> list[str]:
    """Every file under `folder` (relative POSIX paths, sorted), the manifest itself left out."""
    out = []
    for dirpath, _, names in os.walk(folder):
        for name in names:
            rel = (Path(dirpath) / name).relative_to(folder).as_posix()
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def write_manifest(folder: Path) -> Path:
    """Write `folder/manifest.json`: size and sha256 of every other file under `folder`.

    Called last, once every rank has written its files (reads each file once)."""
    folder = Path(folder)
    files = {rel: {"size": (folder / rel).stat().st_size, "sha256": sha256(folder / rel)}
             for rel in _files(folder)}
    path = folder / MANIFEST
    with open(path, "w") as f:
        json.dump({"format": MANIFEST_FORMAT, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    return path


# verify() results by folder, valid while no file's size or mtime changes (the CLI and the
# Trainer both look up `latest` in one process; the files are read and hashed once)
_VERIFIED: dict[str, tuple[tuple, str | None]] = {}


def _signature(folder: Path) -> tuple:
    return tuple((rel, st.st_size, st.st_mtime_ns) for rel in [*_files(folder), MANIFEST]
                 if (st := _stat(folder / rel)) is not None)


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except OSError:
        return None


def verify(folder: Path) -> str | None:
    """Why the checkpoint `folder` cannot be trusted, in a few words, or None when it is sound.

    Sound: meta.json is present and every file the manifest lists has its recorded size and
    sha256 (files the manifest does not list are ignored). A checkpoint without a manifest
    (written by an older secateur) returns None too; `is_verified` tells the two apart."""
    folder = Path(folder)
    key, sig = str(folder.resolve()), _signature(folder)
    hit = _VERIFIED.get(key)
    if hit is not None and hit[0] == sig:
        return hit[1]
    problem = _verify(folder)
    _VERIFIED[key] = (sig, problem)
    return problem


def _verify(folder: Path) -> str | None:
    if not (folder / "meta.json").is_file():
        return "meta.json is missing"
    if not (folder / MANIFEST).is_file():
        try:
            meta = json.loads((folder / "meta.json").read_text())
        except (ValueError, UnicodeDecodeError, OSError):
            return "meta.json is unreadable"
        # written by a version that writes manifests: the manifest was lost, not never written
        return f"{MANIFEST} is missing" if not isinstance(meta, dict) or "manifest" in meta else None
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
            raise ValueError
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, OSError):
        return f"{MANIFEST} is unreadable"
    for rel, want in sorted(files.items()):
        path = folder / rel
        st = _stat(path)
        if st is None or not path.is_file():
            return f"{rel} is missing"
        if st.st_size != want.get("size"):
            return f"{rel} has {st.st_size} bytes, {want.get('size')} were written"
        if sha256(path) != want.get("sha256"):
            return f"{rel} does not match its checksum"
    return None


def is_verified(folder: Path) -> bool:
    """True when `folder` holds a manifest (checkpoints from older versions, whose meta.json has
    no `manifest` field, do not)."""
    return (Path(folder) / MANIFEST).is_file()


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
    """meta.json of a checkpoint; it records that a manifest is written too (older versions'
    checkpoints lack the field, and only they are accepted without one)."""
    (tmp / "meta.json").write_text(json.dumps({"format": FORMAT, "manifest": MANIFEST, **meta},
                                              indent=1, default=str))


def publish(run_dir: Path, step: int, keep: int | None = None) -> Path:
    """Make the temp checkpoint of `step` durable and current (main rank, after all ranks wrote).

    Write the manifest, fsync everything, rename the folder to its final name, then point
    `latest` at it. Of the checkpoints up to `step`, those beyond the newest `keep` are removed
    afterwards (newer ones, left by a run that was resumed from an earlier checkpoint, are
    replaced when training reaches their step again).
    """
    ckpts = Path(run_dir) / CKPT_DIR
    tmp, final = tmp_dir_for(run_dir, step), ckpts / step_name(step)
    write_manifest(tmp)
    fsync_tree(tmp)
    aside = ckpts / f"{TMP_PREFIX}old-{final.name}"
    if final.exists():        # a re-run of the same step (resumed run): the new copy wins
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(final, aside)
    os.replace(tmp, final)
    try:
        _fsync_path(ckpts)
        write_text_atomic(ckpts / "latest", final.name + "\n")
    except OSError:
        # `latest` still names the previous checkpoint: put this one back aside as unpublished
        os.replace(final, tmp)
        if aside.exists():
            os.replace(aside, final)
        raise
    if aside.exists():
        shutil.rmtree(aside, ignore_errors=True)
    if keep is not None:
        done = sorted(p for p in ckpts.iterdir() if p.is_dir() and _STEP_RE.match(p.name)
                      and p.name <= final.name)
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def discard(run_dir: Path, step: int) -> None:
    """Remove the temp folder of `step` and a half-written `latest` (after a failed save)."""
    ckpts = Path(run_dir) / CKPT_DIR
    shutil.rmtree(tmp_dir_for(run_dir, step), ignore_errors=True)
    (ckpts / f"{TMP_PREFIX}latest").unlink(missing_ok=True)


def remove_stale_temps(run_dir: Path) -> None:
    """Delete half-written checkpoints left by a crash."""
    ckpts = Path(run_dir) / CKPT_DIR
    if ckpts.is_dir():
        for p in ckpts.iterdir():
            if p.name.startswith(TMP_PREFIX):
                shutil.rmtree(p) if p.is_dir() else p.unlink()


def _pointer(ckpts: Path) -> tuple[Path | None, str | None]:
    """(folder `latest` names, None) or (None, what is wrong with `latest`)."""
    pointer = ckpts / "latest"
    if not pointer.is_file():
        return None, f"{CKPT_DIR}/latest is missing"
    try:
        name = pointer.read_bytes().decode("utf-8").strip()
    except (UnicodeDecodeError, OSError):
        name = None
    if not name or not _STEP_RE.match(name):
        return None, f"{CKPT_DIR}/latest is not a checkpoint name"
    if not (ckpts / name).is_dir():
        return None, f"{CKPT_DIR}/latest names {name}, which does not exist"
    return ckpts / name, None


def latest(run_dir: str | Path) -> Path:
    """The newest checkpoint of a run that verifies (see the module docstring).

    Normally the one `latest` names. When `latest` is missing, garbage, or names a checkpoint
    that fails its manifest, the newest `step_*` folder that verifies, with a one-line warning
    naming what was skipped. Checkpoints without a manifest (older versions) are accepted with a
    warning. Raises CheckpointError (one line) when the run has no checkpoint or none verifies.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist")
    ckpts = run_dir / CKPT_DIR
    target, problem = _pointer(ckpts) if ckpts.is_dir() else (None, None)
    if target is not None:
        why = verify(target)
        if why is None:
            _warn_unverified(target)
            return target
        problem = f"{target.name} is damaged ({why})"
    folders = sorted((p for p in ckpts.iterdir() if p.is_dir() and _STEP_RE.match(p.name)
                      and p != target), reverse=True) if ckpts.is_dir() else []
    if target is None and not folders:
        raise CheckpointError(f"{run_dir} has no checkpoint (no {CKPT_DIR}/latest)")
    skipped = []
    for folder in folders:
        why = verify(folder)
        if why is None:
            also = f"; also skipped {', '.join(skipped)}" if skipped else ""
            warn(f"{run_dir}: {problem}{also}; using {folder.name}, the newest checkpoint that verifies")
            _warn_unverified(folder)
            return folder
        skipped.append(f"{folder.name} ({why})")
    also = f"; {', '.join(skipped)}" if skipped else ""
    raise CheckpointError(f"{run_dir}: no checkpoint verifies ({problem}{also})")


def _warn_unverified(folder: Path) -> None:
    if not is_verified(folder):
        warn(f"{folder} has no {MANIFEST} (written by an older secateur); using it unverified")


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
    # each tensor its own copy: safetensors refuses shared storage (tied embeddings)
    save_file({k: v.detach().contiguous().clone() for k, v in model.state_dict().items()},
              str(tmp / "model.safetensors"))
    write_meta(tmp, meta)
    return publish(run_dir, step)
