"""Shared pieces of the method reproductions (benchmarks/repro_*.py): the trained base runs,
evaluation, calibration, a fixed fine-tuning loop, BatchNorm statistics repair, FLOP counting,
and the JSON / markdown / PNG outputs.

Everything runs in memory on the CPU; one thread is used by default (the reproductions were
measured on two shared cores, where a second thread competing with another job made torch
several times slower).
"""
from __future__ import annotations

import copy
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
DISCUSSION = "<!-- discussion: text below this line is kept when the script rewrites the file -->"
BASES = {   # name -> (config, run directory)
    "vgg_tsra": ("configs/fmnist_vgg_tsra.yaml", "runs/repro/vgg_tsra"),
    "vgg_relu": ("configs/fmnist_vgg_relu.yaml", "runs/repro/vgg_relu"),
}

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
os.environ.setdefault("DS_ACCELERATOR", "cpu")


# ---- runs ---------------------------------------------------------------------------------------
def secateur_cli(*args: str) -> None:
    """Run the `secateur` command line (in the venv next to this interpreter) from the repo root."""
    exe = Path(sys.executable).with_name("secateur")
    cmd = [str(exe) if exe.exists() else "secateur", *args]
    print("$", " ".join(shlex.quote(c) for c in cmd), flush=True)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if res.returncode != 0:     # the progress bar is noise; show the error lines only
        sys.stderr.write(res.stderr[-4000:])
        raise subprocess.CalledProcessError(res.returncode, cmd)
    print(res.stdout.strip(), flush=True)


def ensure_run(config: str, run_dir: str) -> Path:
    """The run directory `run_dir`, trained with `config` first when it has no checkpoint."""
    path = REPO / run_dir
    if not (path / "checkpoints" / "latest").exists():
        print(f"{run_dir}: no checkpoint, training it from {config} (a few minutes)", flush=True)
        secateur_cli("train", "--config", config, "--out", run_dir, "--overwrite")
    return path


@dataclass
class Base:
    """A trained run loaded in memory: model (eval mode), its validated config and its data."""
    name: str
    model: nn.Module
    cfg: Any
    data: Any       # secateur.data.Dataset
    step: int


def load_run(run_dir: str | Path, name: str = "") -> Base:
    from secateur.trainer import checkpoint as ckpt
    from secateur.trainer.config import parse_config
    from secateur.trainer.setup import dataset_from_config

    src = ckpt.latest(REPO / run_dir)
    model, meta = ckpt.load_model(src)
    cfg = parse_config(meta["config"], str(src))
    return Base(name or Path(run_dir).name, model.eval(), cfg, dataset_from_config(cfg), int(meta["step"]))


def load_base(name: str) -> Base:
    """One of the two Fashion-MNIST VGG base runs ('vgg_tsra' or 'vgg_relu'), trained if missing."""
    config, run_dir = BASES[name]
    ensure_run(config, run_dir)
    return load_run(run_dir, name)


# ---- evaluation and statistics ---------------------------------------------------------------
@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy of `model` (eval mode) on images x (N, C, H, W) with labels y (N,)."""
    was = model.training
    model.eval()
    correct = sum(int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
                  for i in range(0, len(x), batch_size))
    model.train(was)
    return correct / len(x)


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates of the Conv2d and Linear layers for one input of `input_shape`
    (C, H, W): conv = H_out W_out C_out (C_in / groups) kh kw, linear = in * out."""
    total = [0]

    def hook(m: nn.Module, inp: Any, out: Tensor) -> None:
        if isinstance(m, nn.Conv2d):
            total[0] += out[0].numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        else:
            total[0] += m.in_features * m.out_features
    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            was = model.training
            model.eval()
            model(torch.zeros(1, *input_shape))
            model.train(was)
    finally:
        for h in hooks:
            h.remove()
    return total[0]


@torch.no_grad()
def calibrate(pruner: Any, model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 128) -> None:
    """Forward the calibration images x (N, ...) through `model` in eval mode so the pruner's
    criterion collects its statistics; targets go to the pruner first when it needs them (CoSeP)."""
    model.eval()
    for i in range(0, len(x), batch_size):
        if pruner.needs_targets:
            pruner.observe_targets(y[i:i + batch_size])
        model(x[i:i + batch_size])


def prune_copy(model: nn.Module, criterion: str, rule: Any, calib: tuple[Tensor, Tensor] | None = None,
               layers: Sequence[str] | None = None, example_input: Tensor | None = None,
               **criterion_args: Any) -> tuple[nn.Module, list]:
    """A pruned deep copy of `model`: Pruner(criterion, rule) over `layers` (all groups when None),
    statistics from the calibration pair `calib` = (x, y) when given; `example_input` traces
    models that do not declare their unit groups. Returns (model, report)."""
    from secateur.pruning import Pruner

    m = copy.deepcopy(model)
    pruner = Pruner(m, criterion, rule, layers=layers, example_input=example_input, **criterion_args)
    if calib is not None:
        calibrate(pruner, m, *calib)
    report = pruner.prune()
    pruner.close()
    return m.eval(), report


