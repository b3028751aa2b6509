"""Process group and DeepSpeed engine around any nn.Module, rebuilt when the model shrinks.

DeepSpeed gets a plain torch optimizer (AdamW/Adam/SGD), so no DeepSpeed optimizer op is compiled.
A pruning event gathers every parameter's fp32 master value and optimizer state as whole tensors,
tears the engine down, lets the surgery shrink the model (holding the masters, in fp32) and a torch
optimizer holding that state, then initialises a new engine and writes the cut masters and state
into it, wherever it keeps them:
- ZeRO 0, fp32: the torch optimizer itself; the parameter is its own master.
- ZeRO 0, bf16/fp16: DeepSpeed's FP16_UnfusedOptimizer, fp32 copies of the parameters.
- ZeRO 1/2, any precision: DeepSpeed's flat fp32 partitions, read and written per parameter with
  deepspeed.utils.safe_get_full_fp32_param / safe_get_full_optimizer_state and their setters.
The fp16 loss scale and the engine's step counters carry over as well. A checkpoint also holds the
same whole-tensor state by parameter name (FULL_STATE_FILE), so a run continues on another number
of ranks.
"""
from __future__ import annotations

import os
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from secateur.trainer.config import Config, OptimizerConfig

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global rank, world size, local rank, its device and backend."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# rendezvous variables this process set for its own 1-rank group; removed again at shutdown so a
# later run (or a child process) does not try to reuse a port that may still be taken
_OWN_ENV: dict[str, str] = {}


def init_distributed(local_rank: int | None = None, timeout_s: float | None = None) -> DistInfo:
    """Join the process group set up by torchrun / the deepspeed launcher (RANK, WORLD_SIZE,
    MASTER_ADDR in the environment), or create a 1-rank group for a plain single process.

    CUDA ranks use NCCL, CPU ranks gloo. `local_rank` is the launcher's --local_rank, if given.
    `timeout_s`: how long a collective waits for the other ranks before it fails (torch's
    default, 30 minutes for gloo, when None; the Trainer applies train.collective_timeout_s to
    every group either way). Stale torch extension build locks are cleared first
    (secateur.warmup.check_build_locks), so DeepSpeed's op build does not wait on a dead owner.
    """
    from secateur.warmup import prepare_op_cache

    prepare_op_cache(cpu=not torch.cuda.is_available())
    if "RANK" not in os.environ:
        own = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": str(local_rank or 0),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
        os.environ.update(own)
        _OWN_ENV.update(own)
    if local_rank is not None:
        os.environ["LOCAL_RANK"] = str(local_rank)
    lr = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(lr)
        device, backend = torch.device("cuda", lr), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        if timeout_s is not None:
            from datetime import timedelta

            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        else:
            dist.init_process_group(backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), lr, device, backend)


_SHUTDOWNS = [0]     # shutdowns in this process: every rank counts the same, so keys match


