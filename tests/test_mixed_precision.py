"""bf16 / fp16 training with pruning events (DeepSpeed on CPU, one rank): an event cuts the fp32
master weights and the optimizer moments exactly like the units it removes (read straight out of
DeepSpeed's optimizers and compared with a hand-sliced copy taken before the event), the model's
low-precision weights are the cut masters rounded, the fp16 loss scale carries over, and a run
that crashes and resumes ends bit-identical to the uninterrupted one."""
import pytest
import torch
from torch import nn

from secateur.trainer import checkpoint as ckpt
from secateur.trainer.engine import FULL_STATE_FILE
from secateur.trainer.logs import read_metrics
from test_trainer import run_in_process, tiny_config


def _cpu_fp16() -> bool:
    try:
        return torch.cuda.is_available() or bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return False


def _fp16_refused_here(precision: str, stage: int) -> bool:
    """On a machine without fp16 (no GPU, a CPU without fp16 support) the fp16 run itself cannot be
    checked; what must hold there is that the config is refused in one line before any work."""
    if precision != "fp16" or _cpu_fp16():
        return False
    from secateur.trainer.config import ConfigError, check_config, parse_config
    cfg = parse_config(tiny_config(deepspeed=_precision(precision, stage)))
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU or a CPU with fp16"):
        check_config(cfg)
    return True


def _precision(precision: str, stage: int) -> dict:
    ds = {"zero_stage": stage, "precision": precision}
    if precision == "fp16":   # a loss scale that moves during the run
        ds["extra"] = {"fp16": {"enabled": True, "initial_scale_power": 20, "loss_scale_window": 4,
                                "hysteresis": 1}}
    return ds


def _state(engine) -> dict:
    """{parameter: (fp32 master, exp_avg, exp_avg_sq, step)} read from DeepSpeed's optimizer
    itself: FP16_UnfusedOptimizer's fp32 copies (ZeRO 0) or the flat ZeRO partitions (1 rank)."""
    opt, out = engine.optimizer, {}
    if hasattr(opt, "fp32_groups"):
        for lps, hps in zip(opt.fp16_groups, opt.fp32_groups):
            for lp, hp in zip(lps, hps):
                st = opt.optimizer.state[hp]
                out[lp] = (hp.clone(), st["exp_avg"].clone(), st["exp_avg_sq"].clone(), float(st["step"]))
        return out
    for i, flat in enumerate(opt.single_partition_of_fp32_groups):
        st = opt.optimizer.state[flat]
        for p in opt.bit16_groups[i]:
            hp = p._hp_mapping.hp_fragment_address
            assert p._hp_mapping.lp_fragment_address.numel == p.numel()

            def part(t, hp=hp, p=p):
                return t.narrow(0, hp.start, hp.numel).view(p.shape).clone()
            out[p] = (part(flat), part(st["exp_avg"]), part(st["exp_avg_sq"]), float(st["step"]))
    return out


def _scale(engine) -> float:
    opt = engine.optimizer
    return (getattr(opt, "loss_scaler", None) or opt.loss_scale_config).cur_scale


@pytest.mark.parametrize("precision,stage", [("bf16", 0), ("bf16", 1), ("bf16", 2),
                                             ("fp16", 0), ("fp16", 2)])
def test_an_event_cuts_fp32_masters_and_moments_like_the_units(precision, stage, tmp_path):
    if _fp16_refused_here(precision, stage):
        return
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    snapshots = []

    def patch(tr):
        rebuild = tr.engine.rebuild_around

        def spy(surgery):
            linears = [m for m in tr.model.modules() if isinstance(m, nn.Linear)]
            before = (_state(tr.engine.engine), _scale(tr.engine.engine))
            result = rebuild(surgery)
            weights = {m: m.weight.detach().clone() for m in linears}
            snapshots.append((linears, before, (_state(tr.engine.engine), _scale(tr.engine.engine)),
                              weights))
            return result
        tr.engine.rebuild_around = spy

    cfg = tiny_config(deepspeed=_precision(precision, stage),
                      train={"max_steps": 21, "checkpoint_interval": None})
    tr = run_in_process(cfg, tmp_path / "run", patch)
    assert len(snapshots) == 2
    rounded_away = 0
    for linears, (before, scale_before), (after, scale_after), weights in snapshots:
        assert scale_after == scale_before
        keep_in = torch.arange(before[linears[0].weight][0].shape[1])
        for m in linears:
            wb, wa = before[m.weight], after[m.weight]
            bb, ba = before[m.bias], after[m.bias]
            # the surviving units, found from the biases' fp32 masters (distinct values)
            keep_out = torch.tensor([int((bb[0] == v).nonzero()[0]) for v in ba[0]])
            for i in range(3):       # master, exp_avg, exp_avg_sq: exactly the hand-cut copy
                assert torch.equal(wa[i], wb[i][keep_out][:, keep_in]), i
                assert torch.equal(ba[i], bb[i][keep_out]), i
            assert wa[3] == wb[3] == ba[3] > 0            # Adam's step count carried
            # the model's own weights are the cut masters rounded to bf16/fp16
            assert weights[m].dtype == dtype and torch.equal(weights[m], wa[0].to(dtype))
            rounded_away += int((wa[0] != wa[0].to(dtype).float()).sum())
            keep_in = keep_out
    assert rounded_away > 0          # the masters hold more than the low-precision weights
    if precision == "fp16":
        # the scale moved away from its initial value (a new engine would start there again)
        assert all(before[1] != 2.0**20 for _, before, _, _ in snapshots)
    assert next(tr.model.parameters()).dtype == dtype


