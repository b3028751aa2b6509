"""Training-time performance, measured side by side in one run (CPU):

  importance  training step time with fused on-the-fly statistics vs none vs a naive forward
              hook that makes a separate pass over every activation (TSRA net and ReLU+BN net)
  shrink      physically shrunk vs masked (same shapes, pruned weights zeroed and re-zeroed after
              every step) models at 0/25/50/75% of units removed: train step and inference latency
  peer        Torch-Pruning 1.6.1 vs secateur on the same trained ReLU+BN network, L2 magnitude,
              50% of the channels of every prunable layer: prune time, parameters, accuracy right
              after and after the same short fine-tune

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/perf_training.py all --out benchmarks/results/perf.json
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _repro_common as C  # noqa: E402

from secateur.models import VGGTSRA  # noqa: E402
from secateur.pruning import Pruner, Rule  # noqa: E402

ARCH = dict(widths=(32, "M", 64, "M", 128), fc=(128,), dropout=0.0)


def _interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Median ms per call of each fn, calls interleaved so noise hits all variants alike."""
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, x, y, after=None):
    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if after is not None:
            after()
    return step


def bench_importance(repeats: int, batch: int) -> list[dict]:
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    rows = []
    for act in ("tsra", "relu"):
        variants = {}
        for mode in ("none", "fused", "naive hook"):
            torch.manual_seed(0)
            m = VGGTSRA(1, 10, act=act, **ARCH).train()
            if mode == "fused":
                Pruner(m, "activation", Rule("ratio", 0.5))        # attaches the statistics
            elif mode == "naive hook":
                acc = {}
                for g in m.unit_groups():
                    g.activation.register_forward_hook(
                        lambda mod, i, o, n=g.name: acc.__setitem__(
                            n, acc.get(n, 0) + o.detach().pow(2).sum([d for d in range(o.dim()) if d != 1])))
            variants[mode] = _train_step(m, torch.optim.AdamW(m.parameters(), 1e-3), x, y)
        ms = _interleaved(variants, repeats)
        for mode, t in ms.items():
            rows.append({"net": act, "statistics": mode, "step_ms": t,
                         "overhead_pct": 100 * (t / ms["none"] - 1)})
    return rows


def _masked(model: nn.Module, ratio: float) -> tuple[nn.Module, callable]:
    """A copy with the L2-lowest units' producer rows, norm entries and consumer columns zeroed,
    and a function that re-applies the masks (what mask-based pruning does after each step)."""
    m = copy.deepcopy(model)
    masks = []
    for g in m.unit_groups():
        s = g.producer_weight_rows().norm(dim=1)
        drop = torch.argsort(s, stable=True)[:int(ratio * g.size)]
        for slot in g.producers + g.consumers + g.norms:
            if isinstance(slot.tensor, nn.Parameter):
                masks.append((slot.tensor, slot.axis, slot.index(drop)))

    @torch.no_grad()
    def apply():
        for t, axis, idx in masks:
            t.index_fill_(axis, idx, 0.0)
    apply()
    return m, apply


def bench_shrink(repeats: int, batch: int) -> list[dict]:
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    xi = torch.randn(256, 1, 28, 28)
    rows = []
    for ratio in (0.0, 0.25, 0.5, 0.75):
        torch.manual_seed(0)
        base = VGGTSRA(1, 10, act="relu", **ARCH)
        shrunk = copy.deepcopy(base)
        if ratio:
            Pruner(shrunk, "l2", Rule("ratio", ratio)).prune()
        masked, reapply = _masked(base, ratio)
        train = {"shrunk": _train_step(shrunk, torch.optim.AdamW(shrunk.parameters(), 1e-3), x, y),
                 "masked": _train_step(masked, torch.optim.AdamW(masked.parameters(), 1e-3), x, y, reapply)}
        ms_t = _interleaved(train, repeats)
        shrunk.eval()
        masked.eval()

        @torch.no_grad()
        def infer(m):
            return lambda: m(xi)
        ms_i = _interleaved({"shrunk": infer(shrunk), "masked": infer(masked)}, repeats)
        rows.append({"removed": ratio, "params_shrunk": C.param_count(shrunk),
                     "params_masked_nonzero": sum(int((p != 0).sum()) for p in masked.parameters()),
                     "params_masked_stored": C.param_count(masked),
                     "train_ms_shrunk": ms_t["shrunk"], "train_ms_masked": ms_t["masked"],
                     "infer_ms_shrunk": ms_i["shrunk"], "infer_ms_masked": ms_i["masked"]})
    return rows


