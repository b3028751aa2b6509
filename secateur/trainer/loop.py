"""The training loop: DeepSpeed steps with pruning events that physically shrink the model.

`Trainer.train()` is one `while` loop, read top to bottom: LR schedule, forward/backward/step,
`maybe_prune(step)`, eval, logging, checkpoint. Everything else here is a small helper of it.

Ending early. The run stops with one line on stderr and raises `RunStopped` (a SystemExit, so the
process exits with its code and no traceback):
- SIGTERM / SIGINT (a cluster's preemption, Ctrl-C): the current step is finished (pruning event,
  eval and log row included), a checkpoint is written, exit 143 (SIGTERM) or 130 (SIGINT), i.e.
  128 + the signal number. `secateur resume RUN` continues exactly as after SIGKILL. Every rank
  stops at the same step: a signal seen by any rank is agreed on by all at each step's end (one
  all_reduce of two ints). Repeated signals while stopping are ignored (SIGKILL aborts at once);
  a signal during set-up, before the first step, ends the process at once (nothing to save).
  torchrun forwards SIGTERM/SIGINT to its workers and kills them 30 s later: the step and its
  checkpoint must fit in that time (a cluster's grace period, e.g. Slurm's KillWait, likewise).
- a non-finite loss or gradient (EXIT_DIVERGED, 3): the step's update is not applied, no
  checkpoint is written, the last (finite) checkpoint stays latest. `train.skip_nonfinite: N`
  skips up to N such steps first (counted over the whole run). Checkpoints of non-finite weights
  are refused the same way; a pruning event on non-finite statistics or weights is skipped.
- a checkpoint that cannot be written (EXIT_SAVE_FAILED, 4): disk full, read-only folder, quota;
  the half-written folder is removed and `latest` stays on the previous checkpoint.
- a collective that does not complete within `train.collective_timeout_s` (a rank stopped
  answering), or another rank that ended (EXIT_PEER_LOST, 5): one line from each rank that sees
  it, instead of waiting forever. Under NCCL, torch's watchdog may end the process first. The
  timeout applies from the first step on; set-up keeps torch's default (30 minutes).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
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
from secateur.trainer.setup import (Prepared, dataset_from_config, eval_totals, example_batch, example_input,
                                    loss_fn, lr_at, model_from_config, model_source, param_count,
                                    pruner_from_config, unit_widths)

# the top-level names a training run writes into its folder. secateur.trainer.runfolder records
# them in the folder's manifest; a fresh `train --overwrite` replaces what a manifest names and
# nothing else (report.md, plots/ and export/ are recorded by `report`/`export` when they write)
RUN_FILES = ("checkpoints", "ranks", "metrics.csv", "events.jsonl", "config.yaml", "summary.json")


EXIT_DIVERGED = 3          # non-finite loss, gradient or weights
EXIT_SAVE_FAILED = 4       # a checkpoint could not be written (disk full, read-only, quota)
EXIT_PEER_LOST = 5         # another rank stopped answering (collective timeout) or ended


class RunStopped(SystemExit):
    """The run ended early on purpose after saying why in one line (module docstring).

    A SystemExit: the process exits with `code` (EXIT_DIVERGED, EXIT_SAVE_FAILED, or 128 + the
    signal number) and no traceback; in-process callers can catch it."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code)
        self.message = message


class _StopSignals:
    """SIGTERM/SIGINT handlers of one run (main thread only).

    Until `training` is set a signal ends the process at once (RunStopped, one line): set-up has
    nothing to save. Afterwards the handler only records the first signal; the loop stops after
    the current step."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, say: bool) -> None:
        self.say, self.training, self.received = say, False, 0
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread() or self._previous:
            return
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.training:
            self.received = self.received or signum
            return
        message = f"stopped by {signal.Signals(signum).name} during set-up, before any step"
        if self.say:
            print(message, file=sys.stderr, flush=True)
        raise RunStopped(128 + signum, message)


@contextlib.contextmanager
def _update_skipped(engine: Any):
    """`engine.step()` inside this block does DeepSpeed's bookkeeping (gradients cleared, step
    counters advanced, ZeRO partitions gathered) but the torch optimizer underneath does not
    update anything: weights, moments and the optimizer's step count stay as they were."""
    opt, seen = engine.optimizer, set()
    while getattr(opt, "optimizer", None) is not None and id(opt) not in seen:
        seen.add(id(opt))
        opt = opt.optimizer
    opt.step = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del opt.step


