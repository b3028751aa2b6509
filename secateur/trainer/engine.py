"""Process group and DeepSpeed engine around any nn.Module, rebuilt when the model shrinks.

DeepSpeed gets a plain torch optimizer (AdamW/Adam/SGD), so no DeepSpeed optimizer op is compiled.
A pruning event tears the engine down, lets the surgery shrink the model and a torch optimizer
holding the *full* per-parameter state, and initialises a new engine with that state:
- ZeRO 0: the engine's optimizer is the torch optimizer itself; the surgery slices it in place.
- ZeRO 1/2: the state lives in DeepSpeed's flat fp32 partitions. It is gathered per parameter
  (deepspeed.utils.safe_get_full_optimizer_state), sliced by the surgery, and written back into
  the new engine's partitions (safe_set_full_optimizer_state), step count included.
"""
from __future__ import annotations

import os
import socket
import warnings
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist
from torch import nn

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


def init_distributed(local_rank: int | None = None) -> DistInfo:
    """Join the process group set up by torchrun / the deepspeed launcher (RANK, WORLD_SIZE,
    MASTER_ADDR in the environment), or create a 1-rank group for a plain single process.

    CUDA ranks use NCCL, CPU ranks gloo. `local_rank` is the launcher's --local_rank, if given.
    """
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
        dist.init_process_group(backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), lr, device, backend)


def shutdown_distributed() -> None:
    """Every entry point ends here: a barrier, then the process group is destroyed."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        destroy_process_group()


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


def deepspeed_config(cfg: Config, world_size: int, num_params: int | None = None) -> dict[str, Any]:
    """The DeepSpeed JSON config for this run (fp32, torch optimizer, quiet logging).

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
    out.update(ds.extra)
    return out


def _quiet_deepspeed() -> None:
    import logging

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*")
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


class Engine:
    """A DeepSpeed engine that can be rebuilt around a model whose layers changed shape.

    model: the bare nn.Module (its parameters keep their identity across rebuilds).
    make_opt: builds a fresh torch optimizer over the model (same param-group layout every time).
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
        self.engine = self._initialize(make_opt(model))

    def _initialize(self, optimizer: torch.optim.Optimizer):
        engine, *_ = self._deepspeed.initialize(model=self.model, optimizer=optimizer,
                                                config=self.ds_config)
        return engine

    @property
    def param_groups(self) -> list[dict]:
        """The optimizer's param groups (set `lr` here)."""
        return self.engine.optimizer.param_groups

    # ---- optimizer state, gathered to whole parameters -------------------------------------
    def _zero_flat_state(self) -> tuple[list[str], dict[str, Any]]:
        """(per-element state keys, scalar state entries) of the ZeRO partitions' optimizer."""
        zopt = self.engine.optimizer
        flat = zopt.single_partition_of_fp32_groups[0]
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
        """Optimizer state per model parameter, whole tensors shaped like the parameter.

        Collective under ZeRO 1/2 (every rank must call it). Parameters without state (no step
        taken yet) are left out.
        """
        if self.zero_stage == 0:
            opt = self.engine.optimizer
            return {p: dict(opt.state[p]) for g in opt.param_groups for p in g["params"]
                    if p in opt.state and opt.state[p]}
        from deepspeed.utils import safe_get_full_optimizer_state

        per_elem, scalars = self._zero_flat_state()
        if not per_elem:
            return {}
        self._relink_state_views()
        out = {}
        for p in self.model.parameters():
            if p.requires_grad:
                out[p] = {k: safe_get_full_optimizer_state(p, k).clone() for k in per_elem}
                out[p].update({k: (v.clone() if torch.is_tensor(v) else v) for k, v in scalars.items()})
        return out

    def _load_full_optimizer_state(self, full: dict[nn.Parameter, dict[str, Any]]) -> None:
        """Write whole-parameter optimizer state into the (new) ZeRO 1/2 partitions."""
        from deepspeed.utils import safe_set_full_optimizer_state

        if not full:
            return
        zopt = self.engine.optimizer
        sample = next(iter(full.values()))
        per_elem = [k for k, v in sample.items() if torch.is_tensor(v) and v.dim() > 0]
        scalars = {k: v for k, v in sample.items() if k not in per_elem}
        # torch optimizers create state lazily at the first step; create it now on the flat
        # partitions, link DeepSpeed's per-parameter views into it, then fill it per parameter.
        for flat in zopt.single_partition_of_fp32_groups:
            st = {k: torch.zeros_like(flat) for k in per_elem}
            st.update({k: (v.clone() if torch.is_tensor(v) else v) for k, v in scalars.items()})
            zopt.optimizer.state[flat] = st
        self._relink_state_views()
        for p in self.model.parameters():
            if p in full:
                for k in per_elem:
                    safe_set_full_optimizer_state(p, full[p][k], k)

    # ---- rebuild ---------------------------------------------------------------------------
    def rebuild_around(self, surgery: Callable[[torch.optim.Optimizer], T]) -> T:
        """Tear the engine down, run `surgery(optimizer)` on the bare model and a torch optimizer
        that holds the full per-parameter state, then build a new engine carrying that state.

        Collective: every rank calls it with a surgery that makes the same decisions.
        Returns what `surgery` returns.
        """
        if self.zero_stage == 0:
            opt = self.engine.optimizer            # the torch optimizer itself
            self.engine.destroy()
            result = surgery(opt)
            self.engine = self._initialize(opt)
            return result
        full = self.full_optimizer_state()
        self.engine.destroy()
        for p in self.model.parameters():
            # parameters are views into DeepSpeed's flat buffer: give each its own storage
            p.data = p.data.clone()
            p.grad = None
        shadow = self.make_opt(self.model)
        for p, st in full.items():
            shadow.state[p] = st
        result = surgery(shadow)
        self.engine = self._initialize(self.make_opt(self.model))
        self._load_full_optimizer_state({p: shadow.state[p] for p in shadow.state})
        return result

    def destroy(self) -> None:
        self.engine.destroy()

    # ---- checkpoints -----------------------------------------------------------------------
    def save_checkpoint(self, save_dir: str, tag: str) -> None:
        """DeepSpeed's own checkpoint (model + optimizer, ZeRO partitions per rank). Collective."""
        self.engine.save_checkpoint(save_dir, tag=tag, save_latest=False)

    def load_checkpoint(self, load_dir: str, tag: str) -> None:
        path, _ = self.engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {load_dir}/{tag}")
