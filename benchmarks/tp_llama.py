"""Torch-Pruning one-shot on a secateur checkpoint of a LLaMA-architecture model, written back as a
secateur run that `secateur resume OUT --max-steps N` fine-tunes (benchmarks/llama_kjv.py,
variant end-tp-<k>; benchmarks/event_cost.py times the same pruning).

Torch-Pruning (1.6) prunes a copy of the model with its own MetaPruner and group L2 magnitude
importance, removing whole key/value head groups (a KV head with the query heads that read it) and
MLP neurons, the same fraction in every layer, with embeddings and lm_head ignored so the hidden
size stays. Which original units it kept is read back from the pruned weights (exact row
equality), recorded as a secateur structure (secateur.pruning.structure), replayed on a freshly
built model and checked against Torch-Pruning's own model: same weights, same logits.

Two things stand between Torch-Pruning 1.6 and transformers' LLaMA attention; both are handled
here for the duration of Torch-Pruning's work only, and the result is checked against the
untouched model:
- Tracing. With rotary embeddings (`q * cos + rotate_half(q) * sin`) its dependency search goes
  round the slice/concat cycle of `rotate_half` without end (a hang like the one reported in
  VainF/Torch-Pruning#527). While the graph is built, `apply_rotary_pos_emb` runs as one autograd
  node per tensor, which Torch-Pruning treats as a channel pass-through (true for whole-head
  pruning: RoPE mixes dimensions only inside a head).
- Grouped-query attention. Its documented LLaMA recipe (examples/LLMs/prune_llm.py: `num_heads`
  per q/k/v projection, `prune_num_heads=True`) prunes query heads inside each KV group and keeps
  every KV head: its graph maps query, key and value channels one to one, so it cannot cut k/v
  rows together with their query heads (and with 8 query heads over 4 KV heads at ratio 0.5 its
  own group check refuses the attention cut, so no head is removed at all). Neither result is a
  set of whole KV groups, the unit secateur prunes. So the copy is given the equivalent
  multi-head form while Torch-Pruning works on it: each KV head's k/v rows repeated for its
  query heads (what `repeat_kv` does at run time), every projection declared with `num_heads` =
  number of KV heads, so one Torch-Pruning "head" is one KV group. Afterwards the k/v rows are
  taken back to one copy per group (checked identical). A head's group L2 score then averages, over
  its channels, the query, key, value and output weights of each channel: a KV head's rows count
  once for every query head that reads them.

    from tp_llama import tp_prune_checkpoint
    tp_prune_checkpoint(Path("runs/x/checkpoints/step_00000210"), Path("runs/x-tp50"), keep=0.5)
"""
from __future__ import annotations

import contextlib
import copy
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor, nn


# ---- Torch-Pruning on a LLaMA-family model ---------------------------------------------------
def _attention_modules(model: nn.Module) -> list[nn.Module]:
    """The model's attention modules with separate q/k/v/o projections and grouped KV heads
    (LlamaAttention and its transformers relatives)."""
    return [m for m in model.modules()
            if all(hasattr(m, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim",
                                           "num_key_value_groups"))]


def _repeat_rows(lin: nn.Linear, units: int, reps: int) -> None:
    """Repeat each of the `units` row blocks of `lin` (weight (units*block, in), bias) `reps`
    times in place: block u becomes blocks u*reps .. u*reps+reps-1."""
    def rep(t: Tensor) -> Tensor:
        return t.reshape(units, -1, *t.shape[1:]).repeat_interleave(reps, 0).reshape(-1, *t.shape[1:])
    lin.weight = nn.Parameter(rep(lin.weight.detach()))
    if lin.bias is not None:
        lin.bias = nn.Parameter(rep(lin.bias.detach()))
    lin.out_features = lin.weight.shape[0]


def _first_copy_rows(lin: nn.Linear, reps: int, block: int) -> None:
    """Undo `_repeat_rows`: keep the first of each `reps` consecutive row blocks of size `block`.
    Raises RuntimeError when the copies differ (a cut that split a KV group)."""
    def first(t: Tensor) -> Tensor:
        v = t.reshape(-1, reps, block, *t.shape[1:])
        if not all(torch.equal(v[:, 0], v[:, i]) for i in range(1, reps)):
            raise RuntimeError("Torch-Pruning cut a key/value head group apart")
        return v[:, 0].reshape(-1, *t.shape[1:]).clone()
    lin.weight = nn.Parameter(first(lin.weight.detach()))
    if lin.bias is not None:
        lin.bias = nn.Parameter(first(lin.bias.detach()))
    lin.out_features = lin.weight.shape[0]


