"""benchmarks/tp_llama.py: a LLaMA checkpoint trained by `secateur train` is pruned by Torch-Pruning,
written back as a secateur run whose model (rebuilt from its recorded structure) computes the same
logits as Torch-Pruning's own pruned model, and `secateur resume` fine-tunes it."""
import contextlib
import copy
import json
import sys
from pathlib import Path

import pytest
import torch

from secateur.cli import main
from secateur.data import writers
from secateur.trainer import checkpoint as ckpt
from secateur.trainer.logs import read_metrics

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))     # benchmarks/ is scripts, not a package

from tp_llama import to_grouped, to_multi_head, tp_prune, tp_prune_checkpoint  # noqa: E402

STEPS = 4


def _secateur(*args, cwd: Path) -> int:
    """The CLI in this process (no interpreter start-up), from `cwd`: the trained tokenizer is
    cached under the working folder, so every step of the test reuses the first one's."""
    with contextlib.chdir(cwd):
        return main([str(a) for a in args])


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    """configs/llama_kjv.yaml shrunk (2 layers, hidden 64, 8 heads over 4 KV heads, the first
    verses only), trained densely for a few steps."""
    root = tmp_path_factory.mktemp("tp-llama")
    writers.write_kjv(str(root / "kjv"))
    for name, lines in (("train.txt", 1500), ("val.txt", 200)):    # tokenized by every step below
        f = root / "kjv" / name
        f.write_text("".join(f.read_text().splitlines(True)[:lines]))
    sets = {"data.train_files": f"{root}/kjv/train.txt", "data.val_files": f"{root}/kjv/val.txt",
            "data.vocab_size": 512, "data.block_size": 32, "data.batch_size": 4,
            "model.hf.config.hidden_size": 64, "model.hf.config.intermediate_size": 128,
            "model.hf.config.num_hidden_layers": 2, "pruning": None, "train.eval_interval": STEPS,
            "train.eval_batches": 2, "train.progress": False}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    assert _secateur("train", "--config", REPO / "configs" / "llama_kjv.yaml", "--out", root / "dense",
                     "--max-steps", STEPS, *args, cwd=root) == 0
    return root


def test_multi_head_form_keeps_the_function():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=48,
                                         num_hidden_layers=1, num_attention_heads=4,
                                         num_key_value_heads=2)).eval()
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        reps = to_multi_head(model)
        assert model.model.layers[0].self_attn.k_proj.out_features == 32
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=0, atol=1e-6)
        to_grouped(reps)
        assert model.model.layers[0].self_attn.k_proj.out_features == 16
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=0, atol=0)


def test_torch_pruning_result_is_a_secateur_run_that_resumes(dense_run, tmp_path):
    src = ckpt.latest(dense_run / "dense")
    out = tmp_path / "tp50"
    with contextlib.chdir(dense_run):
        r = tp_prune_checkpoint(src, out, keep=0.5)

    # the oracle: Torch-Pruning's own pruned model, made here from the source checkpoint
    original, _ = ckpt.load_model(src)
    theirs = copy.deepcopy(original).eval()
    ids = torch.randint(0, 500, (2, 32), generator=torch.Generator().manual_seed(1))
    tp_prune(theirs, ids, keep=0.5)
    attn, mlp = theirs.model.layers[0].self_attn, theirs.model.layers[0].mlp
    assert (attn.q_proj.out_features, attn.k_proj.out_features, mlp.gate_proj.out_features) == (32, 16, 64)
    assert theirs.model.norm.weight.shape == (64,)             # hidden size kept
    assert r["params_after"] == sum(p.numel() for p in theirs.parameters()) < r["params_before"]
    assert all(after == before // 2 for _, before, after in r["groups"]), r["groups"]

    # what was written: rebuilt by secateur from source + structure, not from Torch-Pruning
    mine, meta = ckpt.load_model(ckpt.latest(out))
    assert meta["structure"] == r["structure"] and meta["params"] == r["params_after"]
    assert sum(p.numel() for p in mine.parameters()) == r["params_after"]
    with torch.no_grad():
        diff = (mine.eval()(input_ids=ids).logits - theirs(input_ids=ids).logits).abs().max().item()
    assert diff < 1e-5

    assert _secateur("resume", out, "--max-steps", STEPS + 2, cwd=dense_run) == 0
    rows = read_metrics(out)
    assert [row["step"] for row in rows] == [STEPS + 1, STEPS + 2]
    assert all(row["params"] == r["params_after"] for row in rows)
