"""Distillation: the KD term against a closed form, and a snapshot teacher that is frozen, equal to
the student at the snapshot and blind to the student's statistics hooks."""
import math

import torch

from secateur.trainer.distill import TEACHER_FILE, Distiller, kd_loss


def test_kd_loss_is_t_squared_kl_over_kept_positions():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    y = torch.tensor([[1, -100, 2], [0, 4, -100]])
    T = 2.0
    want, n = 0.0, 0
    for b in range(2):
        for j in range(3):
            if y[b, j] == -100:
                continue
            p = [math.exp(v / T) for v in t[b, j].tolist()]
            q = [math.exp(v / T) for v in s[b, j].tolist()]
            p = [v / sum(p) for v in p]
            q = [v / sum(q) for v in q]
            want += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
            n += 1
    assert abs(kd_loss(s, t, y, T).item() - T * T * want / n) < 1e-6
    assert kd_loss(t, t, y, T).item() < 1e-7


def test_snapshot_teacher_is_a_frozen_equal_copy_without_hooks():
    from secateur.models import MLP
    torch.manual_seed(0)
    student = MLP(in_features=8, hidden=[16], num_classes=3)
    seen = []
    student.register_forward_hook(lambda m, i, o: seen.append(1))
    d = Distiller("snapshot", temperature=2.0, weight=0.5, source=None, device=torch.device("cpu"))
    x, y = torch.randn(4, 8), torch.tensor([0, 1, 2, 0])
    assert torch.equal(d.loss(student(x), x, y, False), torch.nn.functional.cross_entropy(student(x), y))
    d.snapshot({"spec": student.spec()}, student.state_dict(), x)
    seen.clear()
    with torch.no_grad():
        torch.testing.assert_close(d.model(x), student.eval()(x), rtol=0, atol=0)
    assert len(seen) == 1                              # the student's call only
    assert not any(p.requires_grad for p in d.model.parameters()) and not d.model.training
    student.train()
    out = student(x)
    loss = d.loss(out, x, y, False)                    # equal models: KD term 0, half the CE
    torch.testing.assert_close(loss, 0.5 * torch.nn.functional.cross_entropy(out, y), rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        next(student.parameters()).add_(1.0)
    assert not torch.equal(d.model(x), student.eval()(x))  # the teacher stays as snapshotted


def test_snapshot_teacher_under_zero3_holds_the_whole_weights(tmp_path):
    """ZeRO-3 partitions the parameters (each holds an empty local tensor): the snapshot must be
    taken from the gathered whole weights. Oracle: the same single-rank run at ZeRO stage 0."""
    from safetensors.torch import load_file

    from secateur.trainer import checkpoint as ckpt
    from test_trainer import run_in_process, tiny_config

    teachers = {}
    for stage in (0, 3):
        cfg = tiny_config(distill={"teacher": "snapshot", "temperature": 2.0, "weight": 0.5},
                          deepspeed={"zero_stage": stage},
                          train={"max_steps": 12, "checkpoint_interval": None, "eval_interval": 12})
        run = tmp_path / f"stage{stage}"
        run_in_process(cfg, run)
        teachers[stage] = load_file(str(ckpt.latest(run) / TEACHER_FILE))
    assert teachers[0].keys() == teachers[3].keys()
    for k, t in teachers[0].items():
        assert t.numel() > 0 and teachers[3][k].shape == t.shape, k
        torch.testing.assert_close(teachers[3][k], t, rtol=1e-5, atol=1e-6)
