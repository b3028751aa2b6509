"""The model zoo, side by side with Torch-Pruning: which models each tool prunes and then trains.

For every torchvision classification model under 60M parameters (random init, 10 classes) and a
set of tiny-config Hugging Face models, each tool prunes 30% of every prunable group by L2
magnitude through its generic path, then the model takes one AdamW training step. A model counts
as pruned-and-trainable when the prune and the step succeed, the logits keep their shape and the
parameter count dropped. Both tools see the same fresh model, input, criterion and ratio.

    python benchmarks/zoo.py --out benchmarks/results/zoo     # zoo.json + zoo.md
    python benchmarks/zoo.py --only resnet18,bert             # a subset
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from datetime import date
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from secateur.zoo import hf_zoo, logits as _logits, torchvision_zoo

MAX_PARAMS = 60e6
MARKER = "<!-- discussion: text below this line is kept when the script rewrites the file -->\n"
TIME_LIMIT = 300                  # seconds per model and tool
MEMORY_LIMIT = 8 * 2 ** 30        # bytes of address space per model and tool


def prune_secateur(model: nn.Module, x: Any, opt: torch.optim.Optimizer) -> None:
    from secateur.pruning import Pruner, Rule
    Pruner(model, "l2", Rule("ratio", 0.3), example_input=x).prune(opt)


def prune_tp(model: nn.Module, x: Any, opt: torch.optim.Optimizer) -> None:
    import torch_pruning as tp
    with torch.no_grad():
        out = _logits(model(x))
    # Torch-Pruning's users name the classifier in ignored_layers: every layer that produces
    # the class axis (a Linear head, or SqueezeNet's final convolution)
    classes = out.shape[-1]
    head = [m for m in model.modules() if (isinstance(m, nn.Linear) and m.out_features == classes)
            or (isinstance(m, nn.Conv2d) and m.out_channels == classes)]
    pr = tp.pruner.MetaPruner(model, x, importance=tp.importance.MagnitudeImportance(p=2),
                              pruning_ratio=0.3, ignored_layers=head)
    pr.step()


def run_one(tool: Callable, make: Callable[[], nn.Module], x: Any) -> dict[str, Any]:
    torch.manual_seed(0)
    model = make().train()
    n0 = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        shape0 = tuple(_logits(model(x)).shape)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            tool(model, x, opt)
            dt = time.perf_counter() - t
            opt = torch.optim.AdamW(model.parameters(), 1e-3) if tool is prune_tp else opt
            out = _logits(model(x))
            out.float().pow(2).mean().backward()
            opt.step()
        except Exception as e:  # noqa: BLE001 - the table records every failure
            return {"ok": False, "error": f"{type(e).__name__}: {' '.join(str(e).split())[:160]}",
                    "params": n0}
    n1 = sum(p.numel() for p in model.parameters())
    ok = tuple(out.shape) == shape0 and n1 < n0
    return {"ok": ok, "error": None if ok else f"logits {shape0}->{tuple(out.shape)}, params {n0}->{n1}",
            "params": n0, "left": n1 / n0, "prune_s": dt}


def _child(conn: Any, tool_name: str, model: str) -> None:
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    torch.set_num_threads(1)
    make, x = {**torchvision_zoo(), **hf_zoo()}[model]
    try:
        conn.send(run_one({"secateur": prune_secateur, "torch_pruning": prune_tp}[tool_name], make, x))
    except BaseException as e:  # noqa: BLE001 - MemoryError included
        conn.send({"ok": False, "error": f"{type(e).__name__}: {str(e)[:160]}"})


def isolated(tool_name: str, model: str) -> dict[str, Any]:
    """run_one in a child process with a time and memory limit (a tool's search may not end)."""
    import multiprocessing as mp
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(send, tool_name, model))
    p.start()
    if recv.poll(TIME_LIMIT):
        out = recv.recv()
    else:
        out = {"ok": False, "error": f"no result within {TIME_LIMIT} s"}
    p.kill()
    p.join()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/zoo"))
    ap.add_argument("--only", default="", help="comma-separated model names")
    ap.add_argument("--no-tp", action="store_true", help="secateur only")
    args = ap.parse_args()
    torch.set_num_threads(1)
    zoo = {**torchvision_zoo(max_params=MAX_PARAMS), **hf_zoo()}
    if args.only:
        zoo = {k: v for k, v in zoo.items() if k in set(args.only.split(","))}
    rows = []
    for name, (make, x) in zoo.items():
        try:
            n = sum(p.numel() for p in make().parameters())
        except Exception as e:  # noqa: BLE001
            print(f"{name}: cannot build ({e})", file=sys.stderr)
            continue
        if n > MAX_PARAMS:
            continue
        row = {"model": name, "params": n, "secateur": isolated("secateur", name)}
        if not args.no_tp:
            row["torch_pruning"] = isolated("torch_pruning", name)
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"date": str(date.today()), "machine": f"{platform.machine()}, {torch.get_num_threads()} thread",
            "torch": torch.__version__, "command": "python " + " ".join(sys.argv)}
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    md = args.out.with_suffix(".md")
    kept = md.read_text().split(MARKER, 1)[1] if md.exists() and MARKER in md.read_text() else "\n"
    md.write_text(markdown(meta, rows) + "\n" + MARKER + kept)


def markdown(meta: dict, rows: list[dict]) -> str:
    tools = [t for t in ("secateur", "torch_pruning") if all(t in r for r in rows)]
    lines = ["# Model zoo: prune 30% (L2), then one training step\n",
             f"{meta['date']}, {meta['machine']}, torch {meta['torch']}; `{meta['command']}`\n"]
    for t in tools:
        ok = sum(r[t]["ok"] for r in rows)
        lines.append(f"- {t}: {ok} of {len(rows)} pruned and trainable")
    lines.append("\n| model | params | " + " | ".join(f"{t} (left, prune s)" for t in tools) + " |")
    lines.append("|---|---:|" + "---|" * len(tools))
    for r in rows:
        cells = []
        for t in tools:
            c = r[t]
            cells.append(f"ok {c['left']:.0%}, {c['prune_s']:.2f}" if c["ok"] else f"FAIL: {c['error'][:90]}")
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.1f}M | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
