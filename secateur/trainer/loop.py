"""The training loop: DeepSpeed steps with pruning events that physically shrink the model.

`Trainer.train()` is one `while` loop, read top to bottom: LR schedule, forward/backward/step,
`maybe_prune(step)`, eval, logging, checkpoint. Everything else here is a small helper of it.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import Tensor

from secateur.data import ShardedOrder, shard_range
from secateur.trainer import checkpoint as ckpt
from secateur.trainer.config import Config
from secateur.trainer.engine import (FULL_STATE_FILE, DistInfo, Engine, deepspeed_config,
                                     make_optimizer, regroup_rank_states)
from secateur.trainer.logs import RunLog, format_prune_event, read_metrics
from secateur.trainer.setup import (dataset_from_config, eval_totals, example_batch, example_input,
                                    loss_fn, lr_at, model_from_config, model_source, param_count,
                                    pruner_from_config, unit_widths)

# files a run writes into its folder (a fresh `train` into an existing folder removes them)
RUN_FILES = ("checkpoints", "ranks", "metrics.csv", "events.jsonl", "config.yaml", "summary.json",
             "report.md", "plots", "export")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of the architecture spec and every tensor of the state dict, in order."""
    h = hashlib.sha256()
    if hasattr(model, "spec"):
        h.update(json.dumps(model.spec(), sort_keys=True, default=str).encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def step_time_windows(rows: list[dict[str, Any]], k: int | None = None) -> tuple[float, float]:
    """Mean step time (s) of the first k steps (skipping step 1, which pays lazy set-up) and of
    the last k steps of a metrics table. k defaults to 10% of the steps, clamped to [3, 50]."""
    times = [r["step_time_s"] for r in rows if r["step"] > 1]
    if not times:
        return float("nan"), float("nan")
    k = k or max(3, min(50, len(times) // 10))
    k = min(k, len(times))
    return float(np.mean(times[:k])), float(np.mean(times[-k:]))


class Trainer:
    """One training run in RUN_DIR on this rank; `resume=True` continues from its latest checkpoint."""

    def __init__(self, cfg: Config, run_dir: str | Path, dist_info: DistInfo, resume: bool = False,
                 data: Any = None) -> None:
        from secateur.build import is_hf, to_device
        from secateur.data.loader import BatchStream

        self.cfg, self.run_dir, self.dist = cfg, Path(run_dir), dist_info
        tc = cfg.train
        if tc.threads is not None:
            torch.set_num_threads(tc.threads)
        if tc.deterministic:
            torch.use_deterministic_algorithms(True)
        self._prepare_run_dir(resume)

        self.data = data if data is not None else dataset_from_config(cfg)
        self.device = dist_info.device
        meta = ckpt.read_meta(self.ckpt_path) if resume else None
        self.own = cfg.model.name is not None       # secateur's own model: rebuilt from its spec
        self.source = model_source(cfg, self.data)
        seed_everything(cfg.seed)                      # same initial weights on every rank
        if meta is not None and self.own:
            from secateur.models import build_model

            self.model = build_model(meta["spec"])     # the (possibly pruned) saved architecture
        else:
            # other models are rebuilt as configured, then cut to the recorded structure below
            self.model = model_from_config(cfg, self.data, pretrained=meta is None)
        self.model.to(self.device)
        self.hf = is_hf(self.model)
        self.example_x = example_batch(self.data)     # traced with; saved in every checkpoint
        example = example_input(self.model, to_device(self.example_x, self.device))
        self.pruner = (pruner_from_config(cfg.pruning, self.model, example)
                       if cfg.pruning is not None else None)
        self.groups = None if self.own or self.pruner is None else self.pruner.groups
        if meta is not None and not self.own and meta.get("structure"):
            self._apply_structure(meta, example)
        if meta is not None and not (self.ckpt_path / ckpt.DS_TAG).is_dir():
            self.model.load_state_dict(ckpt.model_state_dict(self.ckpt_path))
        order = ShardedOrder(len(self.data.train), cfg.data.batch_size, dist_info.rank,
                             dist_info.world_size, seed=cfg.seed)
        self.stream = BatchStream(self.data.train, order, num_workers=cfg.data.num_workers,
                                  seed=cfg.seed)
        self.engine = Engine(self.model, lambda m: make_optimizer(m, cfg.optimizer),
                             deepspeed_config(cfg, dist_info.world_size, param_count(self.model)))
        seed_everything(cfg.seed + 1 + dist_info.rank)  # dropout differs per rank
        self.step = 0
        self.initial_params = param_count(self.model)
        self.last_saved = -1
        if meta is not None:
            self._restore(meta)
        self.log = RunLog(self.run_dir, tc.max_steps, start_step=self.step, enabled=dist_info.is_main,
                          progress=tc.progress, resume_step=self.step if resume else None)
        if resume:
            self.log.event("resume", self.step, checkpoint=self.ckpt_path.name)
        else:
            self.log.event("start", 0, params=self.initial_params, widths=self.widths(),
                           world_size=dist_info.world_size, zero_stage=cfg.deepspeed.zero_stage)

    def _apply_structure(self, meta: dict[str, Any], example: Any) -> None:
        """Cut the freshly built model to the checkpoint's recorded structure (kept original units
        per group), through the pruner's groups or, without pruning, groups traced as recorded."""
        from secateur.pruning import build_groups, structure

        if self.groups is None:
            ignored = [dict(self.model.named_modules())[n]
                       for n in meta.get("structure_ignored_layers", [])]
            self.groups = build_groups(self.model, example, ignored, verify=False)
        try:
            structure.apply(self.groups, meta["structure"])
        except ValueError as err:
            raise ckpt.CheckpointError(f"{self.ckpt_path}: {err}") from None

    def widths(self) -> dict[str, int]:
        return unit_widths(self.model, self.groups)

    # ---- set-up helpers ----------------------------------------------------------------
    def _prepare_run_dir(self, resume: bool) -> None:
        if resume:
            self.ckpt_path = ckpt.latest(self.run_dir)
        if self.dist.is_main:
            if resume:
                ckpt.remove_stale_temps(self.run_dir)
            else:
                for name in RUN_FILES:
                    p = self.run_dir / name
                    if p.is_dir():
                        shutil.rmtree(p)
                    elif p.exists():
                        p.unlink()
                self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(
                yaml.safe_dump(self.cfg.model_dump(mode="json"), sort_keys=False))
        self._barrier()

    def _restore(self, meta: dict[str, Any]) -> None:
        # another number of ranks or ZeRO stage: model and optimizer from the whole-tensor state
        # file (DeepSpeed's files are partitioned per rank), per-rank states regrouped
        saved_ranks = int(meta.get("world_size", self.dist.world_size))
        stage = self.cfg.deepspeed.zero_stage
        elastic = saved_ranks != self.dist.world_size or int(meta.get("zero_stage", stage)) != stage
        if (self.ckpt_path / ckpt.DS_TAG).is_dir() and not elastic:
            self.engine.load_checkpoint(str(self.ckpt_path), ckpt.DS_TAG)
        elif (self.ckpt_path / ckpt.DS_TAG).is_dir():
            if not (self.ckpt_path / FULL_STATE_FILE).is_file():
                raise ckpt.CheckpointError(
                    f"{self.ckpt_path} was written by {saved_ranks} ranks at ZeRO stage "
                    f"{meta.get('zero_stage')} without {FULL_STATE_FILE} (an older secateur); resume "
                    "it with that number of ranks and stage")
            try:
                self.engine.load_full_state_file(self.ckpt_path / FULL_STATE_FILE,
                                                 ckpt.model_state_dict(self.ckpt_path))
            except (ValueError, RuntimeError) as err:
                raise ckpt.CheckpointError(f"{self.ckpt_path}: {err}") from None
        if elastic:
            state = regroup_rank_states([ckpt.read_rank_state(self.ckpt_path, r)
                                         for r in range(saved_ranks)], self.dist.rank)
        else:
            state = ckpt.read_rank_state(self.ckpt_path, self.dist.rank)
        if state:
            if self.pruner is not None and state.get("pruner") is not None:
                self.pruner.load_state_dict(state["pruner"])
            self.stream.load_state_dict(state["data"])
            if "rng" in state:
                ckpt.set_rng_state(state["rng"])
            else:   # a rank the saved run did not have: its own streams, new from this step on
                seed_everything(self.cfg.seed + 1 + self.dist.rank + 1_000_003 * int(meta["step"]))
        self.step = self.last_saved = int(meta["step"])
        self.initial_params = int(meta.get("initial_params", self.initial_params))

    def _barrier(self) -> None:
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()

    # ---- one step ----------------------------------------------------------------------
    def next_batch(self) -> tuple[Any, Tensor]:
        from secateur.build import to_device

        x, y = self.stream.next()
        return to_device(x, self.device), y.to(self.device, non_blocking=True)

    def train_step(self) -> float:
        """One optimizer step (gradient_accumulation_steps micro-batches). Returns the mean loss."""
        from secateur.build import forward

        engine, gas, total = self.engine.engine, self.cfg.deepspeed.gradient_accumulation_steps, 0.0
        for _ in range(gas):
            x, y = self.next_batch()
            if self.pruner is not None and self.pruner.needs_targets:
                self.pruner.observe_targets(y)
            loss = loss_fn(forward(engine, x, self.hf), y)
            engine.backward(loss)
            engine.step()
            total += loss.item()
        return total / gas

    # ---- pruning event -----------------------------------------------------------------
    def maybe_prune(self, step: int) -> list | None:
        """At a schedule event: sum the importance statistics over ranks, prune (the same units on
        every rank), carry the optimizer state of the surviving units, rebuild the engine.
        Returns the pruner's report, or None when `step` is not an event."""
        if self.pruner is None or not self.pruner.is_event(step):
            return None
        t0 = time.perf_counter()
        if self.dist.world_size > 1:
            for t in self.pruner.stats().values():
                if self.dist.backend == "nccl" and not t.is_cuda:
                    # NCCL reduces device tensors only (CoB/CoSeP moments live on the host)
                    buf = t.to(self.dist.device)
                    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
                    t.copy_(buf)
                else:
                    dist.all_reduce(t, op=dist.ReduceOp.SUM)
        before = param_count(self.model)
        report = self.engine.rebuild_around(self.pruner.prune)
        after = param_count(self.model)
        if self.cfg.train.verify_ranks:
            self.verify_ranks(step)
        groups = [(str(n), int(b), int(a)) for n, b, a in report]
        self.log.event("prune", step, params_before=before, params_after=after, groups=groups,
                       seconds=time.perf_counter() - t0)
        self.log.say(format_prune_event(step, groups, before, after))
        return report

    def verify_ranks(self, step: int) -> None:
        """Record this rank's architecture+weights digest (RUN_DIR/ranks/rankR.jsonl) and check
        that every rank holds the same model."""
        digest = weights_digest(self.model)
        rank_dir = self.run_dir / "ranks"
        rank_dir.mkdir(exist_ok=True)
        with open(rank_dir / f"rank{self.dist.rank}.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "digest": digest, "params": param_count(self.model),
                                "widths": self.widths()}) + "\n")
        if self.dist.world_size > 1:
            digests: list[str | None] = [None] * self.dist.world_size
            dist.all_gather_object(digests, digest)
            if len(set(digests)) != 1:
                raise RuntimeError(f"ranks disagree on the model after the pruning event at step {step}")

    # ---- evaluation --------------------------------------------------------------------
    def evaluate(self) -> tuple[float, float]:
        """(mean loss, accuracy) on the validation split, sharded over ranks and summed."""
        # evaluation forwards must not count towards the importance statistics
        saved = copy.deepcopy(self.pruner.state_dict()) if self.pruner is not None else None
        idx = torch.tensor(list(shard_range(len(self.data.val), self.dist.rank, self.dist.world_size)),
                           dtype=torch.long)
        totals = eval_totals(self.model, self.data.val, idx, self.cfg.data.eval_batch_size,
                             self.cfg.train.eval_batches, self.device)
        if self.dist.world_size > 1:
            dist.all_reduce(totals, op=dist.ReduceOp.SUM)
        if saved is not None:
            self.pruner.load_state_dict(saved)
        n = max(totals[2].item(), 1.0)
        return totals[0].item() / n, totals[1].item() / n

    # ---- checkpoint --------------------------------------------------------------------
    def save_checkpoint(self, step: int) -> None:
        """Atomic checkpoint of everything needed to continue exactly (all ranks call it)."""
        if step == self.last_saved:
            return
        if self.dist.is_main:
            ckpt.begin(self.run_dir, step)
        self._barrier()
        tmp = ckpt.tmp_dir_for(self.run_dir, step)
        self.engine.save_checkpoint(str(tmp), ckpt.DS_TAG)
        ckpt.write_rank_state(tmp, self.dist.rank, {
            "step": step, "rng": ckpt.rng_state(), "data": self.stream.state_dict(),
            "pruner": self.pruner.state_dict() if self.pruner is not None else None})
        if self.dist.is_main:
            ckpt.write_meta(tmp, {
                "step": step, **self.architecture(), "config": self.cfg.model_dump(mode="json"),
                "lr_schedule": {"step": step, "next_lr": self.lr(step), **self.cfg.lr_schedule.model_dump()},
                "data": self.stream.state_dict(), "world_size": self.dist.world_size,
                "zero_stage": self.cfg.deepspeed.zero_stage, "params": param_count(self.model),
                "initial_params": self.initial_params, "widths": self.widths(),
                "pruner_state": "rank<R>.pt" if self.pruner is not None else None,
                "tokenizer": self.data.meta.get("tokenizer")})
            from secateur.trainer.export import EXAMPLE_FILE, save_example

            save_example(self.example_x, tmp / EXAMPLE_FILE)
        self._barrier()
        if self.dist.is_main:
            final = ckpt.publish(self.run_dir, step, keep=self.cfg.train.keep_checkpoints)
            self.log.event("checkpoint", step, path=str(final.relative_to(self.run_dir)))
        self._barrier()
        self.last_saved = step

    def architecture(self) -> dict[str, Any]:
        """How to rebuild the current model: `spec` (secateur's own models), or the `source` it was
        built from plus the `structure` its groups were cut to (no pickled modules)."""
        from secateur.pruning import structure

        if self.own:
            return {"spec": self.model.spec(), "source": self.source}
        return {"source": self.source,
                "structure": structure.record(self.groups) if self.groups else None,
                "structure_ignored_layers": list(self.cfg.pruning.ignored_layers)
                if self.cfg.pruning is not None else []}

    def lr(self, step: int) -> float:
        return lr_at(step, self.cfg.optimizer.lr, self.cfg.lr_schedule, self.cfg.train.max_steps)

    # ---- the loop ----------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Train until train.max_steps; returns the run summary (main rank) or {}."""
        tc = self.cfg.train
        step = self.step
        t_start = time.perf_counter()
        self.model.train()
        while step < tc.max_steps:
            lr = self.lr(step)
            for group in self.engine.param_groups:
                group["lr"] = lr

            params, widths = param_count(self.model), self.widths()
            t0 = time.perf_counter()
            loss = self.train_step()
            step_time = time.perf_counter() - t0
            step += 1

            pruned = self.maybe_prune(step)

            evaluated = (None, None)
            if step % tc.eval_interval == 0 or step == tc.max_steps:
                evaluated = self.evaluate()
            self.log.step(step, loss, lr, params, step_time, widths, *evaluated)

            if ((pruned is not None and tc.checkpoint_at_prune)
                    or (tc.checkpoint_interval and step % tc.checkpoint_interval == 0)
                    or step == tc.max_steps):
                self.save_checkpoint(step)
        self.step = step
        return self.summarize(time.perf_counter() - t_start)

    def summarize(self, seconds: float) -> dict[str, Any]:
        if not self.dist.is_main:
            return {}
        self.log.close()
        rows = read_metrics(self.run_dir)
        evals = [r for r in rows if r["eval_acc"] is not None]
        early, late = step_time_windows(rows)
        summary = {
            "run_dir": str(self.run_dir), "steps": self.step, "seconds": seconds,
            "params_start": self.initial_params, "params_end": param_count(self.model),
            "params_ratio": param_count(self.model) / self.initial_params,
            "final_eval_acc": evals[-1]["eval_acc"] if evals else None,
            "final_eval_loss": evals[-1]["eval_loss"] if evals else None,
            # language models: perplexity per token of the validation text
            "final_eval_ppl": (float(np.exp(evals[-1]["eval_loss"])) if evals and
                               self.data.task in ("lm", "mlm") else None),
            "step_time_early_s": early, "step_time_late_s": late,
            "step_time_late_over_early": late / early if early > 0 else float("nan"),
            "widths_end": self.widths(),
        }
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary

    def close(self) -> None:
        if self.dist.is_main:
            self.log.close()
        self.stream.close()
        self.engine.destroy()


def format_summary(s: dict[str, Any]) -> str:
    """The end-of-run summary printed by `secateur train`."""
    acc = "n/a" if s["final_eval_acc"] is None else f"{s['final_eval_acc']:.4f}"
    loss = "" if s["final_eval_loss"] is None else f" (val loss {s['final_eval_loss']:.4f}" + (
        f", perplexity {s['final_eval_ppl']:.2f})" if s.get("final_eval_ppl") else ")")
    return "\n".join([
        f"run finished: {s['steps']} steps in {s['seconds']:.1f} s -> {s['run_dir']}",
        f"  parameters      {s['params_start']:,} -> {s['params_end']:,} "
        f"({100 * s['params_ratio']:.1f}% of start)",
        f"  final accuracy  {acc}{loss}",
        f"  step time       early {1000 * s['step_time_early_s']:.2f} ms, late "
        f"{1000 * s['step_time_late_s']:.2f} ms (late/early {s['step_time_late_over_early']:.2f})",
    ])