def widths(model: nn.Module) -> dict[str, int]:
    return {g.name: int(g.size) for g in model.unit_groups()}


@torch.no_grad()
def bn_reset(model: nn.Module, x: Tensor, batch_size: int = 100) -> nn.Module:
    """Recompute every BatchNorm's running mean and variance from the images x (e.g. 1,000
    training images) as a cumulative average (momentum=None), in place, with
    `secateur.pruning.reset_batchnorm_stats`; weights are unchanged and dropout stays off.
    A model without BatchNorm is returned as it is."""
    from secateur.pruning import reset_batchnorm_stats

    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        reset_batchnorm_stats(model, (x[i:i + batch_size] for i in range(0, len(x), batch_size)))
    return model.eval()


def finetune(model: nn.Module, x: Tensor, y: Tensor, steps: int, lr: float = 1e-3,
             batch_size: int = 128, weight_decay: float = 5e-4, seed: int = 0) -> nn.Module:
    """Fine-tune `model` in place: AdamW (decay on tensors with >= 2 dims), cosine LR from `lr` to
    0 over `steps` steps, gradient clipping at 1.0, batches from a seeded shuffle of (x, y), so
    every method gets the identical data order and budget. The global RNG is seeded too, so the
    dropout masks are the same for every method and every run."""
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}], lr=lr)
    g = torch.Generator().manual_seed(seed)
    order, pos = torch.randperm(len(x), generator=g), 0
    model.train()
    for step in range(steps):
        if pos + batch_size > len(x):
            order, pos = torch.randperm(len(x), generator=g), 0
        idx = order[pos:pos + batch_size]
        pos += batch_size
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / steps))
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    return model.eval()


def bisect(fn: Callable[[float], float], target: float, lo: float = 0.0, hi: float = 0.95,
           iters: int = 14) -> float:
    """The x in [lo, hi] where the increasing function fn(x) reaches `target` (bisection)."""
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fn(mid) < target else (lo, mid)
    return hi


# ---- outputs ------------------------------------------------------------------------------------
def run_meta(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Machine, date, torch version, threads and the exact command line."""
    args = list(sys.argv[1:] if argv is None else argv)
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(REPO)
    except ValueError:
        pass
    return {"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared with other jobs), no GPU",
            "torch": torch.__version__, "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
            "command": "OMP_NUM_THREADS=1 .venv/bin/python " + " ".join(shlex.quote(a) for a in [str(script), *args])}


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) < 10 else f"{v:,.1f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(out)


def line_plot(path: Path, panels: Sequence[dict[str, Any]], suptitle: str = "") -> None:
    """One PNG with one axis per panel; a panel is {"title", "xlabel", "ylabel", "series":
    {label: (xs, ys)}, optional "hline": (y, label), optional "styles": {label: fmt}}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 4.3), squeeze=False)
    for ax, p in zip(axes[0], panels):
        for label, (xs, ys) in p["series"].items():
            ax.plot(xs, ys, p.get("styles", {}).get(label, "o-"), label=label, markersize=4)
        if p.get("hline"):
            ax.axhline(p["hline"][0], color="gray", ls=":", lw=1, label=p["hline"][1])
        ax.set(title=p.get("title", ""), xlabel=p.get("xlabel", ""), ylabel=p.get("ylabel", ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def publish(name: str, title: str, out: str | Path, meta: dict[str, Any], data: dict[str, Any],
            intro: str, table: str, plot: Callable[[Path], None]) -> None:
    """Write out/<name>.png (by `plot`), out/<name>.json (meta + data) and out/<name>.md (title,
    meta, intro, table, plot) and print the table. Text after the DISCUSSION marker of an existing
    .md is carried over, so a hand-written comparison survives a re-run."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plot(out / f"{name}.png")
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, **data}, indent=1))
    md = out / f"{name}.md"
    kept = md.read_text().split(DISCUSSION, 1)[1] if md.exists() and DISCUSSION in md.read_text() else ""
    head = (f"# {title}\n\n- Machine: {meta['machine']}; torch {meta['torch']}, {meta['threads']} thread(s).\n"
            f"- Date: {meta['date']}. Wall time: {meta.get('seconds', 0):.0f} s.\n"
            f"- Command: `{meta['command']}`\n\n")
    md.write_text(head + intro.rstrip() + f"\n\n{table}\n\n![{name}]({name}.png)\n\n" + DISCUSSION
                  + (kept or "\n"))
    print(f"\n{table}\n\nwrote {out}/{name}.json, {name}.md, {name}.png ({meta.get('seconds', 0):.0f} s)")
