"""Export a run's latest (possibly pruned) model as architecture JSON + safetensors weights."""
from __future__ import annotations

import json
from pathlib import Path

from secateur.trainer import checkpoint as ckpt

LOAD_SNIPPET = """\
import json, safetensors.torch, secateur.models
model = secateur.models.build_model(json.load(open("{dir}/model.json")))
model.load_state_dict(safetensors.torch.load_file("{dir}/model.safetensors"))"""


def export_run(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write OUT/model.json (the model spec) and OUT/model.safetensors from the run's latest
    checkpoint. OUT defaults to RUN_DIR/export. Returns OUT."""
    from safetensors.torch import save_file

    path = ckpt.latest(run_dir)
    model, meta = ckpt.load_model(path)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "export"
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.json").write_text(json.dumps(meta["spec"], indent=1))
    # safetensors refuses shared or non-contiguous storage: give every tensor its own copy
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(tensors, str(out / "model.safetensors"),
              metadata={"step": str(meta["step"]), "source": str(path)})
    return out
