"""A run continued on another number of ranks (2 -> 1, 1 -> 2; torchrun, gloo): right after the
restore every rank holds the saved model, fp32 masters and optimizer moments bit for bit (oracle:
the checkpoint's whole-tensor state file), the pruner's statistics summed into rank 0, the global
data position and the schedule position; training then goes on through further pruning events,
with the ranks agreeing after each one.

Run as `python tests/test_elastic.py RUN MAX_STEPS` (under torchrun) this file is the resumed run.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# run as a script (the resumed ranks), this checkout's package and test helpers come first
sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

from secateur.trainer import checkpoint as ckpt            # noqa: E402
from secateur.trainer.engine import FULL_STATE_FILE         # noqa: E402
from secateur.trainer.logs import read_events, read_metrics  # noqa: E402
from test_trainer import tiny_config, write_config          # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(nproc: int, *args: str) -> subprocess.CompletedProcess:
    """`python ARGS...` on `nproc` ranks (torchrun; a plain process for one rank)."""
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    proc = subprocess.run([*cmd, *args], env=ENV, capture_output=True, text=True, timeout=300)
    # a plain string: pytest prints it whole (a tuple's repr is cut to one line)
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-2000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    return proc


def _same(a, b) -> bool:
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def _gathered_equal(tr, module: dict) -> bool:
    """Whether the trainer's whole weights (gathered under ZeRO-3) equal `module`'s."""
    with tr.engine.gathered():
        return all(_same(t, module[n]) for n, t in tr.model.state_dict().items())


def resumed_run(run: Path, max_steps: int) -> None:
    """The resumed run on this rank: check the restored state, train on, write the checks."""
    from secateur.trainer.config import parse_config, read_yaml
    from secateur.trainer.engine import init_distributed, shutdown_distributed
    from secateur.trainer.loop import Trainer

    raw = read_yaml(run / "config.yaml")
    raw["train"]["max_steps"] = max_steps
    info = init_distributed()
    tr = Trainer(parse_config(raw), run, info, resume=True)
    where = tr.ckpt_path
    meta = ckpt.read_meta(where)
    saved = torch.load(where / FULL_STATE_FILE, weights_only=True)
    params = dict(tr.model.named_parameters())
    masters, optim = tr.engine.full_master_params(), tr.engine.full_optimizer_state()
    old = [ckpt.read_rank_state(where, r) for r in range(meta["world_size"])]
    if len(old) == info.world_size:     # the same ranks: each its own statistics back
        stats = old[info.rank]["pruner"]["stats"]
    else:                               # regrouped: summed into rank 0 (the event sums them anyway)
        stats = {k: (sum(o["pruner"]["stats"][k] for o in old) if info.rank == 0
                     else torch.zeros_like(v)) for k, v in old[0]["pruner"]["stats"].items()}
    module = ckpt.model_state_dict(where)
    checks = {
        "world_sizes": [meta["world_size"], info.world_size],
        "masters": sorted(saved["masters"]) == sorted(n for n, p in params.items())
        and all(_same(masters[params[n]], t) for n, t in saved["masters"].items()),
        "moments": sorted(saved["optimizer"]) == sorted(params)
        and all(set(st) == set(optim[params[n]]) and all(_same(optim[params[n]][k], v) for k, v in st.items())
                for n, st in saved["optimizer"].items()),
        "weights": _gathered_equal(tr, module),
        "pruner_stats": all(_same(tr.pruner.stats()[k], v) for k, v in stats.items()),
        "schedule": (tr.pruner.events_done, tr.pruner.step) == (old[0]["pruner"]["events_done"],
                                                                old[0]["pruner"]["step"]),
        "data": tr.stream.state_dict() == old[0]["data"],
        "step": tr.step == meta["step"],
        "engine_steps": tr.engine.engine.global_steps == saved["extras"]["counters"]["global_steps"],
    }
    tr.train()
    tr.close()
    shutdown_distributed()
    (run / f"resumed_rank{info.rank}.json").write_text(json.dumps(checks))


CFG = tiny_config(
    pruning={"criterion": "activation", "rule": {"kind": "ratio", "ratio": 0.25},
             "schedule": {"kind": "iterative", "start": 10, "end": 30, "every": 10}},
    train={"max_steps": 25, "checkpoint_interval": None, "eval_interval": 25})


@pytest.mark.parametrize("saved_ranks,ranks,stage,precision",
                         [(2, 1, 2, "bf16"), (1, 2, 1, "fp32"), (2, 1, 3, "fp32")])
def test_run_continues_on_another_number_of_ranks(saved_ranks, ranks, stage, precision, tmp_path):
    cfg = {**CFG, "deepspeed": {"zero_stage": stage, "precision": precision}}
    config, run = write_config(tmp_path / "cfg.yaml", cfg), tmp_path / "run"
    _launch(saved_ranks, "-m", "secateur", "train", "--config", str(config), "--out", str(run))
    assert ckpt.read_meta(ckpt.latest(run))["world_size"] == saved_ranks
    _launch(ranks, __file__, str(run), "40")

    for r in range(ranks):
        checks = json.loads((run / f"resumed_rank{r}.json").read_text())
        assert checks.pop("world_sizes") == [saved_ranks, ranks]
        assert checks == {k: True for k in checks}, (r, checks)
    # one log, each step once; the event at step 30 happened on the new ranks, which agree
    assert [row["step"] for row in read_metrics(run)] == list(range(1, 41))
    assert [e["step"] for e in read_events(run) if e["kind"] == "prune"] == [10, 20, 30]
    entries = [[json.loads(line) for line in (run / "ranks" / f"rank{r}.jsonl").read_text().splitlines()
                if json.loads(line)["step"] == 30] for r in range(ranks)]
    assert all(len(e) == 1 for e in entries) and all(e == entries[0] for e in entries)
    final = ckpt.latest(run)
    assert ckpt.read_meta(final)["world_size"] == ranks and ckpt.read_meta(final)["step"] == 40
    assert sorted(p.name for p in final.glob("rank*.pt")) == [f"rank{r}.pt" for r in range(ranks)]


def _named(engine, model):
    """({name: whole fp32 master}, {name: whole optimizer state}) of an Engine (collective)."""
    names = {p: n for n, p in model.named_parameters()}
    return ({names[p]: t for p, t in engine.full_master_params().items()},
            {names[p]: st for p, st in engine.full_optimizer_state().items()})


def zero3_run(out: Path) -> None:
    """ZeRO-3 through the Engine on this rank: train with the real pruner (events at steps 10 and
    20, each cut compared with a hand cut of the whole state before it), save at step 25, train to
    30; then a fresh engine around the saved architecture loads the checkpoint and trains 25 -> 30
    again; finally a ZeRO-2 engine loads the whole-tensor state file of the ZeRO-3 checkpoint."""
    import hashlib

    import torch.distributed as dist
    from torch import nn

    from secateur.build import forward
    from secateur.data import ShardedOrder
    from secateur.models import build_model
    from secateur.trainer.config import parse_config
    from secateur.trainer.engine import (Engine, deepspeed_config, init_distributed, make_optimizer,
                                         shutdown_distributed)
    from secateur.trainer.setup import (dataset_from_config, example_batch, example_input, loss_fn,
                                        model_from_config, pruner_from_config)

    info = init_distributed()
    # ratio 0.3 gives odd widths: the last rank's ZeRO-3 partitions are padded
    cfg = parse_config(tiny_config(pruning={"criterion": "l2", "rule": {"kind": "ratio", "ratio": 0.3},
                                            "schedule": {"kind": "iterative", "start": 10, "end": 20,
                                                         "every": 10}}))
    data = dataset_from_config(cfg)
    torch.manual_seed(0)
    model = model_from_config(cfg, data)
    pruner = pruner_from_config(cfg.pruning, model, example_input(model, example_batch(data)))

    def engine_for(m: nn.Module, stage: int) -> Engine:
        ds = deepspeed_config(cfg, info.world_size)
        ds["zero_optimization"] = {"stage": stage}
        return Engine(m, lambda mm: make_optimizer(mm, cfg.optimizer), ds)

    def batches(start: int, stop: int):
        order = ShardedOrder(len(data.train), cfg.data.batch_size, info.rank, info.world_size, seed=1)
        order.load_state_dict({"epoch": 0, "cursor": start * cfg.data.batch_size * info.world_size})
        for _ in range(start, stop):
            yield data.train.batch(order.next())

    def train(engine: Engine, start: int, stop: int, events: bool = False) -> list[bool]:
        cuts = []
        for step, (x, y) in zip(range(start + 1, stop + 1), batches(start, stop)):
            loss = loss_fn(forward(engine.engine, x), y)
            engine.engine.backward(loss)
            engine.engine.step()
            if events and pruner.is_event(step):
                before = _named(engine, model)
                engine.rebuild_around(pruner.prune)
                after = _named(engine, model)
                cuts.append(_cut_matches(model, before, after))
        return cuts

    def digest(engine: Engine, m: nn.Module) -> str:
        masters, optim = _named(engine, m)
        h = hashlib.sha256()
        for n in sorted(masters):
            h.update(masters[n].numpy().tobytes())
            for k in ("exp_avg", "exp_avg_sq"):
                h.update(optim[n][k].numpy().tobytes())
        with engine.gathered():
            for t in m.state_dict().values():
                h.update(t.detach().clone().numpy().tobytes())
        return h.hexdigest()

    engine = engine_for(model, 3)
    cuts = train(engine, 0, 25, events=True)
    spec = model.spec()
    engine.save_checkpoint(str(out / "ckpt"), "ds")
    train(engine, 25, 30)
    straight = digest(engine, model)
    everyone = [None] * info.world_size
    dist.all_gather_object(everyone, straight)
    engine.destroy()
    whole_after_destroy = all(p.numel() > 0 for p in model.parameters())

    torch.manual_seed(123)                          # other initial weights: all must come from disk
    again = build_model(spec)
    engine = engine_for(again, 3)
    engine.load_checkpoint(str(out / "ckpt"), "ds")
    train(engine, 25, 30)
    resumed = digest(engine, again)
    engine.destroy()

    other = build_model(spec)
    engine = engine_for(other, 2)
    engine.load_full_state_file(out / "ckpt" / FULL_STATE_FILE,
                                ckpt.model_state_dict(out / "ckpt"))
    saved = torch.load(out / "ckpt" / FULL_STATE_FILE, weights_only=True)
    masters, optim = _named(engine, other)
    on_stage2 = (all(torch.equal(masters[n], t) for n, t in saved["masters"].items()) and
                 all(torch.equal(optim[n][k], v) for n, st in saved["optimizer"].items()
                     for k, v in st.items() if torch.is_tensor(v)))
    engine.destroy()
    shutdown_distributed()
    (out / f"zero3_rank{info.rank}.json").write_text(json.dumps({
        "cuts": cuts, "ranks_agree": len(set(everyone)) == 1, "resume_exact": resumed == straight,
        "whole_after_destroy": whole_after_destroy, "state_file_on_stage2": on_stage2,
        "widths": [m.out_features for m in model.modules() if isinstance(m, nn.Linear)]}))


def _cut_matches(model, before, after) -> bool:
    """Every Linear's master and Adam moments after the event equal the hand cut of the state
    before it (surviving units found from the biases' masters, distinct values)."""
    from torch import nn

    ok, keep_in = True, None
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        w, b = f"{name}.weight", f"{name}.bias"
        keep_out = torch.tensor([int((before[0][b] == v).nonzero()[0]) for v in after[0][b]])
        cols = keep_in if keep_in is not None else torch.arange(before[0][w].shape[1])
        ok &= torch.equal(after[0][w], before[0][w][keep_out][:, cols])
        ok &= torch.equal(after[0][b], before[0][b][keep_out])
        for k in ("exp_avg", "exp_avg_sq"):
            ok &= torch.equal(after[1][w][k], before[1][w][k][keep_out][:, cols])
            ok &= torch.equal(after[1][b][k], before[1][b][k][keep_out])
        keep_in = keep_out
    return bool(ok)


def test_zero3_events_cut_the_whole_state_ranks_agree_and_resume_is_exact(tmp_path):
    _launch(2, __file__, "zero3", str(tmp_path))
    results = [json.loads((tmp_path / f"zero3_rank{r}.json").read_text()) for r in range(2)]
    assert results[0] == results[1]
    r = results[0]
    assert r["cuts"] == [True, True]
    assert r["widths"] == [17, 12, 10]               # 32 -> 23 -> 17, 24 -> 17 -> 12, classes
    assert r["ranks_agree"] and r["resume_exact"] and r["whole_after_destroy"]
    assert r["state_file_on_stage2"]


if __name__ == "__main__":
    if sys.argv[1] == "zero3":
        zero3_run(Path(sys.argv[2]))
    else:
        resumed_run(Path(sys.argv[1]), int(sys.argv[2]))
