"""Knowledge distillation during recovery: the student (the model being pruned) also matches a
frozen teacher's softened logits.

    loss = (1 - weight) * CE(student, y) + weight * T^2 * KL(softmax(t / T) || softmax(s / T))

(Hinton et al. 2015, "Distilling the knowledge in a neural network"; the T^2 factor keeps the
gradient scale independent of T. The Minitron recipe recovers pruned LLMs with this logit KL.)
Positions whose target is -100 (padding, unmasked tokens) are left out of both terms.

The teacher is either a frozen copy of the model taken just before the first pruning event
(`teacher: snapshot`), or loaded once from a secateur run folder, a `secateur export` folder or a
Hugging Face folder. A snapshot is saved with every checkpoint (its architecture and weights), so
a resumed run distills from the same teacher.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TEACHER_FILE = "teacher.safetensors"


def kd_loss(student: Tensor, teacher: Tensor, y: Tensor, temperature: float) -> Tensor:
    """T^2 * KL(teacher || student) on temperature-softened logits, averaged over the positions
    whose target is not -100. student, teacher: (..., V) logits of the same shape; y: (...)."""
    s = student.reshape(-1, student.shape[-1])
    t = teacher.reshape(-1, teacher.shape[-1]).to(s.dtype)
    keep = y.reshape(-1) != -100
    s, t = s[keep], t[keep]
    if s.shape[0] == 0:
        return student.sum() * 0.0
    log_s = F.log_softmax(s / temperature, dim=-1)
    log_t = F.log_softmax(t / temperature, dim=-1)
    kl = F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")
    return kl * temperature ** 2


def load_teacher(path: str, source: dict[str, Any] | None = None) -> nn.Module:
    """A frozen teacher from a secateur run folder (its latest checkpoint), a `secateur export`
    folder or a Hugging Face folder (built like the student's `source`: same task head).
    Raises ValueError (one line) when `path` is none of these."""
    from secateur.build import construct
    from secateur.trainer import checkpoint as ckpt

    p = Path(path)
    if (p / "secateur.json").is_file():
        from secateur.trainer.export import load_pruned

        model = load_pruned(p)
    elif (p / ckpt.CKPT_DIR / "latest").is_file():
        model, _ = ckpt.load_model(ckpt.latest(p))
    elif (p / "config.json").is_file() and source is not None and source.get("hf"):
        model = construct({**source, "hf": {"path": str(p)}})
    else:
        raise ValueError(f"distill.teacher: {path} is not a secateur run, a secateur export or a "
                         "Hugging Face folder (for a Hugging Face student)")
    return freeze(model)


def freeze(model: nn.Module) -> nn.Module:
    """`model` in eval mode with gradients off (dropout off: the teacher's targets are fixed)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class Distiller:
    """The teacher of one run and the combined loss (module docstring).

    teacher: "snapshot" or a folder (see `load_teacher`); temperature > 0; weight in [0, 1].
    """

    def __init__(self, teacher: str, temperature: float, weight: float, source: dict[str, Any] | None,
                 device: torch.device) -> None:
        self.spec, self.temperature, self.weight, self.device = teacher, temperature, weight, device
        self.model: nn.Module | None = None
        self.arch: dict[str, Any] | None = None      # a snapshot's architecture, for checkpoints
        if teacher != "snapshot":
            self.model = load_teacher(teacher, source).to(device)

    @property
    def active(self) -> bool:
        return self.model is not None

    def snapshot(self, arch: dict[str, Any], state: dict[str, Tensor], example: Any) -> None:
        """Take the teacher from the student's current architecture `arch` (Trainer.architecture())
        and weights `state`, unless a teacher exists already. Built afresh (not deep-copied), so
        none of the student's statistics hooks ride along."""
        if self.model is not None:
            return
        from secateur.trainer.export import rebuild

        model, _ = rebuild(arch, example)
        model.load_state_dict(state)
        self.model, self.arch = freeze(model.to(self.device)), arch

    def loss(self, student_logits: Tensor, x: Any, y: Tensor, hf: bool) -> Tensor:
        """The combined loss for one micro-batch (plain cross-entropy before a teacher exists)."""
        from secateur.build import forward
        from secateur.trainer.setup import loss_fn

        ce = loss_fn(student_logits, y)
        if self.model is None or self.weight == 0.0:
            return ce
        with torch.no_grad():
            t = forward(self.model, x, hf)
        kd = kd_loss(student_logits, t, y, self.temperature)
        return (1.0 - self.weight) * ce + self.weight * kd

    # ---- checkpoints ------------------------------------------------------------------------
    def save(self, folder: Path) -> dict[str, Any] | None:
        """Write a snapshot teacher's weights into a checkpoint folder; returns what the meta
        records (None when there is nothing to save: no snapshot yet, or a teacher from a folder)."""
        if self.arch is None or self.model is None:
            return None
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous().clone() for k, v in self.model.state_dict().items()},
                  str(Path(folder) / TEACHER_FILE))
        return {"arch": self.arch, "file": TEACHER_FILE}

    def load(self, folder: Path, recorded: dict[str, Any] | None, example: Any) -> None:
        """Restore a snapshot teacher saved by `save` (no-op when `recorded` is None)."""
        if recorded is None:
            return
        from safetensors.torch import load_file

        self.model = None
        self.snapshot(recorded["arch"], load_file(str(Path(folder) / recorded["file"])), example)