def to_multi_head(model: nn.Module) -> dict[nn.Module, int]:
    """Give every grouped-query attention of `model` its equivalent multi-head form in place
    (k/v rows repeated per query head; the function, hence the logits, is unchanged).
    Returns {attention module: query heads per KV head} for `to_grouped`."""
    reps = {}
    for m in _attention_modules(model):
        r = int(m.num_key_value_groups)
        reps[m] = r
        if r > 1:
            n_kv = m.k_proj.out_features // m.head_dim
            _repeat_rows(m.k_proj, n_kv, r)
            _repeat_rows(m.v_proj, n_kv, r)
            m.num_key_value_groups = 1
    return reps


def to_grouped(reps: dict[nn.Module, int]) -> None:
    """Undo `to_multi_head` (after pruning): one k/v row block per KV head again."""
    for m, r in reps.items():
        if r > 1:
            _first_copy_rows(m.k_proj, r, m.head_dim)
            _first_copy_rows(m.v_proj, r, m.head_dim)
            m.num_key_value_groups = r


class _RopeNode(torch.autograd.Function):
    """Rotary embedding of one tensor as a single autograd node (what Torch-Pruning traces
    through without looping); value and gradient are those of the wrapped function `fn`."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, cos: Tensor, sin: Tensor, fn: Any, dim: int) -> Tensor:
        ctx.save_for_backward(x, cos, sin)
        ctx.fn, ctx.dim = fn, dim
        return fn(x, x, cos, sin, dim)[0]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple:
        x, cos, sin = ctx.saved_tensors
        with torch.enable_grad():
            x = x.detach().requires_grad_()
            y = ctx.fn(x, x, cos, sin, ctx.dim)[0]
        return torch.autograd.grad(y, x, grad)[0], None, None, None, None


@contextlib.contextmanager
def traceable_rope(model: nn.Module) -> Iterator[None]:
    """While inside, the modelling modules of `model`'s attention layers apply rotary embeddings
    through `_RopeNode` (one node per tensor), so Torch-Pruning's dependency search ends."""
    mods = {sys.modules[type(m).__module__] for m in _attention_modules(model)}
    saved = {mod: mod.apply_rotary_pos_emb for mod in mods if hasattr(mod, "apply_rotary_pos_emb")}

    def wrap(orig: Any) -> Any:
        def rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1) -> tuple:
            return (_RopeNode.apply(q, cos, sin, orig, unsqueeze_dim),
                    _RopeNode.apply(k, cos, sin, orig, unsqueeze_dim))
        return rope

    for mod, orig in saved.items():
        mod.apply_rotary_pos_emb = wrap(orig)
    try:
        yield
    finally:
        for mod, orig in saved.items():
            mod.apply_rotary_pos_emb = orig


def tp_pruner(model: nn.Module, example_ids: Tensor, keep: float, kv_groups: dict[nn.Module, int]) -> Any:
    """Torch-Pruning's MetaPruner over `model` in multi-head form (`to_multi_head`): group L2
    magnitude (GroupMagnitudeImportance(p=2)), local ratio 1-`keep` of the MLP neurons and of
    the heads of every layer, `kv_groups[attention]` heads per attention (one head = one KV
    group); embeddings and the output embedding ignored, so the hidden size stays. Building it
    traces the model on `example_ids` ((B, T) token ids) into Torch-Pruning's DependencyGraph."""
    import torch_pruning as tp

    num_heads = {lin: kv_groups[m] for m in _attention_modules(model)
                 for lin in (m.q_proj, m.k_proj, m.v_proj)}
    ignored = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out_emb is not None:
        ignored.append(out_emb)
    with traceable_rope(model), torch.enable_grad():
        return tp.pruner.MetaPruner(
            model, example_inputs=example_ids, importance=tp.importance.GroupMagnitudeImportance(p=2),
            global_pruning=False, pruning_ratio=1.0 - keep, ignored_layers=ignored,
            num_heads=num_heads, prune_num_heads=True, prune_head_dims=False,
            head_pruning_ratio=1.0 - keep, forward_fn=lambda m, x: m(input_ids=x).logits)