def shutdown_distributed(timeout_s: float | None = None) -> None:
    """Every entry point that ends normally ends here: the ranks meet, then the process group is
    destroyed. `timeout_s`: how long a rank waits for the others (a run passes
    train.collective_timeout_s; None: the store's own timeout, the group's at creation). They meet through the rendezvous store, not a gloo barrier: a gloo context torn
    down right after a barrier can fail a peer whose last messages are still in flight (the peer
    aborts, SIGABRT; pytorch/gloo issue 155). Once every rank has reached the store, every
    collective has completed on every rank, so no gloo traffic is left to lose."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if dist.get_world_size() > 1:
            _store_barrier(timeout_s)
    finally:                              # torn down even when a rank never came
        destroy_process_group()


def _store_barrier(timeout_s: float | None) -> None:
    """Wait until every rank has called this; a rank missing after `timeout_s` seconds (None: the
    store's timeout) raises torch's DistStoreError."""
    _SHUTDOWNS[0] += 1
    get_store = getattr(dist.distributed_c10d, "_get_default_store", None)
    if get_store is None:                 # a torch without it: the plain barrier
        dist.barrier()
        return
    store, key = get_store(), f"secateur/shutdown/{_SHUTDOWNS[0]}"
    if store.add(f"{key}/arrived", 1) == dist.get_world_size():
        store.set(f"{key}/go", "1")
    if timeout_s is None:
        store.wait([f"{key}/go"])
    else:
        from datetime import timedelta

        store.wait([f"{key}/go"], timedelta(seconds=timeout_s))


def destroy_process_group() -> None:
    """Destroy the default group, through DeepSpeed when it is in use so that it also drops its
    cached sub-groups (a later run in the same process then starts clean)."""
    import sys

    dscomm = sys.modules.get("deepspeed.comm.comm")
    if dscomm is not None and getattr(dscomm, "cdb", None) is not None:
        dscomm.destroy_process_group()
    elif dist.is_initialized():
        dist.destroy_process_group()
    for k, v in list(_OWN_ENV.items()):
        if os.environ.get(k) == v:
            del os.environ[k]
    _OWN_ENV.clear()


def make_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """A torch optimizer over model's trainable parameters; weight decay on tensors with >= 2 dims.

    Parameters are grouped as [decayed, not decayed] (empty groups left out), always in
    model.parameters() order, so two calls on the same model give matching param_groups.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return cls(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


FULL_STATE_FILE = "full_state.pt"      # world-size-independent model + optimizer state, per checkpoint
FULL_STATE_FORMAT = "secateur-full-state/1"
# DynamicLossScaler / LossScaleConfig fields that move (fp16); the rest is configuration
_SCALER_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")
_ENGINE_COUNTERS = ("global_steps", "global_samples", "skipped_steps")   # as DeepSpeed saves them


def deepspeed_config(cfg: Config, world_size: int, num_params: int | None = None) -> dict[str, Any]:
    """The DeepSpeed JSON config for this run (torch optimizer, quiet logging; fp32 unless
    `deepspeed.precision` or deepspeed.extra's fp16/bf16 section says otherwise).

    num_params sizes the ZeRO communication buckets: DeepSpeed's default (5e8 elements) makes it
    allocate and clear gigabyte buffers every step, which dominates small models on CPU.
    """
    ds = cfg.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage > 0 and num_params is not None:
        bucket = int(min(5e8, max(2**20, num_params)))
        zero.update(reduce_bucket_size=bucket, allgather_bucket_size=bucket)
    out = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": ds.gradient_accumulation_steps,
        "train_batch_size": cfg.data.batch_size * ds.gradient_accumulation_steps * world_size,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.optimizer.grad_clip > 0:
        out["gradient_clipping"] = cfg.optimizer.grad_clip
    if ds.precision != "fp32":
        out[ds.precision] = {"enabled": True}
    out.update(ds.extra)
    return out


def precision_of(ds_config: dict[str, Any]) -> str:
    """'bf16', 'fp16' or 'fp32': the parameter dtype a DeepSpeed JSON config trains in."""
    for name in ("bf16", "fp16"):
        section = ds_config.get(name)
        if isinstance(section, dict) and section.get("enabled"):
            return name
    return "fp32"


def _quiet_deepspeed() -> None:
    import logging

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*")
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    if not torch.cuda.is_available() and dist.is_initialized() and dist.get_world_size() == 1:
        # DeepSpeed's CPU backend JIT-builds (or loads) a shared-memory all-reduce op on start; it
        # only speeds up collectives between ranks, and one rank has none: skip the build
        import deepspeed.comm.torch as ds_torch

        ds_torch.build_shm_op = lambda: None


def _cast_floats(x: Any, dtype: torch.dtype) -> Any:
    if torch.is_tensor(x):
        return x.to(dtype) if x.is_floating_point() and x.dtype != dtype else x
    if isinstance(x, dict):
        return {k: _cast_floats(v, dtype) for k, v in x.items()}
    if isinstance(x, (list, tuple)) and not hasattr(x, "_fields"):
        return type(x)(_cast_floats(v, dtype) for v in x)
    return x


def _inputs_to_param_dtype(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    # a bf16/fp16 model takes the fp32 batches the data pipeline makes (and fp32 again while the
    # surgery runs on the fp32 masters): floating inputs follow the parameters' current dtype
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), None)
    if dtype is None:
        return args, kwargs
    return _cast_floats(args, dtype), _cast_floats(kwargs, dtype)


def _logits_to_fp32(module: nn.Module, args: tuple, out: Any) -> Any:
    # the loss (and its gradient's first step) in fp32, as autocast would
    if torch.is_tensor(out) and out.is_floating_point():
        return out.float()
    logits = getattr(out, "logits", None)
    if torch.is_tensor(logits) and logits.is_floating_point() and isinstance(out, dict):
        out["logits"] = logits.float()
    return out


def _clone_state(st: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in st.items()}


def regroup_rank_states(states: list[dict[str, Any]], rank: int) -> dict[str, Any]:
    """This rank's state, from the per-rank checkpoint states of a run that had len(states) ranks,
    for a run continuing on another number of ranks ({} when the checkpoint holds none).

    - Pruner statistics are additive accumulators, summed over ranks at every event: rank 0 takes
      their sum over the saved ranks and every other rank starts from zero, so the next event sees
      the same totals. The schedule position (events done, step, initial widths) is the same on
      every saved rank; rank 0's is used.
    - The data position (epoch, cursor) is global and the same on every rank: rank 0's. The new
      ranks take the next global batches of the same epoch permutation, each a `batch_size` slice.
    - RNG: rank r continues saved rank r's streams; a rank that did not exist gets none ("rng"
      left out: the caller seeds it).
    """
    if not states or not states[0]:
        return {}
    out = {k: v for k, v in states[0].items() if k != "rng"}
    if rank < len(states) and "rng" in states[rank]:
        out["rng"] = states[rank]["rng"]
    pruner = states[0].get("pruner")
    if pruner is not None:
        stats = {k: v.clone() for k, v in pruner.get("stats", {}).items()}
        for k, v in stats.items():
            if rank == 0:
                for other in states[1:]:
                    v += other["pruner"]["stats"][k]
            else:
                v.zero_()
        out["pruner"] = {**pruner, "stats": stats}
    return out


class Engine:
    """A DeepSpeed engine that can be rebuilt around a model whose layers changed shape.

    model: the bare nn.Module (its parameters keep their identity across rebuilds).
    make_opt: builds a fresh torch optimizer over the model (same param-group layout every time).

    Every parameter has a *master* value in fp32 and optimizer state; where they live depends on
    the DeepSpeed wrapper, which `kind` names:
    - "torch": ZeRO 0, fp32. The engine's optimizer is the torch optimizer; the parameter is its
      own master.
    - "unfused": ZeRO 0, bf16/fp16. DeepSpeed's FP16_UnfusedOptimizer keeps an fp32 copy of each
      low-precision parameter (fp32_groups) and the torch optimizer's state is keyed by the copies.
    - "zero": ZeRO 1/2, any precision. Masters and state live in flat fp32 partitions, one slice
      per rank; they are gathered and written per parameter with deepspeed.utils.safe_get_full_*
      / safe_set_full_*.
    - "zero3": ZeRO 3. As "zero", and the parameters themselves are partitioned too: an event
      gathers them, strips what DeepSpeed attached to the parameters and modules, lets the surgery
      cut the whole fp32 model, and partitions it again in the new engine.
    `full_master_params` and `full_optimizer_state` read them as whole tensors keyed by the model
    parameter, whatever the kind; `load_full_state` writes such tensors into the current engine.
    """

    def __init__(self, model: nn.Module, make_opt: Callable[[nn.Module], torch.optim.Optimizer],
                 ds_config: dict[str, Any]) -> None:
        _quiet_deepspeed()
        import deepspeed

        from deepspeed.utils import logger as ds_logger
        ds_logger.setLevel("WARNING")
        self._deepspeed = deepspeed
        self.model, self.make_opt, self.ds_config = model, make_opt, ds_config
        self.zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
        self.precision = precision_of(ds_config)
        self._hooks = []
        if self.precision != "fp32":
            self._hooks = [model.register_forward_pre_hook(_inputs_to_param_dtype, with_kwargs=True),
                           model.register_forward_hook(_logits_to_fp32)]
        self.engine = self._initialize(make_opt(model))

    def _initialize(self, optimizer: torch.optim.Optimizer):
        objs = [*self.model.modules(), *self.model.parameters()]
        before = [set(o.__dict__) for o in objs]
        engine, *_ = self._deepspeed.initialize(model=self.model, optimizer=optimizer,
                                                config=self.ds_config)
        # what DeepSpeed attached to the model (ZeRO-3: partitioning methods and ds_* fields on
        # every parameter and module), so that a rebuild can hand the next engine a plain model
        self._ds_added = [(o, set(o.__dict__) - b) for o, b in zip(objs, before)]
        return engine

    def _release(self) -> None:
        """engine.destroy() and what it leaves behind: the forward hooks the engine put on the
        model (they would keep the old engine and its buffers alive, and run at every forward).
        DeepSpeedEngine.__del__ destroys again when the old engine is garbage collected, and a
        ZeRO optimizer's destroy unlinks its parameters (p._hp_mapping = None): by then they are
        the next engine's, which would read zeros as their masters. So the old engine's destroy
        becomes a no-op once done."""
        eng = self.engine
        eng.destroy()
        eng.destroy = lambda: None
        for name in ("module_forward_pre_hook", "module_forward_post_hook"):
            handle = getattr(eng, name, None)
            if handle is not None:
                handle.remove()
                setattr(eng, name, None)

    def _unpartition(self, full: dict[nn.Parameter, Tensor]) -> None:
        """After a ZeRO-3 engine is released: plain parameters holding `full`, modules without
        DeepSpeed's fields (the next engine converts them again)."""
        for obj, added in self._ds_added:
            for k in added:
                obj.__dict__.pop(k, None)
            if isinstance(obj, nn.Module) and type(obj._parameters) is not dict:
                # plain lookups: ZeROOrderedDict's own __getitem__ would fetch partitions
                obj._parameters = {k: dict.__getitem__(obj._parameters, k) for k in list(obj._parameters)}
        for p in self.model.parameters():
            p.data = full[p]
            p.grad = None

    def gathered(self) -> Any:
        """A context in which every parameter holds its whole value (ZeRO-3: gathered on every
        rank, read-only; other stages: nothing to do). Collective under ZeRO-3."""
        import contextlib

        if self.zero_stage != 3:
            return contextlib.nullcontext()
        return self._deepspeed.zero.GatheredParameters(list(self.model.parameters()))

    def _full_params(self) -> dict[nn.Parameter, Tensor]:
        """Whole copies of the model's current (low-precision) parameters. Collective (ZeRO-3)."""
        with self.gathered():
            return {p: p.data.clone() for p in self.model.parameters()}

    @property
    def kind(self) -> str:
        """Where masters and optimizer state live: "torch", "unfused", "zero" or "zero3"."""
        opt = self.engine.optimizer
        if self.zero_stage in (1, 2) and hasattr(opt, "single_partition_of_fp32_groups"):
            return "zero"
        if self.zero_stage == 3 and hasattr(opt, "fp32_partitioned_groups_flat"):
            return "zero3"
        if hasattr(opt, "fp32_groups") and hasattr(opt, "fp16_groups"):
            return "unfused"
        if self.zero_stage == 0 and isinstance(opt, torch.optim.Optimizer):
            return "torch"
        raise RuntimeError(f"DeepSpeed wrapped the optimizer in {type(opt).__name__}, which the "
                           "pruning surgery cannot read (a torch optimizer, ZeRO 0-3, only)")

    @property
    def param_groups(self) -> list[dict]:
        """The optimizer's param groups (set `lr` here)."""
        return self.engine.optimizer.param_groups

    def _trainable(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _unfused_pairs(self) -> list[tuple[nn.Parameter, Tensor]]:
        """(low-precision model parameter, its fp32 master) under FP16_UnfusedOptimizer."""
        opt = self.engine.optimizer
        return [(lp, hp) for lps, hps in zip(opt.fp16_groups, opt.fp32_groups)
                for lp, hp in zip(lps, hps)]

    # ---- masters and optimizer state, gathered to whole parameters ---------------------------
    def full_master_params(self) -> dict[nn.Parameter, Tensor]:
        """The fp32 master value of every trainable parameter, a whole tensor (a copy).

        Collective under ZeRO 1-3 (every rank must call it). In fp32 training at ZeRO 0 the
        master is the parameter itself."""
        kind = self.kind
        if kind == "torch":
            return {p: p.detach().clone() for p in self._trainable()}
        if kind == "unfused":
            return {lp: hp.detach().clone() for lp, hp in self._unfused_pairs()}
        from deepspeed.utils import safe_get_full_fp32_param

        return {p: safe_get_full_fp32_param(p).detach().clone() for p in self._trainable()}

    def _fp32_flats(self) -> list[Tensor]:
        """The flat fp32 partitions (one per parameter group) the ZeRO optimizer steps on."""
        zopt = self.engine.optimizer
        return list(zopt.fp32_partitioned_groups_flat if self.zero_stage == 3
                    else zopt.single_partition_of_fp32_groups)

    def _zero_flat_state(self) -> tuple[list[str], dict[str, Any]]:
        """(per-element state keys, scalar state entries) of the ZeRO partitions' optimizer."""
        zopt = self.engine.optimizer
        flat = self._fp32_flats()[0]
        state = zopt.optimizer.state.get(flat, {})
        per_elem = [k for k, v in state.items() if torch.is_tensor(v) and v.shape == flat.shape]
        scalars = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in state.items()
                   if k not in per_elem}
        return per_elem, scalars

    def _relink_state_views(self) -> None:
        # DeepSpeed links each parameter's view of the optimizer state once, right after the first
        # param group's first step, when later groups have no state yet (0.19.8): with two groups
        # (decay / no decay) the second group's views stay empty. Link again now that all exist.
        zopt = self.engine.optimizer
        zopt._hp_optimizer_states_linked = False
        zopt._lazy_init_hp_params_optimizer_state()

    def full_optimizer_state(self) -> dict[nn.Parameter, dict[str, Any]]:
        """Optimizer state per model parameter, whole fp32 tensors shaped like the parameter
        (copies), scalars such as Adam's step included.

        Collective under ZeRO 1-3 (every rank must call it). Parameters without state (no step
        taken yet) are left out.
        """
        kind = self.kind
        if kind == "torch":
            opt = self.engine.optimizer
            return {p: _clone_state(opt.state[p]) for g in opt.param_groups for p in g["params"]
                    if opt.state.get(p)}
        if kind == "unfused":
            inner = self.engine.optimizer.optimizer
            return {lp: _clone_state(inner.state[hp]) for lp, hp in self._unfused_pairs()
                    if inner.state.get(hp)}
        from deepspeed.utils import safe_get_full_optimizer_state

        per_elem, scalars = self._zero_flat_state()
        if not per_elem:
            return {}
        if kind == "zero":
            self._relink_state_views()
        out = {}
        for p in self._trainable():
            out[p] = {k: safe_get_full_optimizer_state(p, k).clone() for k in per_elem}
            out[p].update(_clone_state(scalars))
        return out

    def _extras(self) -> dict[str, Any]:
        """Loss-scaler position (fp16) and the engine's step counters."""
        opt = self.engine.optimizer
        scaler = getattr(opt, "loss_scaler", None) or getattr(opt, "loss_scale_config", None)
        return {"scaler": {k: getattr(scaler, k) for k in _SCALER_FIELDS if hasattr(scaler, k)}
                if scaler is not None else {},
                "counters": {k: getattr(self.engine, k) for k in _ENGINE_COUNTERS
                             if hasattr(self.engine, k)}}

    def _load_extras(self, extras: dict[str, Any]) -> None:
        opt = self.engine.optimizer
        scaler = getattr(opt, "loss_scaler", None) or getattr(opt, "loss_scale_config", None)
        if scaler is not None:
            for k, v in extras.get("scaler", {}).items():
                if hasattr(scaler, k):
                    setattr(scaler, k, v)
        for k, v in extras.get("counters", {}).items():
            if hasattr(self.engine, k):
                setattr(self.engine, k, v)

    @torch.no_grad()
    def load_full_state(self, masters: dict[nn.Parameter, Tensor],
                        optim: dict[nn.Parameter, dict[str, Any]],
                        extras: dict[str, Any] | None = None) -> None:
        """Write whole-parameter fp32 masters (the model's low-precision weights follow them) and
        optimizer state into the current engine, whatever its ZeRO stage and precision.

        Every rank calls it with the same full tensors; each keeps what its partition holds."""
        kind = self.kind
        if kind == "zero3":       # partitioned: write whole values, DeepSpeed partitions them again
            with self._deepspeed.zero.GatheredParameters(list(masters), modifier_rank=0):
                for p, m in masters.items():
                    p.data.copy_(m.to(p.dtype))
        else:
            for p, m in masters.items():
                if p.data_ptr() != m.data_ptr():
                    p.data.copy_(m.to(p.dtype))
        if kind == "torch":
            opt = self.engine.optimizer
            for p, st in optim.items():
                opt.state[p] = _clone_state(st)
        elif kind == "unfused":
            inner = self.engine.optimizer.optimizer
            for lp, hp in self._unfused_pairs():
                if lp in masters:
                    hp.copy_(masters[lp])
                if lp in optim:
                    inner.state[hp] = _clone_state(optim[lp])
        else:
            self._load_zero_state(masters, optim)
        if extras:
            self._load_extras(extras)

    def _load_zero_state(self, masters: dict[nn.Parameter, Tensor],
                         optim: dict[nn.Parameter, dict[str, Any]]) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        if self.zero_stage == 3:
            safe_set_full_fp32_param = self._set_zero3_partition
            safe_set_full_optimizer_state = self._set_zero3_partition
        for p, m in masters.items():
            safe_set_full_fp32_param(p, m)
        if not optim:
            return
        zopt = self.engine.optimizer
        sample = next(iter(optim.values()))
        per_elem = [k for k, v in sample.items() if torch.is_tensor(v) and v.dim() > 0]
        scalars = {k: v for k, v in sample.items() if k not in per_elem}
        # torch optimizers create state lazily at the first step; create it now on the flat
        # partitions, link DeepSpeed's per-parameter views into it (ZeRO 1/2), then fill it per
        # parameter.
        for flat in self._fp32_flats():
            st = {k: torch.zeros_like(flat) for k in per_elem}
            st.update(_clone_state(scalars))
            zopt.optimizer.state[flat] = st
        if self.zero_stage != 3:
            self._relink_state_views()
        for p in self._trainable():
            if p in optim:
                for k in per_elem:
                    safe_set_full_optimizer_state(p, optim[p][k], k)

    def _set_zero3_partition(self, p: nn.Parameter, value: Tensor, key: str | None = None) -> None:
        """Write this rank's share of the whole `value` of parameter `p` (its fp32 master, or the
        optimizer state `key`) into the ZeRO-3 partition. DeepSpeed's own setter
        (set_full_hp_param) reads past the end of `value` on the last rank when the parameter's
        size is not a multiple of the number of ranks (its partition is padded); the padding is
        written as zeros here."""
        zopt = self.engine.optimizer
        if not p.requires_grad:
            return
        part, _ = zopt._get_fp32_opt_state_partition(p, release_swap_buffers=False, optim_state_key=key)
        flat = value.reshape(-1).to(part.dtype)
        start = part.numel() * zopt._get_param_partition_rank(p)
        n = max(0, min(part.numel(), flat.numel() - start))
        part.data.zero_()
        if n:
            part.data[:n].copy_(flat[start:start + n])

    # ---- rebuild ---------------------------------------------------------------------------
    def rebuild_around(self, surgery: Callable[[torch.optim.Optimizer], T]) -> T:
        """Tear the engine down, run `surgery(optimizer)` on the bare model in fp32 (its
        parameters hold the fp32 masters) and a torch optimizer holding the full per-parameter
        state, then build a new engine and write the cut masters and state into it.

        Collective: every rank calls it with a surgery that makes the same decisions.
        Returns what `surgery` returns.
        """
        masters = self.full_master_params()
        full = self.full_optimizer_state()
        extras = self._extras()
        whole = self._full_params() if self.zero_stage == 3 else None
        self._release()
        if whole is not None:
            self._unpartition(whole)
        if self.precision != "fp32":
            self.model.float()              # buffers too (exact: bf16/fp16 values fit in fp32)
        for p in self.model.parameters():
            # parameters are views into DeepSpeed's buffers (or low precision): own fp32 storage
            p.data = masters[p] if p in masters else p.data.clone()
            p.grad = None
        shadow = self.make_opt(self.model)
        for p, st in full.items():
            shadow.state[p] = st
        result = surgery(shadow)
        cut = {p: p.data for p in self._trainable()}
        self.engine = self._initialize(self.make_opt(self.model))
        self.load_full_state(cut, {p: shadow.state[p] for p in shadow.state if shadow.state[p]},
                             extras)
        return result

    def destroy(self) -> None:
        """Release the DeepSpeed engine (the model stays usable, whole again under ZeRO-3).
        Collective under ZeRO-3."""
        whole = self._full_params() if self.zero_stage == 3 else None
        self._release()
        if whole is not None:
            self._unpartition(whole)
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # ---- checkpoints -----------------------------------------------------------------------
    def save_checkpoint(self, save_dir: str, tag: str) -> None:
        """DeepSpeed's own checkpoint (model + optimizer, ZeRO partitions per rank) and, written by
        rank 0, FULL_STATE_FILE: the whole fp32 masters and optimizer state per parameter name,
        which a run on another number of ranks (or ZeRO stage) resumes from. Collective."""
        self.engine.save_checkpoint(save_dir, tag=tag, save_latest=False)
        self.save_full_state(Path(save_dir) / FULL_STATE_FILE)
        if self.zero_stage == 3:
            # DeepSpeed's module file holds empty placeholders for partitioned parameters; the
            # whole weights go to model.safetensors, which checkpoint.model_state_dict reads first
            from safetensors.torch import save_file

            with self.gathered():
                sd = {k: v.detach().cpu().clone().contiguous() for k, v in self.model.state_dict().items()}
            if not dist.is_initialized() or dist.get_rank() == 0:
                save_file(sd, str(Path(save_dir) / "model.safetensors"))

    def save_full_state(self, path: Path) -> None:
        """Gather the whole masters and optimizer state (collective); rank 0 writes them to
        `path`, keyed by parameter name (torch.save)."""
        masters, optim, extras = self.full_master_params(), self.full_optimizer_state(), self._extras()
        if dist.is_initialized() and dist.get_rank() != 0:
            return
        names = {p: n for n, p in self.model.named_parameters()}
        torch.save({"format": FULL_STATE_FORMAT, "precision": self.precision,
                    "zero_stage": self.zero_stage,
                    "masters": {names[p]: t.cpu() for p, t in masters.items()},
                    "optimizer": {names[p]: {k: (v.cpu() if torch.is_tensor(v) else v)
                                             for k, v in st.items()} for p, st in optim.items()},
                    "extras": extras}, path)

    def load_full_state_file(self, path: Path, module_state: dict[str, Tensor] | None = None) -> None:
        """Continue from a FULL_STATE_FILE (and the module's other tensors, such as normalisation
        statistics, from `module_state`) on whatever number of ranks and ZeRO stage this engine
        has. Every rank reads the file. Raises ValueError when it does not fit the model."""
        data = torch.load(path, map_location="cpu", weights_only=True)
        if data.get("format") != FULL_STATE_FORMAT:
            raise ValueError(f"{path} is not a {FULL_STATE_FORMAT} file")
        params = dict(self.model.named_parameters())
        if module_state is not None:
            if self.zero_stage == 3:
                with self._deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0):
                    self.model.load_state_dict(module_state)
            else:
                self.model.load_state_dict(module_state)
        masters, optim = {}, {}
        for name, t in data["masters"].items():
            p = params.get(name)
            if p is None or tuple(getattr(p, "ds_shape", p.shape)) != tuple(t.shape):
                raise ValueError(f"{path}: parameter {name} does not fit the model")
            masters[p] = t.to(p.device)
        for name, st in data["optimizer"].items():
            p = params[name]
            optim[p] = {k: (v.to(p.device) if torch.is_tensor(v) else v) for k, v in st.items()}
        self.load_full_state(masters, optim, data.get("extras"))

    def load_checkpoint(self, load_dir: str, tag: str) -> None:
        """Load DeepSpeed's checkpoint written by the same number of ranks and ZeRO stage."""
        path, _ = self.engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {load_dir}/{tag}")
