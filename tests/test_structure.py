"""Recorded structures replay on a freshly built model; unit kinds; the uniform scope."""
import copy

import pytest
import torch

from secateur.pruning import Pruner, Rule, Schedule, structure
from secateur.pruning.groups import unit_kind

ONESHOT = Schedule(kind="oneshot", start=1, end=1, every=1)


def _llama(seed=0):
    import transformers as T
    torch.manual_seed(seed)
    c = T.LlamaConfig(vocab_size=60, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16)
    c._attn_implementation, c.use_cache = "eager", False
    return T.LlamaForCausalLM(c).eval()


IDS = torch.randint(3, 60, (2, 8), generator=torch.Generator().manual_seed(1))


def test_replayed_structure_rebuilds_the_pruned_model():
    import torchvision
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    p = Pruner(model, criterion="l2", rule=Rule("ratio", 0.3), schedule=ONESHOT, example_input=x)
    p.prune()
    rec = structure.record(p.groups)
    fresh = torchvision.models.resnet18(num_classes=5).eval()     # other random weights
    p2 = Pruner(fresh, criterion="l2", example_input=x, verify=False)
    structure.apply(p2.groups, rec)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == \
        {k: v.shape for k, v in model.state_dict().items()}
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    assert structure.record(p2.groups) == rec


def test_replay_of_a_concat_model_keeps_the_shared_axis_tables():
    import torchvision
    torch.manual_seed(0)
    model = torchvision.models.densenet121(num_classes=4).eval()
    x = torch.randn(1, 3, 32, 32)
    p = Pruner(model, criterion="l2", rule=Rule("ratio", 0.25), schedule=ONESHOT, example_input=x,
               verify=False)
    p.prune()
    fresh = torchvision.models.densenet121(num_classes=4).eval()
    structure.apply(Pruner(fresh, example_input=x, verify=False).groups, structure.record(p.groups))
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_structure_from_another_model_is_refused():
    p = Pruner(_llama(), example_input={"input_ids": IDS}, verify=False)
    with pytest.raises(ValueError, match="do not exist"):
        structure.apply(p.groups, {"features.0": [0, 1]})
    name = p.groups[0].name
    with pytest.raises(ValueError, match="no unit"):
        structure.apply(p.groups, {name: [10_000]})


def test_a_pooler_outside_the_transformer_blocks_is_not_mlp():
    import transformers as T
    from secateur.pruning.groups import unit_kinds
    c = T.BertConfig(vocab_size=60, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=16, num_labels=3)
    model = T.BertForSequenceClassification(c).eval()
    p = Pruner(model, example_input={"input_ids": IDS}, verify=False)
    kinds = unit_kinds(model, p.groups)
    assert kinds["bert.pooler.dense"] == "hidden"
    assert {n for n, k in kinds.items() if k == "mlp"} == \
        {f"bert.encoder.layer.{i}.intermediate.dense" for i in range(2)}
    with pytest.raises(ValueError, match="no groups of kind heads"):
        import torchvision
        Pruner(torchvision.models.resnet18().eval(), example_input=torch.randn(1, 3, 32, 32),
               verify=False, unit_kinds=["heads"])


def test_unit_kinds_name_what_a_user_prunes():
    p = Pruner(_llama(), example_input={"input_ids": IDS}, verify=False)
    kinds = {g.name: unit_kind(g) for g in p.groups}
    assert {n for n, k in kinds.items() if k == "heads"} == {f"model.layers.{i}.self_attn" for i in range(3)}
    assert {n for n, k in kinds.items() if k == "mlp"} == {f"model.layers.{i}.mlp.up_proj" for i in range(3)}
    assert set(kinds.values()) == {"heads", "mlp", "hidden"}
    only = Pruner(_llama(), example_input={"input_ids": IDS}, verify=False, unit_kinds=["mlp"])
    assert {g.name for g in only.groups} == {n for n, k in kinds.items() if k == "mlp"}
    import torchvision
    cnn = Pruner(torchvision.models.resnet18().eval(), example_input=torch.randn(1, 3, 32, 32), verify=False)
    assert {unit_kind(g) for g in cnn.groups} == {"channels"}
    with pytest.raises(ValueError, match="unknown kind"):
        Pruner(_llama(), example_input={"input_ids": IDS}, unit_kinds=["neurons"])


def test_uniform_scope_gives_every_layer_of_a_stack_the_mean_count():
    rule = dict(kind="prop_of_avg", value=0.95)
    per_layer = Pruner(_llama(), criterion="l2", rule=Rule(**rule, scope="per_layer"), schedule=ONESHOT,
                       example_input={"input_ids": IDS}, unit_kinds=["mlp"], verify=False)
    counts = [a for _, _, a in per_layer.prune()]
    assert len(set(counts)) > 1, "the oracle needs layers the rule treats differently"
    model = _llama()
    uni = Pruner(model, criterion="l2", rule=Rule(**rule, scope="uniform"), schedule=ONESHOT,
                 example_input={"input_ids": IDS}, unit_kinds=["mlp"], verify=False)
    scores = {g.name: torch.cat([s.unit_view() for s in g.producers], 1).double().norm(dim=1)
              for g in uni.groups}
    report = uni.prune()
    want = round(sum(counts) / len(counts))
    assert [a for _, _, a in report] == [want] * len(report)
    for g in uni.groups:          # each layer keeps its own highest-scored units
        top = torch.sort(scores[g.name], descending=True, stable=True).indices[:want].sort().values
        assert g.origin.tolist() == top.tolist()