def tp_prune(model: nn.Module, example_ids: Tensor, keep: float) -> dict[str, float]:
    """Prune `model` (a LLaMA-family causal LM) in place with Torch-Pruning to `keep` of its KV
    head groups and MLP neurons per layer (`tp_pruner`), grouped-query form restored after.
    Returns seconds: {"build_s": multi-head form + DependencyGraph and pruner construction,
    "step_s": pruner.step() + grouped form back, "seconds": both}."""
    import warnings

    t0 = time.perf_counter()
    kv_groups = {m: m.k_proj.out_features // m.head_dim for m in _attention_modules(model)}
    reps = to_multi_head(model)
    with warnings.catch_warnings():      # "unwrapped parameters" (RMSNorm weights): handled right
        warnings.simplefilter("ignore")
        pruner = tp_pruner(model, example_ids, keep, kv_groups)
    t1 = time.perf_counter()
    with torch.no_grad():
        pruner.step()
    to_grouped(reps)
    t2 = time.perf_counter()
    return {"build_s": t1 - t0, "step_s": t2 - t1, "seconds": t2 - t0}


# ---- reading Torch-Pruning's result back as a secateur structure -----------------------------
def _row_key(t: Tensor) -> bytes:
    return t.detach().contiguous().cpu().numpy().tobytes()


def kept_units(groups: list, before: nn.Module, after: nn.Module) -> dict[str, list[int]]:
    """{group name: current positions (ascending) of the units of `before`'s secateur `groups`
    whose weights `after` (a pruned copy of `before`, same module names) still holds}, found by
    exact equality of each unit's rows/columns in every producer and consumer tensor. Raises
    RuntimeError when a unit of `after` matches no unit, or several, of `before`."""
    names = {id(m): n for n, m in before.named_modules()}
    mods = dict(after.named_modules())
    out = {}
    for g in groups:
        orig, now = [], []
        for s in g.producers + g.consumers:
            t = s.tensor
            if s.units * s.per_unit != t.shape[s.axis]:
                raise RuntimeError(f"{g.name}: {names[id(s.module)]}.{s.name} axis {s.axis} is "
                                   "shared with other groups; rows cannot be matched per unit")
            orig.append(s.unit_view())
            cut = getattr(mods[names[id(s.module)]], s.name).detach().movedim(s.axis, 0)
            now.append(cut.reshape(cut.shape[0] // s.per_unit, -1))
        orig_rows, now_rows = torch.cat(orig, 1), torch.cat(now, 1)
        index: dict[bytes, int] = {}
        for j in range(orig_rows.shape[0]):
            key = _row_key(orig_rows[j])
            index[key] = -1 if key in index else j        # -1: ambiguous (identical units)
        pos = []
        for i in range(now_rows.shape[0]):
            j = index.get(_row_key(now_rows[i]))
            if j is None or j < 0:
                raise RuntimeError(f"{g.name}: kept unit {i} {'matches several' if j else 'matches no'} "
                                   "original unit exactly")
            pos.append(j)
        if pos != sorted(set(pos)):
            raise RuntimeError(f"{g.name}: kept units are not distinct and in order: {pos}")
        out[g.name] = pos
    return out


# ---- the checkpoint in, the run out ------------------------------------------------------------
def _secateur_model(meta: dict[str, Any], pcfg: Any, x_example: Any) -> tuple[nn.Module, list]:
    """The checkpoint's model as `secateur prune` builds it (secateur/trainer/oneshot.py): the
    original architecture, traced into the pruner's groups, cut to the recorded structure.
    Weights are not loaded. Returns (model, groups)."""
    from secateur.build import construct
    from secateur.trainer.export import replay_structure
    from secateur.trainer.setup import example_input, pruner_from_config

    model = construct(meta["source"], pretrained=False)
    pruner = pruner_from_config(pcfg, model, example_input(model, x_example))
    if meta.get("structure"):
        replay_structure(model, pruner.groups, meta, None)
    return model, pruner.groups


def _logits(model: nn.Module, ids: Tensor) -> Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def tp_prune_checkpoint(src_ckpt: Path, out_dir: Path, keep: float) -> dict[str, Any]:
    """Prune the model of checkpoint folder `src_ckpt` (a secateur checkpoint of a Hugging Face
    LLaMA-family causal LM, traced, not a `spec` model) once with Torch-Pruning to `keep` (0..1)
    of its KV head groups and MLP neurons in every layer, and write the result to `out_dir` as
    `secateur prune` writes its output run (config without pruning, a weights checkpoint with the
    source and the kept-unit structure, events.jsonl), ready for `secateur resume out_dir`.

    The optimizer state is not carried over (Torch-Pruning prunes the model only). Returns
    {"seconds": Torch-Pruning's time (build + step, `tp_prune`), "build_s", "step_s",
    "params_before", "params_after", "structure": {group: kept original units}, "groups":
    [(group, units before, after)], "max_abs_logit_diff"}. Raises RuntimeError when the
    structure read back does not reproduce Torch-Pruning's model (weights not identical, or
    logits apart by 1e-5 or more), and the run-folder errors of `secateur prune` for `out_dir`.
    """
    from secateur.pruning import structure as structure_mod
    from secateur.trainer import checkpoint as ckpt
    from secateur.trainer import runfolder
    from secateur.trainer.oneshot import write_pruned_run
    from secateur.trainer.config import (OneshotSchedule, PruningConfig, RatioRule, check_config,
                                         parse_config)
    from secateur.trainer.setup import dataset_from_config, example_batch, param_count

    src, out = Path(src_ckpt), Path(out_dir)
    run_dir = src.parent.parent            # RUN/checkpoints/step_N
    runfolder.check_new_folder(out, "--out", source=run_dir)
    meta = ckpt.read_meta(src)
    if meta.get("spec"):
        raise ValueError(f"{src}: a secateur `spec` model, not a traced Hugging Face one")
    cfg = parse_config(meta["config"], f"{src}/meta.json")
    check_config(cfg, f"{src}/meta.json")
    step = int(meta["step"])
    # only the groups matter (heads and MLP neurons, as the llama_kjv config prunes)
    pcfg = PruningConfig(criterion="l2", rule=RatioRule(kind="ratio", ratio=0.0, scope="uniform"),
                         schedule=OneshotSchedule(kind="oneshot", at=max(1, step)),
                         units=["heads", "mlp"])
    ds = dataset_from_config(cfg)
    x_example = example_batch(ds)
    weights = ckpt.model_state_dict(src)
    model, groups = _secateur_model(meta, pcfg, x_example)
    model.load_state_dict(weights)
    model.eval()
    params_before = param_count(model)

    pruned = copy.deepcopy(model)
    timing = tp_prune(pruned, x_example, keep)
    kept = kept_units(groups, model, pruned)
    new_structure = structure_mod.record(groups)
    for g in groups:
        new_structure[g.name] = sorted(int(g.origin[p]) for p in kept[g.name])

    # the structure alone, replayed on a fresh model, must give Torch-Pruning's model
    rebuilt, rgroups = _secateur_model(meta, pcfg, x_example)
    rebuilt.load_state_dict(weights)
    structure_mod.apply(rgroups, new_structure)
    mine, theirs = rebuilt.state_dict(), pruned.state_dict()
    bad = sorted(k for k in set(mine) | set(theirs)
                 if k not in mine or k not in theirs or mine[k].shape != theirs[k].shape
                 or not torch.equal(mine[k], theirs[k]))
    if bad:
        raise RuntimeError(f"the recovered structure does not reproduce Torch-Pruning's weights: "
                           f"{', '.join(bad[:5])}")
    ids, _ = ds.val.batch(torch.arange(min(4, len(ds.val))))
    diff = (_logits(rebuilt, ids) - _logits(pruned, ids)).abs().max().item()
    if not diff < 1e-5:
        raise RuntimeError(f"logits of the rebuilt model differ from Torch-Pruning's by {diff:.3g}")
    params_after = param_count(rebuilt)
    groups_report = [(g.name, len(g.origin), len(new_structure[g.name])) for g in groups]

    how = {"tool": "torch-pruning", "importance": "GroupMagnitudeImportance(p=2)", "keep": keep,
           "units": ["heads", "mlp"]}
    write_pruned_run(out, run_dir, src, meta, cfg, rebuilt,
                     {"source": meta["source"], "structure": new_structure, "structure_ignored_layers": []},
                     how, params_before, params_after, groups_report, timing["seconds"], example=x_example)
    return {**timing, "params_before": params_before, "params_after": params_after,
            "structure": new_structure, "groups": groups_report, "max_abs_logit_diff": diff}
