"""Training-step performance of a pruned Hugging Face LLaMA (grouped-query attention, SwiGLU,
RMSNorm) built from a config, measured side by side in one run (CPU, one thread):

  shrink    step time (forward + backward + AdamW) of models pruned with secateur's Pruner (heads
            + MLP neurons, L2, ratio rule, scope "uniform", with and without round_to=8) against
            the dense model, next to the ratio of training FLOPs
  overhead  the activation criterion's statistics hooks during training vs no statistics vs a
            naive forward pre-hook per MLP / attention output that computes its own sum of squares
  compile   torch.compile of the loss (model forward + cross-entropy; AOTAutograd compiles its
            backward) across pruning events: cold compile, compiled vs eager step before and after
            an in-place Pruner.prune, and the recompile paid by the first step after an event.
            Every scheme runs in its own process with an empty inductor cache, so each compile is
            cold and no scheme profits from another's cache.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/transformer_perf.py            # full run
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/transformer_perf.py --quick    # smoke run
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/transformer_perf.py --parts compile \
        --schemes dynamic auto-dynamic-params                                   # more schemes

A run of some parts, sizes or schemes keeps the other entries of an earlier run with the same
batch and torch version in the output, and the report names the run that measured each. The
smoke run (--quick) uses a short batch, a one-layer toy model and the aot_eager backend for the
compile part (graph capture, recompiles and the event path, without C++ compilation), and writes
to the temporary folder unless --out is given.

FLOPs are counted by torch.utils.flop_counter.FlopCounterMode over one forward + backward, with
the CPU flash-attention kernels (absent from torch's table) counted as torch counts attention
elsewhere (the full score matrix, causal masking ignored). Element-wise work (norms, SiLU,
softmax, AdamW) is not counted. Timings are medians of interleaved repeats; ratios are medians of
the per-round ratios (every variant of a table runs once per round, back to back), which cancels
most of the drift of a shared machine. Writes benchmarks/results/transformer_perf.{json,md}.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _repro_common as C  # noqa: E402

HERE = Path(__file__).resolve()
OUT = C.RESULTS / "transformer_perf"
COMMON = {"num_hidden_layers": 4, "vocab_size": 4096, "max_position_embeddings": 256,
          "tie_word_embeddings": True, "use_cache": False}
SIZES = {   # configs/llama_kjv.yaml's model, a wider one, and a toy for the smoke run
    "small": {"hidden_size": 128, "intermediate_size": 384, "num_attention_heads": 8, "num_key_value_heads": 4},
    "large": {"hidden_size": 256, "intermediate_size": 1024, "num_attention_heads": 8, "num_key_value_heads": 4},
    "toy": {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
            "num_hidden_layers": 1},
}
# ratios whose MLP widths are multiples of 8 anyway (0.5, 0.75) and ones whose are not (0.3, 0.6)
RATIOS = (0.3, 0.5, 0.6, 0.75)
UNITS = ("heads", "mlp")
SCHEMES = {
    "static": "torch.compile(loss), default (static shapes; parameters always static)",
    "dynamic": "torch.compile(loss, dynamic=True) (inputs symbolic; parameters still static)",
    "dynamic-params": "torch.compile(loss, dynamic=True) with dynamo's force_parameter_static_shapes and "
                      "force_nn_module_property_static_shapes off and no duck sizing (parameter shapes symbolic)",
    "auto-dynamic-params": "torch.compile(loss), default, with parameter shapes allowed to become dynamic: the "
                           "first event's recompile marks the changed widths dynamic (automatic dynamic shapes)",
    "regional": "each decoder layer compiled in place (module.compile()), embeddings, head and loss eager: "
                "the layers share one compiled graph",
}


@dataclass
class Setup:
    """What one measurement trains: a model size and a batch of token ids."""
    size: str
    batch: int = 16
    seq: int = 128


# ---- model, step, FLOPs, timing ---------------------------------------------------------------
def build_llama(size: str, seed: int = 0) -> nn.Module:
    """A randomly initialised LlamaForCausalLM of one of SIZES, in training mode."""
    import transformers as T

    torch.manual_seed(seed)
    return T.LlamaForCausalLM(T.LlamaConfig(**{**COMMON, **SIZES[size]})).train()


def token_batch(setup: Setup, vocab: int = COMMON["vocab_size"], seed: int = 0) -> Tensor:
    """Random token ids (batch, seq), the same for every variant (seeded)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (setup.batch, setup.seq), generator=g)


