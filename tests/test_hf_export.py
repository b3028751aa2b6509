"""Hugging Face export of pruned models: tiny configs (nothing downloaded), pruned by the real
Pruner, saved, reloaded with the Auto classes.

Oracles: the in-memory pruned model's logits and its module shapes (the reloaded model's logits
equal them, its parameter count equals the pruned one's, the fitted config states the widths the
modules have), and the folder: written whole or not at all."""
from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch import nn

T = pytest.importorskip("transformers")

from secateur.hf_export import fit_hf_config, save_pretrained_pruned
from secateur.pruning import Pruner, Rule, Schedule

IDS = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))
LM = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
ENC = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
           intermediate_size=64, max_position_embeddings=32)
DECODERS = {"llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**LM)),
            "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(**LM)),
            "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**LM)),
            "qwen3": lambda: T.Qwen3ForCausalLM(T.Qwen3Config(**LM, head_dim=8))}


def _pruned(make, ratio: float, layers: list[str] | None = None) -> nn.Module:
    torch.manual_seed(0)
    model = make()
    model.config._attn_implementation = "eager"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = Pruner(model, criterion="l2", rule=Rule("ratio", ratio),
                        schedule=Schedule(kind="oneshot", start=1, end=1, every=1),
                        example_input={"input_ids": IDS}, layers=layers)
        pruner.prune()
    return model.eval()


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _reloads_equal(model: nn.Module, auto, folder) -> nn.Module:
    loaded = auto.from_pretrained(folder, local_files_only=True, attn_implementation="eager").eval()
    assert type(loaded) is type(model)
    with torch.no_grad():
        want, got = model(input_ids=IDS), loaded(input_ids=IDS)
    want, got = (o.logits if hasattr(o, "logits") else o.last_hidden_state for o in (want, got))
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-5
    assert _n_params(loaded) == _n_params(model)
    return loaded


def _nothing_but(tmp_path, *names: str) -> None:
    assert sorted(os.listdir(tmp_path)) == sorted(names)


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_gqa_decoder_heads_and_mlp_reload_with_equal_logits(name, tmp_path):
    model = _pruned(DECODERS[name], 0.5)      # 2 KV heads -> 1 (4 query heads -> 2), MLP 64 -> 32
    n0 = _n_params(DECODERS[name]())
    a, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    hidden = model.get_input_embeddings().embedding_dim
    assert (a.q_proj.out_features, a.k_proj.out_features, mlp.up_proj.out_features) == (16, 8, 32)
    cfg, why = fit_hf_config(model)
    assert why == ""
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (2, 1, 8)
    assert (cfg.intermediate_size, cfg.hidden_size) == (32, hidden)
    assert model.config.intermediate_size == 64          # the model's own config is left alone
    assert save_pretrained_pruned(model, tmp_path / "out") is None
    _nothing_but(tmp_path, "out")
    assert (tmp_path / "out" / "model.safetensors").is_file()
    loaded = _reloads_equal(model, T.AutoModelForCausalLM, tmp_path / "out")
    assert _n_params(loaded) < n0
    assert loaded.config.num_attention_heads == 2 and loaded.config.intermediate_size == 32


def test_bare_decoder_reloads_with_auto_model(tmp_path):
    model = _pruned(lambda: T.LlamaModel(T.LlamaConfig(**LM)), 0.5)
    assert save_pretrained_pruned(model, tmp_path / "out") is None
    _reloads_equal(model, T.AutoModel, tmp_path / "out")


def test_bert_mlp_pruned_reloads_with_equal_logits(tmp_path):
    mlps = [f"bert.encoder.layer.{i}.intermediate.dense" for i in range(2)]
    model = _pruned(lambda: T.BertForMaskedLM(T.BertConfig(**ENC)), 0.25, layers=mlps)
    cfg, why = fit_hf_config(model)
    assert why == "" and (cfg.intermediate_size, cfg.hidden_size, cfg.num_attention_heads) == (48, 32, 4)
    assert save_pretrained_pruned(model, tmp_path / "out") is None
    _reloads_equal(model, T.AutoModelForMaskedLM, tmp_path / "out")


def test_bert_heads_alone_do_not_fit(tmp_path):
    heads = [f"bert.encoder.layer.{i}.attention.self" for i in range(2)]
    model = _pruned(lambda: T.BertForMaskedLM(T.BertConfig(**ENC)), 0.25, layers=heads)
    assert model.bert.encoder.layer[0].attention.self.query.out_features == 24   # 3 heads of 8, hidden 32
    cfg, why = fit_hf_config(model)
    assert cfg is None and "BertConfig derives the head size" in why and "\n" not in why
    assert save_pretrained_pruned(model, tmp_path / "out") == why
    _nothing_but(tmp_path)


