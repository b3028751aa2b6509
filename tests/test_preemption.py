"""Ending a run early without losing work.

- SIGTERM / SIGINT: the step finishes, a checkpoint is written, one line, exit 128 + N, and
  `secateur resume` ends bit-identical to an uninterrupted run (like SIGKILL in test_resume).
- A signal that reaches one rank of two stops both at the same step.
- A non-finite loss or gradient stops the run (exit 3) keeping the last finite checkpoint, or is
  skipped (update not applied) up to train.skip_nonfinite times; no pruning event on non-finite
  statistics.
- A rank that stops answering (SIGSTOP) ends the job after train.collective_timeout_s.
- A stale torch extension build lock is removed before DeepSpeed starts; a held one is reported.
"""
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from secateur.trainer import checkpoint as ckpt
from secateur.trainer import loop
from secateur.trainer.logs import read_events, read_metrics
from secateur.trainer.loop import EXIT_DIVERGED, RunStopped
from secateur.warmup import check_build_locks
from test_trainer import run_in_process, tiny_config, write_config

CFG = tiny_config(
    pruning={"schedule": {"kind": "iterative", "start": 20, "end": 140, "every": 30}},
    train={"max_steps": 300, "eval_interval": 50, "checkpoint_interval": 25})
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
# rounds of the randomized signal trials (SECATEUR_TRIALS=10 for the counts in RESULTS.md)
TRIALS = int(os.environ.get("SECATEUR_TRIALS", "1"))


def _secateur(*args, env=None, **kw):
    return subprocess.Popen([sys.executable, "-m", "secateur", *args], env=env or ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kw)


def _rows(run) -> int:
    try:
        return max(0, len((run / "metrics.csv").read_text().splitlines()) - 1)
    except FileNotFoundError:
        return 0


def _wait_rows(run, n, procs, timeout=240):
    deadline = time.time() + timeout
    while _rows(run) < n and all(p.poll() is None for p in procs) and time.time() < deadline:
        time.sleep(0.002)


def _own_lines(stderr: str) -> list[str]:
    """stderr without the lines torch and DeepSpeed print on every start."""
    return [ln for ln in stderr.splitlines() if ln.strip() and "No CUDA runtime" not in ln
            and "built successfully" not in ln]