def _crash_after(steps: int):
    def patch(tr):
        real, calls = tr.train_step, {"n": 0}

        def step():
            calls["n"] += 1
            if calls["n"] > steps:
                raise RuntimeError("simulated crash")
            return real()
        tr.train_step = step
    return patch


@pytest.mark.parametrize("precision,stage", [("bf16", 0), ("bf16", 2), ("fp16", 2), ("bf16", 3)])
def test_mixed_precision_run_resumes_bit_identically(precision, stage, tmp_path):
    if _fp16_refused_here(precision, stage):
        return
    cfg = tiny_config(deepspeed=_precision(precision, stage))
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    run_in_process(cfg, full)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_in_process(cfg, crashed, _crash_after(18))     # after the step-15 checkpoint
    assert ckpt.latest(crashed).name == "step_00000015"
    from secateur.cli import main
    assert main(["resume", str(crashed)]) == 0

    a, b = ckpt.latest(full), ckpt.latest(crashed)
    assert a.name == b.name == "step_00000040"
    wa, wb = ckpt.model_state_dict(a), ckpt.model_state_dict(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(t.dtype == (torch.bfloat16 if precision == "bf16" else torch.float16) for t in wa.values())
    sa, sb = (torch.load(c / FULL_STATE_FILE, weights_only=True) for c in (a, b))
    for n, t in sa["masters"].items():
        assert t.dtype == torch.float32 and torch.equal(t, sb["masters"][n]), n
    for n, st in sa["optimizer"].items():
        for k, v in st.items():
            assert torch.equal(v, sb["optimizer"][n][k]) if torch.is_tensor(v) else v == sb["optimizer"][n][k]
    assert sa["extras"] == sb["extras"]              # loss scale and engine counters
    la, lb = read_metrics(full), read_metrics(crashed)
    assert [r["step"] for r in lb] == list(range(1, 41))
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]
    # it learns: above chance (10 classes) and a lower loss than at the start
    assert la[-1]["eval_acc"] > 0.2 and la[-1]["loss"] < la[0]["loss"]


def test_an_old_engine_collected_after_a_rebuild_leaves_the_new_one_intact():
    # DeepSpeedEngine.__del__ destroys again, and a ZeRO optimizer's destroy unlinks its
    # parameters, which by then belong to the new engine: their masters would read as zeros
    import gc

    from secateur.trainer.config import parse_config
    from secateur.trainer.engine import (Engine, deepspeed_config, init_distributed, make_optimizer,
                                         shutdown_distributed)

    cfg = parse_config(tiny_config(deepspeed=_precision("bf16", 2)))
    info = init_distributed()
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
        engine = Engine(model, lambda m: make_optimizer(m, cfg.optimizer),
                        deepspeed_config(cfg, info.world_size, 100))
        loss = engine.engine(torch.randn(cfg.data.batch_size, 8)).float().square().mean()
        engine.engine.backward(loss)
        engine.engine.step()
        del loss                      # its graph would keep the old engine alive
        before = engine.full_master_params()
        engine.rebuild_around(lambda optimizer: None)
        gc.collect()
        after = engine.full_master_params()
        assert all(torch.equal(before[p], after[p]) and after[p].abs().sum() > 0 for p in before)
        engine.destroy()
    finally:
        shutdown_distributed()
