"""The training loop: pruning events inside DeepSpeed training, optimizer-state carry-over,
atomic checkpoints, logs. Tiny MLPs on sklearn digits, single process (1-rank gloo group)."""
import copy
import math
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from secateur.trainer import checkpoint as ckpt
from secateur.trainer.config import LRScheduleConfig, parse_config
from secateur.trainer.engine import init_distributed, shutdown_distributed
from secateur.trainer.logs import read_events, read_metrics
from secateur.trainer.loop import Trainer
from secateur.trainer.setup import lr_at

TINY = {
    "seed": 0,
    "model": {"name": "MLP", "args": {"hidden": [32, 24]}},
    "data": {"dataset": "digits", "batch_size": 16, "eval_batch_size": 128},
    "optimizer": {"name": "adamw", "lr": 3.0e-3, "weight_decay": 1.0e-3},
    "lr_schedule": {"warmup_steps": 5, "min_lr": 1.0e-4},
    "pruning": {"criterion": "activation", "rule": {"kind": "ratio", "ratio": 0.25},
                "schedule": {"kind": "iterative", "start": 10, "end": 30, "every": 10}},
    "train": {"max_steps": 40, "eval_interval": 20, "checkpoint_interval": 15, "progress": False,
              "deterministic": True, "threads": 1},
    "deepspeed": {"zero_stage": 0},
}


def tiny_config(**sections) -> dict:
    """TINY with some sections' keys replaced, e.g. tiny_config(train={"max_steps": 5})."""
    cfg = copy.deepcopy(TINY)
    for name, update in sections.items():
        if update is None or not isinstance(cfg.get(name), dict):
            cfg[name] = update
        else:
            cfg[name].update(update)
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_in_process(cfg: dict, run_dir: Path, patch=None):
    """Train `cfg` into run_dir in this process; `patch(trainer)` may wrap methods first.
    Returns the Trainer (engine closed, model still usable)."""
    info = init_distributed()
    try:
        tr = Trainer(parse_config(cfg), run_dir, info)
        if patch is not None:
            patch(tr)
        tr.train()
        tr.close()
    finally:
        shutdown_distributed()
    return tr


def test_lr_schedule_is_linear_warmup_then_cosine():
    s = LRScheduleConfig(warmup_steps=10, min_lr=0.1)
    assert lr_at(0, 1.0, s, 110) == pytest.approx(0.1)
    assert lr_at(9, 1.0, s, 110) == pytest.approx(1.0)
    assert lr_at(10, 1.0, s, 110) == pytest.approx(1.0)
    assert lr_at(60, 1.0, s, 110) == pytest.approx(0.1 + 0.9 * 0.5)          # half-way: cos = 0
    assert lr_at(35, 1.0, s, 110) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
    assert lr_at(110, 1.0, s, 110) == pytest.approx(0.1)


def test_training_shrinks_the_model_and_logs_every_step_and_event(tmp_path):
    run = tmp_path / "run"
    tr = run_in_process(tiny_config(), run)
    rows, events = read_metrics(run), read_events(run)
    assert [r["step"] for r in rows] == list(range(1, 41))
    prunes = [e for e in events if e["kind"] == "prune"]
    assert [e["step"] for e in prunes] == [10, 20, 30]
    for e in prunes:
        # every group loses floor(0.25 * width) units; params logged before/after the event
        assert all(a == b - int(0.25 * b) for _, b, a in e["groups"])
        assert rows[e["step"]]["params"] == e["params_after"] < e["params_before"]
    n_params = sum(p.numel() for p in tr.model.parameters())
    assert rows[-1]["params"] == n_params == prunes[-1]["params_after"]
    assert [r["step"] for r in rows if r["eval_acc"] is not None] == [20, 40]
    assert ckpt.latest(run).name == "step_00000040"
    # the pruned checkpoint loads from the run folder alone, with the pruned shapes
    model, meta = ckpt.load_model(ckpt.latest(run))
    assert meta["spec"] == tr.model.spec()
    for (n, a), b in zip(model.state_dict().items(), tr.model.state_dict().values()):
        assert torch.equal(a, b), n


def _zero_moments(engine) -> dict:
    """Per-parameter Adam state read straight out of DeepSpeed's flat ZeRO partitions (1 rank)."""
    zopt, out = engine.optimizer, {}
    for i, flat in enumerate(zopt.single_partition_of_fp32_groups):
        st = zopt.optimizer.state[flat]
        for p in zopt.bit16_groups[i]:
            lp, hp = p._hp_mapping.lp_fragment_address, p._hp_mapping.hp_fragment_address
            assert lp.start == 0 and lp.numel == p.numel()
            out[p] = {k: st[k].narrow(0, hp.start, hp.numel).view_as(p).clone()
                      for k in ("exp_avg", "exp_avg_sq")}
            out[p]["step"] = float(st["step"])
    return out


def _moments(tr) -> dict:
    engine = tr.engine.engine
    if tr.cfg.deepspeed.zero_stage == 0:
        st = engine.optimizer.state
        return {p: {"exp_avg": st[p]["exp_avg"].clone(), "exp_avg_sq": st[p]["exp_avg_sq"].clone(),
                    "step": float(st[p]["step"])} for p in tr.model.parameters()}
    return _zero_moments(engine)