@pytest.mark.parametrize("name", ["bert", "roberta"])
def test_encoder_heads_fit_when_hidden_shrinks_with_them(name, tmp_path):
    """Pruned 25% everywhere: 3 heads of 8 over hidden 24, which hidden / heads expresses."""
    make = {"bert": lambda: T.BertForSequenceClassification(T.BertConfig(**ENC, num_labels=3)),
            "roberta": lambda: T.RobertaForMaskedLM(T.RobertaConfig(**ENC))}[name]
    model = _pruned(make, 0.25)
    cfg, why = fit_hf_config(model)
    assert why == "" and (cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size) == (24, 3, 48)
    assert save_pretrained_pruned(model, tmp_path / "out") is None
    auto = T.AutoModelForSequenceClassification if name == "bert" else T.AutoModelForMaskedLM
    _reloads_equal(model, auto, tmp_path / "out")


def test_gpt2_fits_when_hidden_shrinks_with_heads_and_not_otherwise(tmp_path):
    gpt = dict(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    make = lambda: T.GPT2LMHeadModel(T.GPT2Config(**gpt))
    model = _pruned(make, 0.25)
    cfg, why = fit_hf_config(model)
    assert why == "" and (cfg.n_embd, cfg.n_head, cfg.n_inner) == (24, 3, 96)
    assert save_pretrained_pruned(model, tmp_path / "out") is None
    _reloads_equal(model, T.AutoModelForCausalLM, tmp_path / "out")
    heads_only = _pruned(make, 0.25, layers=[f"transformer.h.{i}.attn" for i in range(2)])
    cfg, why = fit_hf_config(heads_only)
    assert cfg is None and "GPT2Config derives the head size" in why


@pytest.mark.parametrize("group, word", [("model.layers.0.self_attn", "query heads"),
                                         ("model.layers.1.mlp.up_proj", "MLP units")])
def test_layers_of_different_widths_do_not_fit(group, word, tmp_path):
    model = _pruned(DECODERS["llama"], 0.5, layers=[group])
    cfg, why = fit_hf_config(model)
    assert cfg is None and word in why and "same width in every layer" in why and "\n" not in why
    assert why.startswith("layer 1 keeps")
    assert save_pretrained_pruned(model, tmp_path / "out") == why
    _nothing_but(tmp_path)


def test_a_shape_the_config_cannot_build_is_named(tmp_path):
    """Only the pooler narrowed: every width the reader knows fits, the rebuild check does not."""
    make = lambda: T.BertForSequenceClassification(T.BertConfig(**ENC, num_labels=3))
    model = _pruned(make, 0.25, layers=["bert.pooler.dense"])
    cfg, why = fit_hf_config(model)
    assert cfg is None and "bert.pooler.dense" in why
    assert save_pretrained_pruned(model, tmp_path / "out") == why
    _nothing_but(tmp_path)


def test_unsupported_models_get_a_reason(tmp_path):
    vit = T.ViTModel(T.ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=32))
    cfg, why = fit_hf_config(vit)
    assert cfg is None and "'vit' is not supported" in why
    cfg, why = fit_hf_config(nn.Linear(2, 2))
    assert cfg is None and "not a Hugging Face" in why
    assert "'vit' is not supported" in save_pretrained_pruned(vit, tmp_path / "out")
    _nothing_but(tmp_path)


def test_never_overwrites_a_non_empty_out_dir(tmp_path):
    model = _pruned(DECODERS["llama"], 0.5)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        save_pretrained_pruned(model, tmp_path / "full")
    (tmp_path / "file").write_text("mine")
    with pytest.raises(FileExistsError):
        save_pretrained_pruned(model, tmp_path / "file")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    (tmp_path / "empty").mkdir()                                 # an empty folder is filled
    assert save_pretrained_pruned(model, tmp_path / "empty") is None
    _nothing_but(tmp_path, "full", "file", "empty")


def test_custom_probe_and_train_mode_kept(tmp_path):
    model = _pruned(DECODERS["llama"], 0.5).train()
    probe = {"input_ids": IDS[:, :5], "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])}
    assert save_pretrained_pruned(model, tmp_path / "out", probe=probe) is None
    assert model.training


def test_a_reload_that_differs_is_refused_and_leaves_nothing(tmp_path):
    """A forward hook that save_pretrained cannot carry: the probe sees the difference."""
    model = _pruned(DECODERS["llama"], 0.5)
    model.lm_head.register_forward_hook(lambda m, i, out: out + 1e-3)
    why = save_pretrained_pruned(model, tmp_path / "out")
    assert why is not None and "differs from the pruned model's by 0.001" in why
    _nothing_but(tmp_path)
