"""Reference models for the zoo checks: every torchvision classifier and tiny-config Hugging
Face models (random init, built from configs; nothing is downloaded), each with an input that
suits it. Used by the zoo test and `benchmarks/zoo.py`."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

Zoo = dict[str, tuple[Callable[[], nn.Module], Any]]


def logits(out: Any) -> torch.Tensor:
    """The logits of a model's output (a tensor, a tuple whose first item they are, or a
    Hugging Face output with `.logits`)."""
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def torchvision_zoo(max_params: float | None = None) -> Zoo:
    """Every torchvision classification model (10 classes), with a batch of 2 images; with
    `max_params`, only those whose ImageNet variant (torchvision's weight metadata, read offline)
    has fewer parameters."""
    import torchvision
    M = torchvision.models
    zoo = {}
    for name in M.list_models(module=M):
        if max_params is not None and \
                M.get_model_weights(name).DEFAULT.meta["num_params"] >= max_params:
            continue
        side = 299 if "inception" in name else 224 if any(k in name for k in ("vit_", "swin", "maxvit")) else 64
        zoo[name] = (lambda n=name: M.get_model(n, weights=None, num_classes=10),
                     torch.randn(2, 3, side, side))
    return zoo


TIMM_MODELS = ("vit_tiny_patch16_224", "deit_tiny_patch16_224", "convnext_atto", "efficientnet_b0",
               "mobilenetv3_small_100", "regnetx_002", "resnext26ts", "levit_128s", "mixer_s16_224")


def timm_zoo() -> Zoo:
    """Small timm models (ViT/DeiT with fused qkv and LayerScale-free blocks, ConvNeXt, EfficientNet,
    MobileNetV3, RegNet and ResNeXt with grouped convolutions, LeViT, MLP-Mixer), 10 classes."""
    import timm
    zoo = {}
    for name in TIMM_MODELS:
        side = 224 if any(k in name for k in ("vit", "deit", "levit", "mixer")) else 64
        zoo[f"timm/{name}"] = (lambda n=name: timm.create_model(n, pretrained=False, num_classes=10),
                               torch.randn(2, 3, side, side))
    return zoo


def hf_zoo() -> Zoo:
    """BERT, RoBERTa, GPT-2, LLaMA (GQA), Qwen2, Mistral, ViT, ConvNeXt and MobileNetV2 at tiny
    widths (eager attention, no cache)."""
    import transformers as T

    def cfg(c: Any) -> Any:
        c._attn_implementation, c.use_cache = "eager", False
        return c

    ids = torch.randint(3, 50, (2, 8))
    img = torch.randn(2, 3, 32, 32)
    lm = dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16)
    enc = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=32, max_position_embeddings=20)
    return {
        "hf/bert": (lambda: T.BertForSequenceClassification(cfg(T.BertConfig(**enc, num_labels=3))), ids),
        "hf/roberta": (lambda: T.RobertaForMaskedLM(cfg(T.RobertaConfig(**enc))), ids),
        "hf/gpt2": (lambda: T.GPT2LMHeadModel(cfg(T.GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=4,
                                                              n_positions=16))), ids),
        "hf/llama": (lambda: T.LlamaForCausalLM(cfg(T.LlamaConfig(**lm))), ids),
        "hf/qwen2": (lambda: T.Qwen2ForCausalLM(cfg(T.Qwen2Config(**lm))), ids),
        "hf/mistral": (lambda: T.MistralForCausalLM(cfg(T.MistralConfig(**lm, head_dim=4))), ids),
        "hf/vit": (lambda: T.ViTForImageClassification(cfg(T.ViTConfig(
            image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=32, num_labels=3))), img),
        "hf/convnext": (lambda: T.ConvNextForImageClassification(T.ConvNextConfig(
            num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=3,
            image_size=32)), img),
        "hf/mobilenet_v2": (lambda: T.MobileNetV2ForImageClassification(T.MobileNetV2Config(
            num_channels=3, image_size=32, depth_multiplier=0.25, num_labels=3)), img),
    }