def _kept(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Indices of `before` whose values reappear, in order, as `after` (distinct float values)."""
    idx = torch.tensor([int((before == v).nonzero()[0]) for v in after])
    assert torch.equal(before[idx], after)
    return idx


@pytest.mark.parametrize("stage", [0, 2])
def test_adam_moments_of_kept_units_survive_a_pruning_event(stage, tmp_path):
    snapshots = []

    def patch(tr):
        rebuild = tr.engine.rebuild_around

        def spy(surgery):
            linears = [m for m in tr.model.modules() if isinstance(m, nn.Linear)]
            before = ([(m.weight.detach().clone(), m.bias.detach().clone()) for m in linears],
                      {k: v for k, v in _moments(tr).items()})
            result = rebuild(surgery)
            after = ([(m.weight.detach().clone(), m.bias.detach().clone()) for m in linears],
                     _moments(tr))
            snapshots.append((linears, before, after))
            return result
        tr.engine.rebuild_around = spy

    cfg = tiny_config(deepspeed={"zero_stage": stage}, train={"max_steps": 21, "checkpoint_interval": None})
    run_in_process(cfg, tmp_path / "run", patch)
    assert len(snapshots) == 2
    for linears, (w_before, m_before), (w_after, m_after) in snapshots:
        keep_in = torch.arange(w_before[0][0].shape[1])
        for m, (wb, bb), (wa, ba) in zip(linears, w_before, w_after):
            keep_out = _kept(bb, ba)             # surviving units, found from the biases
            assert torch.equal(wa, wb[keep_out][:, keep_in])
            mb, ma = m_before[m.weight], m_after[m.weight]
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(ma[key], mb[key][keep_out][:, keep_in]), key
                assert torch.equal(m_after[m.bias][key], m_before[m.bias][key][keep_out]), key
            assert ma["step"] == mb["step"] == m_after[m.bias]["step"] > 0
            keep_in = keep_out
        assert any(len(wa) < len(wb) for (wb, _), (wa, _) in zip(w_before, w_after))


def test_crash_while_writing_a_checkpoint_leaves_the_previous_one_loadable(tmp_path, monkeypatch):
    run = tmp_path / "run"
    calls = {"n": 0}
    real_fsync_tree = ckpt.fsync_tree

    def crash_on_second_checkpoint(root):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("simulated crash while writing the checkpoint")
        real_fsync_tree(root)

    monkeypatch.setattr(ckpt, "fsync_tree", crash_on_second_checkpoint)
    with pytest.raises(OSError, match="simulated crash"):
        run_in_process(tiny_config(pruning=None), run)
    # the first checkpoint (step 15) is intact and still current; the half-written one is aside
    assert ckpt.latest(run).name == "step_00000015"
    assert (run / "checkpoints" / ".tmp-step_00000030" / "deepspeed").is_dir()
    model, meta = ckpt.load_model(ckpt.latest(run))
    assert meta["step"] == 15 and sum(p.numel() for p in model.parameters()) > 0

    monkeypatch.setattr(ckpt, "fsync_tree", real_fsync_tree)
    from secateur.cli import main
    assert main(["resume", str(run)]) == 0
    assert ckpt.latest(run).name == "step_00000040"
    assert not any(p.name.startswith(".tmp-") for p in (run / "checkpoints").iterdir())
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 41))


def test_a_preflight_model_is_used_once_and_the_run_is_the_one_the_trainer_would_build(tmp_path):
    """`secateur train` builds the model in its preflight and hands it over: the Trainer must not
    build another, and weights, generator states and the trained result equal a Trainer that
    built the model itself."""
    import random

    import numpy as np

    from secateur.trainer import setup
    from secateur.trainer.loop import weights_digest
    cfg = parse_config(tiny_config(train={"max_steps": 12}))
    info = init_distributed()
    try:
        own = Trainer(cfg, tmp_path / "own", info)
        own_rng = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
        own_start = weights_digest(own.model)
        own.train()
        own.close()
        prepared = setup.preflight(cfg)
        random.seed(123)                          # anything drawn in between must not matter
        torch.manual_seed(123)
        builds = []
        real = setup.model_from_config
        import secateur.trainer.loop as loop
        loop.model_from_config = lambda *a, **k: builds.append(1) or real(*a, **k)
        try:
            handed = Trainer(cfg, tmp_path / "handed", info, prepared=prepared)
        finally:
            loop.model_from_config = real
        assert builds == [] and handed.model is prepared.model
        assert torch.equal(torch.get_rng_state(), own_rng[0])
        assert np.array_equal(np.random.get_state()[1], own_rng[1]) and random.getstate() == own_rng[2]
        assert weights_digest(handed.model) == own_start
        handed.train()
        handed.close()
        assert weights_digest(handed.model) == weights_digest(own.model)
        with pytest.raises(ValueError, match="resumed"):
            Trainer(cfg, tmp_path / "handed", info, resume=True, prepared=prepared)
    finally:
        shutdown_distributed()
    assert [r["loss"] for r in read_metrics(tmp_path / "handed")] == \
        [r["loss"] for r in read_metrics(tmp_path / "own")]