def bench_peer(finetune_steps: int) -> list[dict]:
    import torch_pruning as tp

    base = C.load_base("vgg_relu")
    d = base.data
    xv, yv = d.val.x, d.val.y
    xt, yt = d.train.x, d.train.y
    example = xv[:2]
    rows = [{"tool": "unpruned", "prune_s": 0.0, "params": C.param_count(base.model),
             "acc_after_prune": C.accuracy(base.model, xv, yv), "acc_after_finetune": None}]
    # secateur: declared unit groups, L2 of each unit's producer weights, 50% per layer
    ours = copy.deepcopy(base.model)
    t0 = time.perf_counter()
    Pruner(ours, "l2", Rule("ratio", 0.5)).prune()
    t_ours = time.perf_counter() - t0
    # the same with the norm taken over every tensor tied to a unit (as Torch-Pruning's group norm)
    ours_all = copy.deepcopy(base.model)
    t0 = time.perf_counter()
    Pruner(ours_all, "l2", Rule("ratio", 0.5), tensors="all").prune()
    t_ours_all = time.perf_counter() - t0
    # Torch-Pruning: its DependencyGraph, MagnitudeImportance(p=2), 50% per layer, one step
    theirs = copy.deepcopy(base.model)
    logits = theirs.classifier[-1]
    t0 = time.perf_counter()
    pruner = tp.pruner.MagnitudePruner(theirs, example, importance=tp.importance.MagnitudeImportance(p=2),
                                       pruning_ratio=0.5, ignored_layers=[logits], iterative_steps=1)
    pruner.step()
    t_theirs = time.perf_counter() - t0
    for name, m, t in (("secateur l2 (producer weights)", ours, t_ours),
                       ("secateur l2 (all tied tensors)", ours_all, t_ours_all),
                       ("torch-pruning", theirs, t_theirs)):
        acc0 = C.accuracy(m, xv, yv)
        C.finetune(m, xt, yt, finetune_steps)
        rows.append({"tool": name, "prune_s": t, "params": C.param_count(m), "acc_after_prune": acc0,
                     "acc_after_finetune": C.accuracy(m, xv, yv)})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["importance", "shrink", "peer", "all"])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--finetune-steps", type=int, default=200)
    ap.add_argument("--out", default="benchmarks/results/perf.json")
    args = ap.parse_args(argv)
    res = {"meta": C.run_meta(argv)}
    if args.what in ("importance", "all"):
        res["importance"] = bench_importance(args.repeats, args.batch)
        print(C.md_table(["net", "statistics", "step ms", "overhead %"],
                         [[r["net"], r["statistics"], f"{r['step_ms']:.1f}", f"{r['overhead_pct']:+.1f}"]
                          for r in res["importance"]]), flush=True)
    if args.what in ("shrink", "all"):
        res["shrink"] = bench_shrink(args.repeats, args.batch)
        print(C.md_table(["removed", "params shrunk", "nonzero params masked", "train ms shrunk",
                          "train ms masked", "infer ms shrunk", "infer ms masked"],
                         [[f"{r['removed']:.0%}", f"{r['params_shrunk']:,}", f"{r['params_masked_nonzero']:,}",
                           f"{r['train_ms_shrunk']:.1f}", f"{r['train_ms_masked']:.1f}",
                           f"{r['infer_ms_shrunk']:.1f}", f"{r['infer_ms_masked']:.1f}"]
                          for r in res["shrink"]]), flush=True)
    if args.what in ("peer", "all"):
        res["peer"] = bench_peer(args.finetune_steps)
        print(C.md_table(["tool", "prune s", "params", "acc after prune", "acc after fine-tune"],
                         [[r["tool"], f"{r['prune_s']:.3f}", f"{r['params']:,}", f"{r['acc_after_prune']:.4f}",
                           "-" if r["acc_after_finetune"] is None else f"{r['acc_after_finetune']:.4f}"]
                          for r in res["peer"]]), flush=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