def lm_loss(model: nn.Module, ids: Tensor) -> Tensor:
    """Next-token cross-entropy of a causal LM on the token ids (B, T)."""
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def train_step(model: nn.Module, ids: Tensor, loss: Callable[[nn.Module, Tensor], Tensor] = lm_loss,
               lr: float = 1e-3) -> Callable[[], float]:
    """A closure doing one training step (forward, backward, AdamW) on `ids`; returns the loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)

    def step() -> float:
        value = loss(model, ids)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        return float(value.detach())
    step.optimizer = opt            # the event prunes the moments too
    return step


def _attention_forward_flops(q: Sequence[int], k: Sequence[int], v: Sequence[int], *args: Any,
                             out_shape: Any = None, **kwargs: Any) -> int:
    # scores q @ k^T and output p @ v, each 2 FLOPs per multiply-add, all query heads
    b, h, s_q, d = q
    s_k, d_v = k[-2], v[-1]
    return 2 * b * h * s_q * s_k * (d + d_v)


def _attention_backward_flops(grad_out: Sequence[int], q: Sequence[int], k: Sequence[int],
                              v: Sequence[int], *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    # the scores recomputed, then grad of p (from v), of v, of q and of k: five products
    b, h, s_q, d = q
    s_k, d_v = k[-2], v[-1]
    return 2 * b * h * s_q * s_k * (3 * d + 2 * d_v)


def cpu_attention_flops() -> dict[Any, Callable[..., int]]:
    """FlopCounterMode `custom_mapping` for the CPU flash-attention ops (torch counts only the
    GPU attention kernels); empty where this torch lacks them."""
    aten = torch.ops.aten
    out: dict[Any, Callable[..., int]] = {}
    for name, fn in (("_scaled_dot_product_flash_attention_for_cpu", _attention_forward_flops),
                     ("_scaled_dot_product_flash_attention_for_cpu_backward", _attention_backward_flops)):
        if hasattr(aten, name):
            out[getattr(aten, name)] = fn
    return out


def step_flops(model: nn.Module, inputs: Any, loss: Callable[[nn.Module, Any], Tensor]) -> int:
    """FLOPs of one forward + backward of `loss(model, inputs)` counted by FlopCounterMode
    (matrix products and attention; the gradients it leaves are cleared)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=cpu_attention_flops()) as counter:
        loss(model, inputs).backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Milliseconds of every call of each fn over `repeats` rounds; each round calls every fn once,
    back to back, so a slow spell of a shared machine hits all variants of the round alike."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return times


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median over rounds of num[i] / den[i] (times measured in the same round)."""
    if len(num) != len(den) or not num:
        raise ValueError(f"paired_ratio: need two equally long non-empty series, got {len(num)} and {len(den)}")
    return statistics.median(a / b for a, b in zip(num, den))


def llama_widths(model: nn.Module) -> dict[str, int]:
    """Query heads, key/value heads and MLP neurons of the first decoder layer (scope "uniform"
    gives every layer the same), checked to be the same in every layer."""
    seen = set()
    for layer in model.model.layers:
        att, d = layer.self_attn, layer.self_attn.head_dim
        seen.add((att.q_proj.out_features // d, att.k_proj.out_features // d, layer.mlp.up_proj.out_features))
    if len(seen) != 1:
        raise ValueError(f"layers differ in width: {sorted(seen)}")
    q, kv, mlp = seen.pop()
    return {"q_heads": q, "kv_heads": kv, "mlp": mlp}


def prune_llama(model: nn.Module, ids: Tensor, ratio: float, round_to: int | None = None,
                criterion: str = "l2", event: bool = True) -> Any:
    """A Pruner over the heads and MLP neurons of `model` (rule ratio `ratio`, scope "uniform"),
    after one event when `event` (statistics criteria need forwards first)."""
    from secateur.pruning import Pruner, Rule

    p = Pruner(model, criterion, Rule("ratio", ratio, "uniform"), example_input={"input_ids": ids[:2]},
               unit_kinds=UNITS, round_to=round_to)
    if event:
        p.prune()
    return p


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- 1. shrink pays ------------------------------------------------------------------------------
def bench_shrink(setup: Setup, repeats: int, ratios: Sequence[float] = RATIOS) -> list[dict]:
    """Dense vs pruned copies (each ratio with round_to None and 8; a variant whose widths equal
    an earlier one's reuses its timing), all timed in one interleaved loop."""
    ids = token_batch(setup)
    base = build_llama(setup.size)
    models: dict[str, nn.Module] = {"dense": base}
    rows: list[dict] = [{"variant": "dense", "ratio": 0.0, "round_to": None, "same_as": None}]
    by_widths = {tuple(llama_widths(base).values()): "dense"}
    for r in ratios:
        for rt in (None, 8):
            name = f"-{r:.0%}" + (" round_to 8" if rt else "")
            m = copy.deepcopy(base)
            prune_llama(m, ids, r, rt).close()
            key = tuple(llama_widths(m).values())
            row = {"variant": name, "ratio": r, "round_to": rt, "same_as": by_widths.get(key)}
            if row["same_as"] is None:
                by_widths[key] = name
                models[name] = m
            rows.append(row)
    for row in rows:
        m = models[row["same_as"] or row["variant"]]
        row.update(llama_widths(m), params=params(m), flops=step_flops(m, ids, lm_loss))
    times = interleaved({k: train_step(m, ids) for k, m in models.items()}, repeats)
    dense = rows[0]
    for row in rows:
        t = times[row["same_as"] or row["variant"]]
        row["step_ms"] = statistics.median(t)
        row["step_ratio"] = paired_ratio(t, times["dense"])
        row["flops_ratio"] = row["flops"] / dense["flops"]
        row["params_ratio"] = row["params"] / dense["params"]
        row["ratio_over_flops"] = row["step_ratio"] / row["flops_ratio"]
        row["goal_met"] = row["ratio_over_flops"] <= 1.3
        row["repeats"] = repeats
    return rows


# ---- 2. statistics overhead ------------------------------------------------------------------
def _naive_hooks(model: nn.Module) -> dict[str, Tensor]:
    """Forward pre-hooks on every MLP down projection and attention output projection that add
    their input's per-channel sum of squares to an accumulator (a separate pass each)."""
    acc: dict[str, Tensor] = {}
    for i, layer in enumerate(model.model.layers):
        for name, mod in ((f"{i}.mlp", layer.mlp.down_proj), (f"{i}.attn", layer.self_attn.o_proj)):
            acc[name] = torch.zeros(mod.in_features)

            def hook(m: nn.Module, inp: tuple, key: str = name) -> None:
                x = inp[0].detach()
                acc[key] += x.pow(2).sum(dim=tuple(range(x.dim() - 1)))
            mod.register_forward_pre_hook(hook)
    return acc


def hook_cost_ms(model: nn.Module, ids: Tensor, repeats: int = 40) -> dict[str, float]:
    """Milliseconds per training step that the statistics alone cost, timed in isolation on the
    activations one forward produces (the inputs of every down_proj and o_proj): the Pruner's
    hook body (kernels.channel_sq_sum into its accumulator, plus the count) and the naive one.
    Free of the step-to-step noise that a difference of whole steps carries."""
    from secateur.kernels import channel_sq_sum

    xs: list[Tensor] = []
    mods = [m for layer in model.model.layers for m in (layer.mlp.down_proj, layer.self_attn.o_proj)]
    handles = [m.register_forward_pre_hook(lambda mod, inp: xs.append(inp[0].detach().clone())) for m in mods]
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    accs = [torch.zeros(x.shape[-1]) for x in xs]
    count = torch.zeros((), dtype=torch.float64)

    def pruner_body() -> None:
        for x, a in zip(xs, accs):
            channel_sq_sum(x, -1, out=a)
            count.add_(x.numel() // x.shape[-1])

    def naive_body() -> None:
        for x, a in zip(xs, accs):
            a += x.pow(2).sum(dim=tuple(range(x.dim() - 1)))
    t = interleaved({"pruner activation": pruner_body, "naive hook": naive_body}, repeats)
    return {k: statistics.median(v) for k, v in t.items()}


def bench_overhead(setup: Setup, repeats: int) -> list[dict]:
    """Training step with no statistics, with the Pruner's activation statistics, and with the
    naive hooks, timed in one interleaved loop; plus each statistic's isolated cost."""
    ids = token_batch(setup)
    base = build_llama(setup.size)
    fused, naive = copy.deepcopy(base), copy.deepcopy(base)
    pruner = prune_llama(fused, ids, 0.5, criterion="activation", event=False)   # hooks attached
    acc = _naive_hooks(naive)
    times = interleaved({"none": train_step(base, ids), "pruner activation": train_step(fused, ids),
                         "naive hook": train_step(naive, ids)}, repeats)
    counts = {k: float(v) for k, v in pruner.stats().items() if k.endswith(".count")}
    if not counts or min(counts.values()) == 0 or not all(float(a.sum()) > 0 for a in acc.values()):
        raise RuntimeError("overhead: a statistics variant observed nothing")
    pruner.close()
    alone = hook_cost_ms(base, ids)
    none_ms = statistics.median(times["none"])
    rows = []
    for k, t in times.items():
        ratios = [a / b for a, b in zip(t, times["none"])]
        q1, _, q3 = statistics.quantiles(ratios, n=4)
        r = paired_ratio(t, times["none"])
        rows.append({"statistics": k, "step_ms": statistics.median(t), "overhead_pct": 100 * (r - 1),
                     "overhead_iqr_pct": [100 * (q1 - 1), 100 * (q3 - 1)],
                     "isolated_ms": alone.get(k, 0.0), "isolated_pct": 100 * alone.get(k, 0.0) / none_ms,
                     "goal_met": k == "none" or alone.get(k, 0.0) <= 0.03 * none_ms, "repeats": repeats})
    return rows


# ---- 3. torch.compile across pruning events ------------------------------------------------------
def _configure(scheme: str, model: nn.Module, backend: str = "inductor") -> Callable[[nn.Module, Tensor], Tensor]:
    """The loss function the compiled model trains with under `scheme` (see SCHEMES)."""
    dyn = torch._dynamo.config
    if scheme in ("dynamic-params", "auto-dynamic-params"):
        dyn.force_parameter_static_shapes = False
        dyn.force_nn_module_property_static_shapes = False
    if scheme == "dynamic-params":
        torch.fx.experimental._config.use_duck_shape = False   # q_proj rows == seq 128 would be tied
    if scheme == "static" or scheme == "auto-dynamic-params":
        return torch.compile(lm_loss, backend=backend)
    if scheme in ("dynamic", "dynamic-params"):
        return torch.compile(lm_loss, dynamic=True, backend=backend)
    if scheme == "regional":
        for layer in model.model.layers:
            layer.compile(backend=backend)
        return lm_loss
    raise ValueError(f"scheme: one of {sorted(SCHEMES)}, got {scheme!r}")


class GuardFailures(logging.Handler):
    """Collects, from dynamo's "recompiles" log, the first guard failure behind each recompile,
    with module paths shortened (mod.model.layers.0.mlp.up_proj.weight)."""

    def __init__(self) -> None:
        super().__init__()
        self.reasons: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if "triggered by the following guard failure" not in msg:
            return
        lines = [ln.strip()[2:] for ln in msg.splitlines() if ln.strip().startswith("- ")]
        text = re.sub(r"\._(?:modules|parameters|buffers)\['([^']+)'\]", r".\1", lines[0] if lines else msg)
        self.reasons.append(re.sub(r"^\d+/\d+: ", "", text)[:240])


def _graphs() -> int:
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def run_scheme(scheme: str, setup: Setup, repeats: int, events: int, backend: str = "inductor") -> dict[str, Any]:
    """Cold compile, compiled vs eager steps, then `events` pruning events (50% of the remaining
    heads and neurons each, the eager twin cut alike) with the recompile each costs. One process
    per scheme (dynamo's settings are global)."""
    ids = token_batch(setup)
    comp = build_llama(setup.size)
    eager = copy.deepcopy(comp)
    # pruners first: building one traces the model, which must not go through compiled code
    p_comp, p_eager = prune_llama(comp, ids, 0.5, event=False), prune_llama(eager, ids, 0.5, event=False)
    loss = _configure(scheme, comp, backend)
    step_c, step_e = train_step(comp, ids, loss), train_step(eager, ids)
    out: dict[str, Any] = {"scheme": scheme, "size": setup.size, "backend": backend,
                           "description": SCHEMES[scheme]}
    failures = GuardFailures()
    torch._logging.set_logs(recompiles=True)
    logging.getLogger("torch._dynamo.guards.__recompiles").addHandler(failures)
    t0 = time.perf_counter()
    out["loss_eager"] = step_e()
    out["eager_first_step_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    out["loss_compiled"] = step_c()     # the same weights and batch: equal up to rounding
    out["cold_step_s"] = time.perf_counter() - t0
    out["graphs_after_cold"] = _graphs()
    phases = []

    def measure(label: str, widths: dict[str, int], first_s: float | None, graphs_before: int) -> None:
        t = interleaved({"eager": step_e, "compiled": step_c}, repeats)
        ms_c, ms_e = statistics.median(t["compiled"]), statistics.median(t["eager"])
        phases.append({"phase": label, **widths, "compiled_ms": ms_c, "eager_ms": ms_e,
                       "compiled_over_eager": paired_ratio(t["compiled"], t["eager"]),
                       "first_step_s": first_s,
                       "recompile_s": None if first_s is None else max(0.0, first_s - ms_c / 1e3),
                       "new_graphs": _graphs() - graphs_before})

    measure("dense", llama_widths(comp), None, out["graphs_after_cold"])
    for k in range(1, events + 1):
        p_comp.prune(step_c.optimizer)
        p_eager.prune(step_e.optimizer)
        g0, n0 = _graphs(), len(failures.reasons)
        t0 = time.perf_counter()
        step_c()
        first = time.perf_counter() - t0
        measure(f"after event {k}", llama_widths(comp), first, g0)
        phases[-1]["recompiled_because"] = failures.reasons[n0:n0 + 1]
    out["phases"] = phases
    return out


def bench_compile(setup: Setup, repeats: int, events: int, schemes: Sequence[str],
                  timeout_s: float, backend: str = "inductor") -> list[dict]:
    """Every scheme in a fresh process with an empty inductor cache (cold compiles)."""
    rows = []
    for scheme in schemes:
        with tempfile.TemporaryDirectory(prefix="secateur-inductor-") as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "OMP_NUM_THREADS": "1",
                   "PYTHONWARNINGS": "ignore"}
            res = Path(cache) / "result.json"
            cmd = [sys.executable, str(HERE), "_scheme", scheme, "--size", setup.size, "--batch",
                   str(setup.batch), "--seq", str(setup.seq), "--repeats", str(repeats),
                   "--events", str(events), "--backend", backend, "--result", str(res)]
            t0 = time.perf_counter()
            try:
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
                row = json.loads(res.read_text()) if res.exists() else {
                    "scheme": scheme, "error": _last_error(proc.stderr) or f"exit code {proc.returncode}"}
            except subprocess.TimeoutExpired:
                row = {"scheme": scheme, "error": f"did not finish within {timeout_s:.0f} s"}
            row["process_s"] = time.perf_counter() - t0
        rows.append(row)
        print(_scheme_line(row), flush=True)
    return rows


def _last_error(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    errs = [ln for ln in lines if "Error" in ln or "error:" in ln]
    return (errs or lines or [""])[-1][:400]


def _scheme_line(row: dict) -> str:
    if "error" in row:
        return f"compile {row['scheme']}: FAILED: {row['error']}"
    ph = " | ".join(f"{p['phase']}: {p['compiled_ms']:.0f} vs {p['eager_ms']:.0f} ms"
                    + (f", first {p['first_step_s']:.1f} s" if p["first_step_s"] is not None else "")
                    for p in row["phases"])
    return f"compile {row['scheme']}: cold {row['cold_step_s']:.1f} s | {ph}"


def amortisation(row: dict, dense_steps: int = 400, pruned_steps: int = 1600, events: int = 7) -> dict[str, Any]:
    """Break-even steps per event and the net seconds compiling would save over the schedule of
    configs/llama_kjv.yaml (400 dense steps, then 7 events every 200 steps up to step 1600, 2,000
    steps): the dense phase's per-step saving for the dense steps, the mean of the measured
    after-event phases' for the rest, minus the cold compile's extra time and one recompile per
    event (the mean of those measured). Negative: compiling loses. Savings are eager ms x
    (1 - paired compiled/eager ratio)."""
    ph = row["phases"]
    save_ms = [p["eager_ms"] * (1 - p["compiled_over_eager"]) for p in ph]
    after = statistics.mean(save_ms[1:]) if len(save_ms) > 1 else save_ms[0]
    rec = statistics.mean(p["recompile_s"] for p in ph[1:]) if len(ph) > 1 else 0.0
    cold_extra = row["cold_step_s"] - ph[0]["compiled_ms"] / 1e3
    net = (dense_steps * save_ms[0] + pruned_steps * after) / 1e3 - cold_extra - events * rec
    return {"saved_ms_per_step_dense": save_ms[0], "saved_ms_per_step_after": after,
            "recompile_s_mean": rec, "break_even_steps": rec * 1e3 / after if after > 0 else None,
            "cold_extra_s": cold_extra, "net_saving_s_llama_kjv": net}


# ---- report -------------------------------------------------------------------------------------
def _f(v: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def merge_base(old: dict, meta: dict) -> dict:
    """The results to fill in: what an earlier run with the same batch measured (kept until
    re-measured: entries are per size and per compile scheme), else an empty set."""
    res: dict[str, Any] = {"meta": meta, "shrink": {}, "overhead": {}, "compile": [], "runs": []}
    om = old.get("meta", {})
    if (om.get("batch"), om.get("seq"), om.get("torch")) != (meta["batch"], meta["seq"], meta["torch"]):
        return res
    for key in ("shrink", "overhead", "compile", "compile_setup"):
        if key in old:
            res[key] = old[key]
    res["runs"] = old.get("runs", [])
    return res


def _drop_remeasured(res: dict, measured: Sequence[str]) -> None:
    """Earlier runs no longer credit the entries a later run measured again."""
    for r in res["runs"]:
        r["measured"] = [m for m in r["measured"] if m not in set(measured)]


def _run_lines(res: dict) -> list[str]:
    """How and when the entries were measured (one line each when several runs contributed)."""
    runs = res["runs"]
    if len(runs) == 1:
        r = runs[0]
        return [f"- Date: {r['date']}. Wall time: {r['seconds']:.0f} s.", f"- Command: `{r['command']}`"]
    return [f"- `{r['command']}` ({r['date']}, {r['seconds']:.0f} s) measured {', '.join(r['measured'])}"
            for r in runs]


def write_report(res: dict, path: Path) -> None:
    meta = res["meta"]
    md = ["# Transformer training-step performance: shrink, statistics overhead, torch.compile", "",
          f"- Machine: 2-core x86-64 CPU shared with other jobs (load from other jobs during the run; "
          f"timings are noisy, ratios are paired per round), no GPU; torch {meta['torch']}, "
          f"transformers {meta['transformers']}, {meta['threads']} thread.",
          *_run_lines(res),
          f"- Model: Hugging Face LlamaForCausalLM from a config (attention: {meta['attention']}), "
          f"{COMMON['num_hidden_layers']} layers, vocab {COMMON['vocab_size']}, tied embeddings; batch "
          f"{meta['batch']} x {meta['seq']} tokens; step = forward + backward + AdamW.",
          ""]
    for size, rows in res.get("shrink", {}).items():
        cfg = {**COMMON, **SIZES[size]}
        md += [f"## 1. Shrink pays: {size} (hidden {cfg['hidden_size']}, MLP {cfg['intermediate_size']}, "
               f"{cfg['num_attention_heads']} heads / {cfg['num_key_value_heads']} KV heads)", "",
               "Pruner(criterion l2, Rule('ratio', r, 'uniform'), unit_kinds heads + mlp); a head unit is "
               "one KV head with its query heads. FLOPs: FlopCounterMode, forward + backward. "
               f"{rows[0]['repeats']} interleaved repeats. Goal: step ratio <= 1.3 x FLOPs ratio.", "",
               "| variant | q/kv heads | MLP | params | GFLOP/step | FLOPs ratio | step ms | step ratio | "
               "step / FLOPs ratio | goal |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            same = f" (= {r['same_as']})" if r.get("same_as") else ""
            md.append(f"| {r['variant']}{same} | {r['q_heads']}/{r['kv_heads']} | {r['mlp']} | {r['params']:,} | "
                      f"{r['flops'] / 1e9:.2f} | {r['flops_ratio']:.3f} | {r['step_ms']:.0f} | "
                      f"{r['step_ratio']:.3f} | {r['ratio_over_flops']:.2f} | "
                      f"{'-' if r['variant'] == 'dense' else 'met' if r['goal_met'] else 'NOT met'} |")
        md.append("")
    for size, rows in res.get("overhead", {}).items():
        md += [f"## 2. Statistics overhead of the activation criterion: {size}", "",
               "\"pruner activation\": Pruner(criterion='activation') attached (forward pre-hooks on every "
               "down_proj and o_proj calling kernels.channel_sq_sum), no event. \"naive hook\": a forward "
               "pre-hook on the same modules computing x.pow(2).sum(...). "
               f"{rows[0]['repeats']} interleaved repeats; overhead = median of the per-round step ratios "
               "to \"none\" (with their interquartile range: the noise of this machine); \"isolated\": the "
               "statistics' own work timed alone on one step's activations, as a share of the \"none\" step. "
               "Goal: <= 3%, judged on the isolated share (the paired step difference is within this "
               "machine's noise).", "",
               "| statistics | step ms | overhead % (paired) | IQR % | isolated ms/step | isolated % | goal |",
               "|---|---|---|---|---|---|---|"]
        md += [f"| {r['statistics']} | {r['step_ms']:.0f} | {r['overhead_pct']:+.1f} | "
               f"{r['overhead_iqr_pct'][0]:+.1f} .. {r['overhead_iqr_pct'][1]:+.1f} | "
               f"{r['isolated_ms']:.1f} | {r['isolated_pct']:.1f} | "
               f"{'-' if r['statistics'] == 'none' else ('met' if r['goal_met'] else 'NOT met')} |" for r in rows]
        md.append("")
    if res.get("compile"):
        c = res["compile_setup"]
        md += [f"## 3. torch.compile across pruning events: {c['size']}, backend {c.get('backend', 'inductor')}", "",
               "Each scheme in a fresh process with an empty inductor cache. Events prune 50% of the "
               "remaining heads and MLP neurons (L2, uniform) of the compiled model and of its eager twin "
               "in place, optimizer moments included. \"first step\": wall time of the first compiled step "
               "(cold: the compile; after an event: the recompile) ; \"recompile\": first step minus a "
               f"steady compiled step. {res['compile'][0].get('repeats')} interleaved repeats per phase.", "",
               "| scheme | phase | q/kv heads | MLP | eager ms | compiled ms | compiled / eager | first step s | "
               "new graphs |", "|---|---|---|---|---|---|---|---|---|"]
        for row in res["compile"]:
            if "error" in row:
                md.append(f"| {row['scheme']} | FAILED: {row['error']} | | | | | | | |")
                continue
            for i, p in enumerate(row["phases"]):
                first = row["cold_step_s"] if i == 0 else p["first_step_s"]
                md.append(f"| {row['scheme'] if i == 0 else ''} | {p['phase']} | {p['q_heads']}/{p['kv_heads']} | "
                          f"{p['mlp']} | {p['eager_ms']:.0f} | {p['compiled_ms']:.0f} | "
                          f"{p['compiled_over_eager']:.3f} | {first:.1f}{' (cold)' if i == 0 else ''} | "
                          f"{p['new_graphs'] if i else row['graphs_after_cold']} |")
        why = [f"- {r['scheme']}, {p['phase']}: `{p['recompiled_because'][0]}`" for r in res["compile"]
               for p in r.get("phases", [])[1:] if p.get("recompiled_because")]
        if why:
            md += ["", "What dynamo named as the reason for each recompile (the first failed guard):", ""] + why
        md += ["", "Schemes: " + "; ".join(f"**{r['scheme']}**: {SCHEMES[r['scheme']]}" for r in res["compile"]),
               "", "Amortisation over configs/llama_kjv.yaml's schedule (2,000 steps, 7 events), at the "
               "per-step saving measured here:", "",
               "| scheme | saved ms/step dense | saved ms/step after event | break-even steps per event | "
               "cold compile extra s | net saving s over the run |", "|---|---|---|---|---|---|"]
        for row in res["compile"]:
            if "error" in row:
                continue
            a = row["amortisation"]
            md.append(f"| {row['scheme']} | {a['saved_ms_per_step_dense']:.0f} | {a['saved_ms_per_step_after']:.0f} | "
                      f"{_f(a['break_even_steps'], '{:.0f}')} | {a['cold_extra_s']:.0f} | "
                      f"{a['net_saving_s_llama_kjv']:+.0f} |")
        md.append("")
    md += ["## Conclusions (generated from the numbers above)", ""] + [f"- {c}" for c in conclusions(res)]
    old = path.read_text() if path.exists() else ""
    kept = old.split(C.DISCUSSION, 1)[1] if C.DISCUSSION in old else "\n"
    path.write_text("\n".join(md) + "\n\n" + C.DISCUSSION + kept)


def conclusions(res: dict) -> list[str]:
    out = []
    for size, rows in res.get("shrink", {}).items():
        pruned = [r for r in rows if r["variant"] != "dense"]
        met = [r for r in pruned if r["goal_met"]]
        worst = max(pruned, key=lambda r: r["ratio_over_flops"])
        out.append(f"shrink ({size}): step-time ratio <= 1.3 x FLOPs ratio for {len(met)} of {len(pruned)} "
                   f"pruned variants; worst {worst['variant']}: step ratio {worst['step_ratio']:.3f} at FLOPs "
                   f"ratio {worst['flops_ratio']:.3f} ({worst['ratio_over_flops']:.2f}x).")
        pairs = [(a, b) for a in rows for b in rows if a["ratio"] == b["ratio"] and a["round_to"] is None
                 and b["round_to"] == 8 and not b.get("same_as")]
        for a, b in pairs:
            out.append(f"round_to ({size}, -{a['ratio']:.0%}): MLP {a['mlp']} -> {b['mlp']}, heads {a['kv_heads']} -> "
                       f"{b['kv_heads']}; step ratio {a['step_ratio']:.3f} -> {b['step_ratio']:.3f}, per FLOP "
                       f"{a['ratio_over_flops']:.2f} -> {b['ratio_over_flops']:.2f}.")
    for size, rows in res.get("overhead", {}).items():
        d = {r["statistics"]: r for r in rows}
        p, n = d["pruner activation"], d["naive hook"]
        out.append(f"statistics overhead ({size}): Pruner activation hooks {p['overhead_pct']:+.1f}% of a step "
                   f"(interquartile range of the rounds {p['overhead_iqr_pct'][0]:+.1f}.."
                   f"{p['overhead_iqr_pct'][1]:+.1f}%), "
                   f"naive hook {n['overhead_pct']:+.1f}%; timed alone the statistics cost "
                   f"{p['isolated_pct']:.1f}% (Pruner; goal <= 3%: {'met' if p['goal_met'] else 'NOT met'}) and "
                   f"{n['isolated_pct']:.1f}% (naive) of a step.")
    for row in res.get("compile", []):
        if "error" in row:
            out.append(f"compile {row['scheme']}: failed: {row['error']}")
            continue
        ph, a = row["phases"], row["amortisation"]
        recs = ", ".join(f"{p['recompile_s']:.0f} s ({p['new_graphs']} new graphs)" for p in ph[1:])
        out.append(f"compile {row['scheme']}: cold compile {row['cold_step_s']:.0f} s; compiled/eager "
                   f"{ph[0]['compiled_over_eager']:.2f} dense"
                   + (f", {ph[1]['compiled_over_eager']:.2f} after the first event; recompile at the events: {recs}"
                      if len(ph) > 1 else "")
                   + f"; net over llama_kjv's 2,000 steps: {a['net_saving_s_llama_kjv']:+.0f} s "
                   f"({'pays' if a['net_saving_s_llama_kjv'] > 0 else 'does not pay'}).")
    return out


# ---- command line ------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: small model, short batch, few repeats, one compile scheme on a toy model")
    ap.add_argument("--parts", nargs="+", default=["shrink", "overhead", "compile"],
                    choices=["shrink", "overhead", "compile"])
    ap.add_argument("--sizes", nargs="+", default=["small", "large"], choices=sorted(SIZES))
    ap.add_argument("--schemes", nargs="+", default=["static", "regional"],
                    choices=sorted(SCHEMES))
    ap.add_argument("--compile-size", default="small", choices=sorted(SIZES))
    ap.add_argument("--backend", default=None,
                    help="torch.compile backend (default inductor; aot_eager with --quick: graph capture, "
                         "recompiles and the event path without C++ compilation, so no meaningful timings)")
    ap.add_argument("--events", type=int, default=2, help="pruning events per compile scheme")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default by part)")
    ap.add_argument("--scheme-timeout", type=float, default=900.0, help="seconds per compile scheme")
    ap.add_argument("--out", default=None, help="output path without suffix (.json and .md are written); "
                    f"default {OUT.relative_to(C.REPO)}, or a temporary folder's with --quick")
    args = ap.parse_args(argv)
    out = Path(args.out) if args.out else (Path(tempfile.gettempdir()) / "transformer_perf_quick"
                                           if args.quick else OUT)
    torch.set_num_threads(1)
    import transformers

    batch, seq = (4, 64) if args.quick else (16, 128)
    sizes = ["small"] if args.quick else args.sizes
    reps = {"shrink": 3 if args.quick else 12, "overhead": 4 if args.quick else 20,
            "compile": 2 if args.quick else 8}
    if args.repeats:
        reps = {k: args.repeats for k in reps}
    t_start = time.perf_counter()
    meta = C.run_meta(argv)
    meta.update(transformers=transformers.__version__, batch=batch, seq=seq,
                attention=build_llama("toy").config._attn_implementation)
    old = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {}
    res = merge_base(old, meta)
    run: dict[str, Any] = {"command": meta["command"], "date": meta["date"], "measured": [],
                           "repeats": {k: v for k, v in reps.items() if k in args.parts}}
    if "shrink" in args.parts:
        for size in sizes:
            res["shrink"][size] = rows = bench_shrink(Setup(size, batch, seq), reps["shrink"],
                                                      (0.3, 0.75) if args.quick else RATIOS)
            run["measured"].append(f"shrink:{size}")
            print(f"shrink {size}: " + ", ".join(f"{r['variant']} {r['step_ratio']:.2f} (FLOPs {r['flops_ratio']:.2f})"
                                                 for r in rows), flush=True)
    if "overhead" in args.parts:
        for size in sizes:
            res["overhead"][size] = rows = bench_overhead(Setup(size, batch, seq), reps["overhead"])
            run["measured"].append(f"overhead:{size}")
            print(f"overhead {size}: " + ", ".join(f"{r['statistics']} {r['overhead_pct']:+.1f}%"
                                                   for r in rows), flush=True)
    if "compile" in args.parts:
        setup = Setup("toy" if args.quick else args.compile_size, batch, seq)
        schemes = ["static"] if args.quick else args.schemes
        events = 1 if args.quick else args.events
        backend = args.backend or ("aot_eager" if args.quick else "inductor")
        cs = {**asdict(setup), "events": events, "backend": backend}
        if {k: v for k, v in res.get("compile_setup", {}).items() if k != "repeats"} != cs:
            # earlier schemes measured something else
            res["compile"], res["compile_setup"] = [], cs
        rows = bench_compile(setup, reps["compile"], events, schemes, args.scheme_timeout, backend)
        for row in rows:
            row["repeats"] = reps["compile"]
            if "error" not in row:
                row["amortisation"] = amortisation(row)
        res["compile"] = [r for r in res["compile"] if r["scheme"] not in schemes] + rows
        run["measured"] += [f"compile:{s}" for s in schemes]
    meta["seconds"] = run["seconds"] = time.perf_counter() - t_start
    _drop_remeasured(res, run["measured"])
    res["runs"] = [r for r in res["runs"] if r["measured"]] + [run]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1, default=str))
    write_report(res, out.with_suffix(".md"))
    print("\n".join(conclusions(res)))
    print(f"wrote {out}.json, {out}.md ({meta['seconds']:.0f} s)")
    return 0


def scheme_main(argv: list[str]) -> int:
    """Child process of bench_compile: one scheme, its result as JSON in --result."""
    ap = argparse.ArgumentParser()
    ap.add_argument("scheme", choices=sorted(SCHEMES))
    ap.add_argument("--size", required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--seq", type=int, required=True)
    ap.add_argument("--repeats", type=int, required=True)
    ap.add_argument("--events", type=int, required=True)
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--result", required=True)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    try:
        row = run_scheme(a.scheme, Setup(a.size, a.batch, a.seq), a.repeats, a.events, a.backend)
    except Exception as err:    # report why (e.g. inductor without a working C++ compiler)
        row = {"scheme": a.scheme, "error": f"{type(err).__name__}: {' '.join(str(err).split())[:400]}"}
    Path(a.result).write_text(json.dumps(row, default=str))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_scheme":
        raise SystemExit(scheme_main(sys.argv[2:]))
    raise SystemExit(main())
