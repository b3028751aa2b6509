"""Every criterion on traced groups: statistics read what each group's consumer reads, projective
compares attention heads on their joint query-key rows, folding merges whole heads."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from secateur.pruning import Pruner, Rule
from secateur.zoo import hf_zoo, logits


class _Concat(nn.Module):
    """Two branches concatenated; a dead unit (ReLU never fires) in the second branch."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(5, 4), nn.Linear(5, 6)
        self.c, self.head = nn.Linear(10, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], -1)
        return self.head(torch.relu(self.c(y)))


def test_activation_criterion_removes_a_dead_unit_behind_a_concat_with_output_unchanged():
    torch.manual_seed(0)
    model, x = _Concat().eval(), torch.randn(64, 5)
    with torch.no_grad():
        model.b.weight[2].zero_()
        model.b.bias[2] = -1.0             # relu(-1) = 0 on every input: its activation is 0
        model.b.bias[[0, 1, 3, 4, 5]] = 1.0  # the others fire
        before = model(x)
    pruner = Pruner(model, "activation", Rule("ratio", 1 / 6), example_input=x[:2], layers=["b"])
    model(x)                               # statistics accumulate in a forward pre-hook on `c`
    pruner.prune()
    pruner.close()
    assert model.b.out_features == 5 and model.c.in_features == 9
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)


def _attention():
    make, ids = hf_zoo()["hf/llama"]
    torch.manual_seed(0)
    return make().eval(), ids


def test_projective_scores_heads_on_their_joint_query_key_rows():
    from secateur.pruning import projective
    model, ids = _attention()
    at = model.model.layers[0].self_attn          # 4 query heads, 2 KV heads, head_dim 4
    name = "model.layers.0.self_attn"
    pruner = Pruner(model, "projective", Rule("ratio", 0.5), example_input=ids, layers=[name])
    group = pruner.groups[0]
    q, k = at.q_proj.weight.detach(), at.k_proj.weight.detach()
    # by hand: KV unit u = query rows 8u..8u+7 and key rows 4u..4u+3 (values play no part)
    joint = torch.stack([torch.cat([q[8 * u:8 * u + 8].reshape(-1), k[4 * u:4 * u + 4].reshape(-1)])
                         for u in range(2)]).double()
    before = pruner.criterion.importance(group)
    torch.testing.assert_close(before, projective.scores(joint, lam=1e-3))
    with torch.no_grad():                          # unit 1 duplicates unit 0: both residuals vanish
        at.q_proj.weight[8:16] = at.q_proj.weight[0:8]
        at.k_proj.weight[4:8] = at.k_proj.weight[0:4]
    assert pruner.criterion.importance(group).max() < 0.1 * before.min()
    pruner.prune()
    assert at.q_proj.out_features == 8 and at.k_proj.out_features == 4 and at.o_proj.in_features == 8
    with torch.no_grad():
        assert logits(model(ids)).shape[-1] == 50


@pytest.mark.parametrize("criterion", ["l2", "activation", "projective", "fold", "random"])
def test_every_criterion_prunes_a_hugging_face_llama_and_it_trains(criterion):
    model, ids = _attention()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    n0 = sum(p.numel() for p in model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = Pruner(model, criterion, Rule("ratio", 0.5), example_input=ids)
    logits(model(ids)).float().pow(2).mean().backward()     # one step of statistics
    opt.step()
    opt.zero_grad()
    pruner.prune(opt)
    loss = logits(model(ids)).float().pow(2).mean()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    at = model.model.layers[0].self_attn
    assert at.q_proj.out_features % 4 == 0 and (at.q_proj.out_features // 4) % (at.k_proj.out_features // 4) == 0
    assert sum(p.numel() for p in model.parameters()) < n0


def test_folding_merges_whole_heads_the_mean_of_their_rows():
    model, ids = _attention()
    at = model.model.layers[0].self_attn
    q = at.q_proj.weight.detach().clone()
    o = at.o_proj.weight.detach().clone()
    pruner = Pruner(model, "fold", Rule("ratio", 0.5), example_input=ids,
                    layers=["model.layers.0.self_attn"], repair="none")
    pruner.prune()
    assert at.q_proj.out_features == 8
    # two KV units fold into one: its query rows are the mean of both units' rows, its output
    # columns the sum of both units' columns (METHODS B: mean of producers, sum of consumers)
    torch.testing.assert_close(at.q_proj.weight, (q[:8] + q[8:]) / 2)
    torch.testing.assert_close(at.o_proj.weight, o[:, :8] + o[:, 8:])


def test_llama_with_its_key_value_cache_on_still_prunes_heads():
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)     # use_cache=True
    torch.manual_seed(0)
    model, ids = transformers.LlamaForCausalLM(cfg), torch.randint(0, 50, (2, 6))
    pruner = Pruner(model, "l2", Rule("ratio", 0.5), example_input=ids)
    assert "model.layers.0.self_attn" in [g.name for g in pruner.groups]
    pruner.prune()
    assert model.model.layers[0].self_attn.k_proj.out_features == 4
    assert logits(model(ids)).shape == (2, 6, 50)


def test_group_names_are_unique_and_every_group_is_cut():
    import transformers
    torch.manual_seed(0)
    model = transformers.DistilBertForSequenceClassification(transformers.DistilBertConfig(
        vocab_size=50, dim=16, n_layers=2, n_heads=4, hidden_dim=32, max_position_embeddings=16)).train()
    pruner = Pruner(model, "l2", Rule("ratio", 0.3), example_input=torch.randint(0, 50, (2, 6)))
    names = [g.name for g in pruner.groups]
    assert len(names) == len(set(names))
    report = pruner.prune()
    assert len(report) == len(names) and all(after < before for _, before, after in report)


def test_round_to_wider_than_a_group_leaves_the_rule_alone_and_cuts_every_group():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 3))
    Pruner(model, "l2", Rule("ratio", 0.3), example_input=torch.randn(2, 4), round_to=32).prune()
    assert model[0].out_features == 12 and model[2].out_features == 32     # 16: rule alone; 64 -> 45 -> 32
    assert model(torch.randn(2, 4)).shape == (2, 3)


def test_projective_scores_bert_heads_on_their_joint_query_key_rows():
    """BERT's output projection lies outside its attention module, so its heads are traced
    through the graph: they carry the same joint query-key rows (values play no part)."""
    import transformers
    from secateur.pruning import projective
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=24, max_position_embeddings=16), add_pooling_layer=False).eval()
    ids = torch.randint(0, 50, (2, 6))
    at = model.encoder.layer[0].attention.self          # 4 heads of 4
    pruner = Pruner(model, "projective", Rule("ratio", 0.5), example_input=ids, unit_kinds=["heads"])
    (group,) = pruner.groups
    assert group.qk and group.size == 4
    q, k = at.query.weight.detach(), at.key.weight.detach()
    joint = torch.stack([torch.cat([q[4 * h:4 * h + 4].reshape(-1), k[4 * h:4 * h + 4].reshape(-1)])
                         for h in range(4)]).double()
    torch.testing.assert_close(pruner.criterion.importance(group), projective.scores(joint, lam=1e-3))
    with torch.no_grad():                               # values change, the scores do not
        at.value.weight.mul_(3.0)
    torch.testing.assert_close(pruner.criterion.importance(group), projective.scores(joint, lam=1e-3))