def _same_weights(a_run, b_run):
    a = ckpt.model_state_dict(ckpt.latest(a_run))
    b = ckpt.model_state_dict(ckpt.latest(b_run))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_sigterm_and_sigint_checkpoint_the_step_and_resume_is_bit_identical(tmp_path):
    """Per round (SECATEUR_TRIALS, default 1) one SIGTERM and one SIGINT run, each signalled at a
    random step and resumed; both end as the uninterrupted run."""
    config = write_config(tmp_path / "cfg.yaml", CFG)
    full = tmp_path / "full"
    ref = _secateur("train", "--config", str(config), "--out", str(full))
    rnd = random.Random(os.getpid())
    for trial in range(TRIALS):
        runs = {signal.SIGTERM: tmp_path / f"term{trial}", signal.SIGINT: tmp_path / f"int{trial}"}
        procs = {sig: _secateur("train", "--config", str(config), "--out", str(run))
                 for sig, run in runs.items()}
        ats = {sig: rnd.randint(30, 150) for sig in runs}
        pending, deadline = set(runs), time.time() + 240
        while pending and time.time() < deadline:           # each run signalled at its own step
            for sig in list(pending):
                if _rows(runs[sig]) >= ats[sig] or procs[sig].poll() is not None:
                    procs[sig].send_signal(sig)
                    pending.discard(sig)
            time.sleep(0.002)
        for sig, run in runs.items():
            _, err = procs[sig].communicate(timeout=120)
            assert procs[sig].returncode == 128 + sig, err[-2000:]
            step = _rows(run)
            assert _own_lines(err) == [f"stopped by {sig.name} at step {step}; checkpoint written "
                                       f"(checkpoints/{ckpt.step_name(step)}); continue with: "
                                       f"secateur resume {run}"]
            assert ckpt.latest(run).name == ckpt.step_name(step) and ats[sig] <= step < 300

        resumed = [_secateur("resume", str(run)) for run in runs.values()]   # like test_resume
        for proc in resumed:
            _, err = proc.communicate(timeout=240)
            assert proc.returncode == 0, err[-2000:]
        assert ref.wait(timeout=240) == 0
        for run in runs.values():
            _same_weights(full, run)
            la, lb = read_metrics(full), read_metrics(run)
            assert [r["step"] for r in lb] == list(range(1, 301))
            assert [r["loss"] for r in la] == [r["loss"] for r in lb]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ranks(*args, world=2):
    """One `secateur` process per rank, without a launcher (so each rank's pid is known)."""
    port = str(_free_port())
    return [_secateur(*args, env={**ENV, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world),
                                  "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
            for r in range(world)]


def _end(procs):
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_two_ranks_stop_together_on_one_signal_and_a_stalled_rank_times_out(tmp_path):
    cfg = tiny_config(train={"max_steps": 2000, "eval_interval": 500, "checkpoint_interval": 500})
    config, run = write_config(tmp_path / "cfg.yaml", cfg), tmp_path / "run"
    procs = _ranks("train", "--config", str(config), "--out", str(run))
    try:
        _wait_rows(run, 60, procs)
        procs[1].send_signal(signal.SIGTERM)            # rank 1 only; rank 0 is not told
        errs = [p.communicate(timeout=120)[1] for p in procs]
    finally:
        _end(procs)
    assert [p.returncode for p in procs] == [143, 143], errs[0][-1500:] + errs[1][-1500:]
    step = _rows(run)
    assert _own_lines(errs[0]) == [f"stopped by SIGTERM at step {step}; checkpoint written "
                                   f"(checkpoints/{ckpt.step_name(step)}); continue with: "
                                   f"secateur resume {run}"]
    assert not _own_lines(errs[1])                       # one line for the job, from rank 0
    latest = ckpt.latest(run)
    assert latest.name == ckpt.step_name(step) and ckpt.read_meta(latest)["world_size"] == 2
    assert ckpt.read_rank_state(latest, 0)["step"] == ckpt.read_rank_state(latest, 1)["step"] == step

    # resumed on both ranks; then rank 1 stops answering (SIGSTOP): rank 0 gives up after 5 s
    procs = _ranks("resume", str(run), "--set", "train.collective_timeout_s=5")
    try:
        _wait_rows(run, step + 20, procs)
        assert all(p.poll() is None for p in procs), procs[0].communicate()[1][-2000:]
        procs[1].send_signal(signal.SIGSTOP)
        t0 = time.time()
        _, err = procs[0].communicate(timeout=90)
        waited = time.time() - t0
    finally:
        _end(procs)
    assert procs[0].returncode == loop.EXIT_PEER_LOST, err[-2000:]
    assert waited < 30, f"rank 0 waited {waited:.0f} s"
    lines = _own_lines(err)
    assert len(lines) == 1 and lines[0].startswith("error: rank 0: a collective got no answer from "
                                                   "another rank within 5 s"), err[-2000:]


# ---- divergence (in process) -----------------------------------------------------------------
def _poison_loss(monkeypatch, bad_steps):
    """The training loss is NaN at these (1-based) steps."""
    real, calls = loop.loss_fn, {"n": 0}

    def loss_fn(out, y):
        calls["n"] += 1
        loss = real(out, y)
        return loss * float("nan") if calls["n"] in bad_steps else loss
    monkeypatch.setattr(loop, "loss_fn", loss_fn)


@pytest.mark.parametrize("stage", [0, 3])
def test_a_huge_learning_rate_stops_the_run_and_keeps_the_last_finite_checkpoint(stage, tmp_path, capsys):
    run = tmp_path / "run"
    cfg = tiny_config(optimizer={"name": "adamw", "lr": 1.0e4}, lr_schedule={"warmup_steps": 0},
                      train={"max_steps": 60, "checkpoint_interval": 5}, deepspeed={"zero_stage": stage})
    with pytest.raises(RunStopped) as stop:
        run_in_process(cfg, run)
    assert stop.value.code == EXIT_DIVERGED
    err = capsys.readouterr().err
    step = read_metrics(run)[-1]["step"]
    assert not math.isfinite(read_metrics(run)[-1]["loss"])
    assert f"error: diverged at step {step}: the loss is" in err
    assert all(math.isfinite(r["loss"]) for r in read_metrics(run)[:-1])
    # every checkpoint left holds finite weights; latest is the last one before the bad step
    assert ckpt.latest(run).name == ckpt.step_name((step - 1) // 5 * 5)
    for folder in (run / "checkpoints").glob("step_*"):
        assert all(torch.isfinite(t).all() for t in ckpt.model_state_dict(folder).values())


def test_nonfinite_steps_are_skipped_up_to_the_limit_then_the_run_stops(tmp_path, monkeypatch, capsys):
    _poison_loss(monkeypatch, {7, 12, 18})
    seen = []

    def patch(tr):
        step = tr.train_step

        def spy():
            before = [p.detach().clone() for p in tr.model.parameters()]
            opt_steps = [float(s["step"]) for s in tr.engine.engine.optimizer.state.values()]
            loss = step()
            if tr._step_bad:
                after = [p.detach() for p in tr.model.parameters()]
                assert all(torch.equal(a, b) for a, b in zip(before, after))
                assert opt_steps == [float(s["step"]) for s in tr.engine.engine.optimizer.state.values()]
                seen.append(tr.step + 1)
            return loss
        tr.train_step = spy

    run = tmp_path / "run"
    cfg = tiny_config(pruning=None, train={"max_steps": 30, "checkpoint_interval": 5, "skip_nonfinite": 2})
    with pytest.raises(RunStopped) as stop:
        run_in_process(cfg, run, patch)
    assert stop.value.code == EXIT_DIVERGED and seen == [7, 12, 18]
    err = capsys.readouterr()
    assert "error: diverged at step 18" in err.err
    assert [e["step"] for e in read_events(run) if e["kind"] == "nonfinite_skipped"] == [7, 12]
    assert ckpt.latest(run).name == "step_00000015"
    assert ckpt.read_meta(ckpt.latest(run))["nonfinite_skipped"] == 2


def test_a_nonfinite_gradient_with_a_finite_loss_is_caught_before_the_update(tmp_path, monkeypatch):
    state = {"n": 0}

    def patch(tr):
        first = next(tr.model.parameters())
        real = tr.next_batch

        def next_batch():
            state["n"] += 1
            return real()
        tr.next_batch = next_batch
        first.register_hook(lambda g: g * float("nan") if state["n"] == 4 else g)

    run = tmp_path / "run"
    cfg = tiny_config(pruning=None, train={"max_steps": 10, "checkpoint_interval": None, "skip_nonfinite": 1})
    run_in_process(cfg, run, patch)
    assert [e["step"] for e in read_events(run) if e["kind"] == "nonfinite_skipped"] == [4]
    assert math.isfinite(read_metrics(run)[3]["loss"])
    assert all(torch.isfinite(t).all() for t in ckpt.model_state_dict(ckpt.latest(run)).values())


def test_no_pruning_event_on_nonfinite_statistics(tmp_path, capsys):
    def patch(tr):
        prune = tr.maybe_prune

        def poisoned(step):
            if step == 10:
                next(iter(tr.pruner.stats().values())).fill_(float("nan"))
            return prune(step)
        tr.maybe_prune = poisoned

    run = tmp_path / "run"
    tr = run_in_process(tiny_config(train={"max_steps": 30, "checkpoint_interval": None}), run, patch)
    events = read_events(run)
    assert [e["step"] for e in events if e["kind"] == "prune_skipped"] == [10]
    assert [e["step"] for e in events if e["kind"] == "prune"] == [20, 30]
    assert "pruning event at step 10 skipped: non-finite statistics" in capsys.readouterr().out
    assert tr.widths() == {"net.1": 18, "net.4": 14}     # two events of 25%, not three


# ---- stale DeepSpeed build lock --------------------------------------------------------------
def test_a_stale_build_lock_is_removed_and_a_held_one_is_kept(tmp_path, capsys):
    root = tmp_path / "torch_extensions"
    stale = root / "deepspeed_shm_comm" / "lock"
    stale.parent.mkdir(parents=True)
    stale.write_text("")                   # what a build killed half-way leaves (FileBaton)
    held = root / "other_op" / "lock"
    held.parent.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import os, sys, time; "
                               "fd = os.open(sys.argv[1], os.O_CREAT | os.O_EXCL); "
                               "print('ok', flush=True); time.sleep(60)", str(held)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ok"
        removed = check_build_locks(root, existence=True)
    finally:
        holder.kill()
        holder.wait()
    assert removed == [stale] and not stale.exists() and held.exists()
    err = capsys.readouterr().err.splitlines()         # one line per lock, in folder order
    assert len(err) == 2
    assert err[0].startswith(f"warning: removed a stale torch extension build lock {stale}")
    assert f"process {holder.pid} holds the torch extension build lock {held}" in err[1]
    # its holder gone, the second lock is stale too; with flock-based torch nothing is removed
    assert check_build_locks(root, existence=False) == [] and held.exists()
    assert check_build_locks(root, existence=True) == [held]