def _write_failure(err: BaseException) -> str | None:
    """What went wrong, in a few words, when `err` is a write the user can fix (disk full,
    read-only, quota, permissions: an OSError with an errno, or torch's file writer failing);
    None for anything else (a bug or a simulated crash keeps its traceback)."""
    if isinstance(err, OSError) and err.errno is not None:
        return f"{err.strerror or err}" + (f" ({err.filename})" if err.filename else "")
    if isinstance(err, RuntimeError) and ("inline_container" in str(err) or
                                          "PytorchStreamWriter" in str(err)):
        return "torch could not write a file (" + str(err).splitlines()[0].strip()[:160] + ")"
    return None


def _set_collective_timeout(seconds: float | None) -> None:
    """Give every process group of this process (the default one and those DeepSpeed creates)
    this timeout, so a collective whose peer stopped answering fails instead of waiting forever."""
    if seconds is None or not dist.is_initialized():
        return
    from datetime import timedelta

    c10d = dist.distributed_c10d
    setter = getattr(dist, "set_timeout", None) or getattr(c10d, "_set_pg_timeout", None)
    if setter is None:
        return
    groups = list(getattr(getattr(c10d, "_world", None), "pg_map", {}) or []) or [None]
    for group in groups:
        try:
            setter(timedelta(seconds=seconds), group)
        except (ValueError, RuntimeError):
            pass                       # not a member of that group, or a backend without timeouts


def _peer_failure(err: BaseException, timeout_s: float) -> str | None:
    """What a failed collective says about the other ranks, in a few words, or None when `err`
    is not about them."""
    text = str(err)
    if "timed out" in text.lower() or "timeout" in text.lower():
        return (f"a collective got no answer from another rank within {timeout_s:g} s "
                f"(train.collective_timeout_s): a rank stopped or hangs")
    if any(k in text for k in ("Connection closed by peer", "Connection reset by peer", "Broken pipe")):
        return "another rank ended (its connection closed)"
    return None


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
                 prepared: Prepared | None = None) -> None:
        from secateur.build import is_hf, to_device
        from secateur.data.loader import BatchStream

        self.cfg, self.run_dir, self.dist = cfg, Path(run_dir), dist_info
        self.signals = _StopSignals(say=dist_info.is_main)
        self.signals.install()
        self.nonfinite_skipped = 0          # steps skipped under train.skip_nonfinite so far
        self._step_bad = False              # the last train_step's update was not applied
        self.stop_signal = 0                # a stop signal all ranks agreed on (0: none)
        tc = cfg.train
        if tc.threads is not None:
            torch.set_num_threads(tc.threads)
        if tc.deterministic:
            torch.use_deterministic_algorithms(True)
        self._prepare_run_dir(resume)

        if prepared is not None and resume:
            raise ValueError("prepared: a resumed run rebuilds its model from the checkpoint")
        self.data = prepared.data if prepared is not None else dataset_from_config(cfg)
        self.device = dist_info.device
        meta = ckpt.read_meta(self.ckpt_path) if resume else None
        self.own = cfg.model.name is not None       # secateur's own model: rebuilt from its spec
        self.source = model_source(cfg, self.data)
        seed_everything(cfg.seed)                      # same initial weights on every rank
        if meta is not None and self.own:
            from secateur.models import build_model

            self.model = build_model(meta["spec"])     # the (possibly pruned) saved architecture
        elif prepared is not None:                     # `secateur train` built it in its preflight
            self.model = prepared.model
            random.setstate(prepared.rng[0])
            np.random.set_state(prepared.rng[1])
            torch.set_rng_state(prepared.rng[2])
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
        self.distiller = None
        if cfg.distill is not None:
            from secateur.trainer.distill import Distiller

            self.distiller = Distiller(cfg.distill.teacher, cfg.distill.temperature,
                                       cfg.distill.weight, self.source, self.device)
        if meta is not None and not self.own and meta.get("structure"):
            self._apply_structure(meta, example)
        if meta is not None and not (self.ckpt_path / ckpt.DS_TAG).is_dir():
            self.model.load_state_dict(ckpt.model_state_dict(self.ckpt_path))
        order = ShardedOrder(len(self.data.train), cfg.data.batch_size, dist_info.rank,
                             dist_info.world_size, seed=cfg.seed)
        from secateur.trainer.runfolder import drop_inherited_locks

        self.stream = BatchStream(self.data.train, order, num_workers=cfg.data.num_workers,
                                  seed=cfg.seed, worker_init=drop_inherited_locks)
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
        from secateur.trainer.export import replay_structure

        try:
            self.groups = replay_structure(self.model, self.groups, meta, example)
        except ValueError as err:
            raise ckpt.CheckpointError(f"{self.ckpt_path}: {err}") from None

    def widths(self) -> dict[str, int]:
        return unit_widths(self.model, self.groups)

    # ---- set-up helpers ----------------------------------------------------------------
    def _prepare_run_dir(self, resume: bool) -> None:
        from secateur.trainer import runfolder

        # rank 0 locks the folder; a fresh run refuses a folder holding a previous run or other
        # files (the CLI opens it first, with --overwrite and --config, and this call returns)
        runfolder.open_run(self.run_dir, self.dist, resume=resume)
        if resume:
            self.ckpt_path = ckpt.latest(self.run_dir)
        if self.dist.is_main:
            if resume:
                ckpt.remove_stale_temps(self.run_dir)
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
        self.nonfinite_skipped = int(meta.get("nonfinite_skipped", 0))
        if self.distiller is not None:
            self.distiller.load(self.ckpt_path, meta.get("distill_teacher"), self.example_x)

    def _barrier(self) -> None:
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()

    # ---- one step ----------------------------------------------------------------------
    def next_batch(self) -> tuple[Any, Tensor]:
        from secateur.build import to_device

        x, y = self.stream.next()
        return to_device(x, self.device), y.to(self.device, non_blocking=True)

    def train_step(self) -> float:
        """One optimizer step (gradient_accumulation_steps micro-batches). Returns the mean loss.

        Before the update all ranks agree (`_agree`) on whether any saw a non-finite loss or
        gradient and whether any received a stop signal. A non-finite step's update is not
        applied (`self._step_bad`), and the pruner's statistics are put back as they were
        before the step when such steps may be skipped (train.skip_nonfinite > 0)."""
        from secateur.build import forward

        engine, gas, total = self.engine.engine, self.cfg.deepspeed.gradient_accumulation_steps, 0.0
        saved = (self.pruner.state_dict() if self.pruner is not None and
                 self.cfg.train.skip_nonfinite > self.nonfinite_skipped else None)
        for i in range(gas):
            x, y = self.next_batch()
            if self.pruner is not None and self.pruner.needs_targets:
                self.pruner.observe_targets(y)
            logits = forward(engine, x, self.hf)
            loss = (self.distiller.loss(logits, x, y, self.hf) if self.distiller is not None
                    else loss_fn(logits, y))
            engine.backward(loss)
            total += loss.item()
            if i < gas - 1:
                engine.step()              # not a boundary: no update yet
                continue
            bad = self._agree(not math.isfinite(total) or not self._grads_finite())
            if bad:
                with _update_skipped(engine):
                    engine.step()
            else:
                engine.step()
                # ZeRO 1/2 (with clipping) skip a step with inf/NaN gradients themselves (agreed
                # over ranks); with fp16 loss scaling such skips are normal and not counted
                bad = (self.engine.zero_stage > 0 and not engine.was_step_applied()
                       and not engine.fp16_enabled())
        self._step_bad = bad
        if bad and saved is not None:
            self.pruner.load_state_dict(saved)
        return total / gas

    def _grads_finite(self) -> bool:
        """Whether this rank's (already averaged) gradients are finite. ZeRO 0 only: under ZeRO
        1/2 the gradients live in DeepSpeed's partitions, which DeepSpeed checks itself."""
        if self.engine.zero_stage != 0:
            return True
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        return not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())

    def _agree(self, bad: bool) -> bool:
        """All ranks learn whether any rank's step was non-finite and whether any received a
        stop signal (one all_reduce of two ints). Sets `self.stop_signal` to the agreed signal
        (0: none; a signal arriving later counts at the next step); returns the agreed `bad`."""
        self.stop_signal = self.signals.received
        if self.dist.world_size == 1:
            return bad
        flags = torch.tensor([int(bad), self.stop_signal], dtype=torch.int64, device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        self.stop_signal = int(flags[1])
        return bool(flags[0])

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
        # the summed statistics and the weights are the same on every rank: so is this decision
        bad = sorted(k for k, t in self.pruner.stats().items() if not bool(torch.isfinite(t).all()))
        if bad or not self._weights_finite():
            what = f"statistics {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}" if bad else "weights"
            self.pruner.criterion.reset()           # the next event decides on fresh statistics
            self.log.event("prune_skipped", step, reason=f"non-finite {what}")
            self.log.say(f"warning: pruning event at step {step} skipped: non-finite {what}")
            return None
        before = param_count(self.model)
        if self.distiller is not None and self.distiller.spec == "snapshot" and not self.distiller.active:
            # the teacher: the model as it is just before its first cut
            with self.engine.gathered():    # ZeRO-3: whole weights, not empty partitions
                state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            self.distiller.snapshot(self.architecture(), state, self.example_x)
        report = self.engine.rebuild_around(self.pruner.prune)
        after = param_count(self.model)
        if self.cfg.train.verify_ranks:
            with self.engine.gathered():     # ZeRO-3: whole parameters to digest
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
        """Atomic checkpoint of everything needed to continue exactly (all ranks call it).

        Non-finite weights are never saved: the run stops (EXIT_DIVERGED). A write that fails
        for a reason the user can fix (disk full, read-only folder, quota) on any rank ends the
        run on every rank with one line (EXIT_SAVE_FAILED); the half-written folder is removed
        and `latest` stays on the previous checkpoint."""
        if step == self.last_saved:
            return
        if not self._weights_finite():
            self._stop(EXIT_DIVERGED, f"error: the weights are not finite after step {step}; no "
                       f"checkpoint written; {self._kept()}")
        tmp = ckpt.tmp_dir_for(self.run_dir, step)
        with self._saving(step):
            if self.dist.is_main:
                ckpt.begin(self.run_dir, step)
        with self._saving(step, inside_deepspeed=True):
            self.engine.save_checkpoint(str(tmp), ckpt.DS_TAG)
        with self._saving(step):
            self._write_own_files(step, tmp)
        with self._saving(step):
            if self.dist.is_main:
                final = ckpt.publish(self.run_dir, step, keep=self.cfg.train.keep_checkpoints)
                self.log.event("checkpoint", step, path=str(final.relative_to(self.run_dir)))
        self.last_saved = step

    def _write_own_files(self, step: int, tmp: Path) -> None:
        """This rank's state file; on the main rank also meta.json and the example batch."""
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
                "tokenizer": self.data.meta.get("tokenizer"),
                "nonfinite_skipped": self.nonfinite_skipped,
                "distill_teacher": self.distiller.save(tmp) if self.distiller is not None else None})
            from secateur.trainer.export import EXAMPLE_FILE, save_example

            save_example(self.example_x, tmp / EXAMPLE_FILE)

    @contextlib.contextmanager
    def _saving(self, step: int, inside_deepspeed: bool = False):
        """One phase of a checkpoint write, ended by all ranks agreeing that it succeeded (this
        replaces a barrier). A write failure the user can fix (`_write_failure`) on any rank
        removes the temp folder and stops every rank with one line; other errors propagate."""
        failure = None
        try:
            yield
        except (OSError, RuntimeError) as err:
            failure = _write_failure(err)
            if failure is None:
                raise
            with contextlib.suppress(OSError):
                free = shutil.disk_usage(self.run_dir).free
                failure += f"; {free / 2**20:.1f} MiB free where the run is"
            if inside_deepspeed and self.dist.world_size > 1:
                dist.barrier()         # DeepSpeed's closing barrier, which the other ranks are in
        failure = self._agree_failure(failure)
        if failure is not None:
            if self.dist.is_main:
                ckpt.discard(self.run_dir, step)
            self._stop(EXIT_SAVE_FAILED, f"error: could not write the checkpoint of step {step}: "
                       f"{failure}; {self._kept()}; free space or fix the folder, then continue "
                       f"with: secateur resume {self.run_dir}")

    def _agree_failure(self, failure: str | None) -> str | None:
        """Every rank learns the first failing rank's reason (None: all ranks succeeded)."""
        if self.dist.world_size == 1:
            return failure
        flag = torch.tensor([int(failure is not None)], dtype=torch.int64, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if not int(flag):
            return None
        reasons: list[str | None] = [None] * self.dist.world_size
        dist.all_gather_object(reasons, failure)
        rank, reason = next((r, m) for r, m in enumerate(reasons) if m is not None)
        return reason if rank == 0 else f"rank {rank}: {reason}"

    def _weights_finite(self) -> bool:
        """Whether every parameter is finite (identical on every rank; collective under ZeRO-3,
        whose partitions are gathered to check whole values)."""
        with self.engine.gathered():
            return bool(torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all())

    def _kept(self) -> str:
        """Where the run can continue from, in words."""
        if self.last_saved < 0:
            return "no checkpoint was written before"
        return f"{ckpt.CKPT_DIR}/latest stays at {ckpt.step_name(self.last_saved)}"

    def _stop(self, code: int, message: str, every_rank: bool = False) -> None:
        """End the run early: one line on the main rank's stderr (on every rank's with
        `every_rank`, for failures the main rank may not see), then RunStopped(code)."""
        if self.dist.is_main:
            try:
                self.log.event("stopped", self.step, code=code, message=message)
                self.log.close()
            except OSError:
                pass                   # the disk may be full: the line below still says why
        if self.dist.is_main or every_rank:
            print(message, file=sys.stderr, flush=True)
        raise RunStopped(code, message)

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
        """Train until train.max_steps; returns the run summary (main rank) or {}.

        Raises RunStopped (a SystemExit) when the run ends early: a stop signal, divergence or a
        checkpoint that cannot be written (module docstring)."""
        self.signals.training = True
        # from here on (set-up keeps torch's 30 minutes: one rank may build an op or load data
        # for long while the others wait); DeepSpeed's own groups included
        _set_collective_timeout(self.cfg.train.collective_timeout_s)
        try:
            return self._train()
        except RuntimeError as err:      # torch's DistBackendError is one
            why = _peer_failure(err, self.cfg.train.collective_timeout_s)
            if why is None or self.dist.world_size == 1:
                raise
            self._stop(EXIT_PEER_LOST, f"error: rank {self.dist.rank}: {why}; {self._kept()}; "
                       f"continue with: secateur resume {self.run_dir}", every_rank=True)
        except OSError as err:           # a log write on a full or read-only disk
            why = _write_failure(err)
            if why is None:
                raise
            self._stop(EXIT_SAVE_FAILED, f"error: could not write to {self.run_dir}: {why}; "
                       f"{self._kept()}; free space or fix the folder, then continue with: "
                       f"secateur resume {self.run_dir}")
        finally:
            self.signals.restore()

    def _train(self) -> dict[str, Any]:
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
            self.step = step
            if self._step_bad and self._out_of_skips(step, loss):
                self.log.step(step, loss, lr, params, step_time, widths)
                what = (f"the loss is {loss}" if not math.isfinite(loss)
                        else "a gradient is not finite")
                self._stop(EXIT_DIVERGED, f"error: diverged at step {step}: {what}; the step's "
                           f"update was not applied and no checkpoint written; {self._kept()} "
                           f"(lower optimizer.lr, or let train.skip_nonfinite skip such steps)")

            pruned = self.maybe_prune(step)

            evaluated = (None, None)
            if step % tc.eval_interval == 0 or step == tc.max_steps:
                evaluated = self.evaluate()
            self.log.step(step, loss, lr, params, step_time, widths, *evaluated)

            if ((pruned is not None and tc.checkpoint_at_prune)
                    or (tc.checkpoint_interval and step % tc.checkpoint_interval == 0)
                    or step == tc.max_steps):
                self.save_checkpoint(step)
            if self.stop_signal and step < tc.max_steps:
                self.save_checkpoint(step)
                self._stop(128 + self.stop_signal,
                           f"stopped by {signal.Signals(self.stop_signal).name} at step {step}; "
                           f"checkpoint written ({ckpt.CKPT_DIR}/{ckpt.step_name(step)}); "
                           f"continue with: secateur resume {self.run_dir}")
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

    def _out_of_skips(self, step: int, loss: float) -> bool:
        """A step whose update was not applied (non-finite loss or gradient): True when
        train.skip_nonfinite is used up (the run stops), else count it and say so."""
        if self.nonfinite_skipped >= self.cfg.train.skip_nonfinite:
            return True
        self.nonfinite_skipped += 1
        self.log.event("nonfinite_skipped", step, loss=loss, skipped=self.nonfinite_skipped)
        self.log.say(f"warning: step {step}: non-finite loss or gradient (loss {loss}); update "
                     f"skipped ({self.nonfinite_skipped} of train.skip_nonfinite "
                     f"{self.cfg.train.skip_nonfinite})")
        return False

    def close(self) -> None:
        """Stop the data workers and the engine, close the logs, put back the signal handlers."""
        self.signals.restore()
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
