"""Hugging Face export of a pruned model: a config that states the pruned widths, and a
`save_pretrained` folder that `AutoModelFor...from_pretrained` loads with the same logits.

    cfg, why = fit_hf_config(model)            # (config with the pruned widths, "") or (None, reason)
    why = save_pretrained_pruned(model, "out")  # None once "out" reloads with equal logits

A Hugging Face config states one width per kind (heads, key/value heads, MLP width, hidden size)
for every layer, so a pruned model fits it only when every layer kept the same widths and the
config class can express them. The widths are read from the modules' tensors, never from the
config the model was built with (pruning leaves it stale).

Supported: LLaMA-family decoders (llama, mistral, qwen2, qwen3: explicit `head_dim`, so query
heads, key/value heads, MLP and hidden widths all fit), BERT/RoBERTa (MLP and hidden widths fit;
heads only while heads * head size == hidden_size, since BertConfig derives the head size from
hidden_size / num_attention_heads) and GPT-2 (the same for n_inner, n_embd and n_head).
"""
from __future__ import annotations

import copy
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import Tensor, nn

if TYPE_CHECKING:  # transformers is the optional "hf" extra: imported where used
    from transformers import PretrainedConfig, PreTrainedModel

# model_type -> family
_FAMILY = {"llama": "decoder", "mistral": "decoder", "qwen2": "decoder", "qwen3": "decoder",
           "bert": "bert", "roberta": "bert", "gpt2": "gpt2"}
# family -> path of the layer list under the base model
_LAYERS = {"decoder": "layers", "bert": "encoder.layer", "gpt2": "h"}
# class-name suffix -> Auto class (first match wins: "LMHeadModel" before "Model")
_AUTO = (("ForCausalLM", "AutoModelForCausalLM"), ("LMHeadModel", "AutoModelForCausalLM"),
         ("ForMaskedLM", "AutoModelForMaskedLM"),
         ("ForSequenceClassification", "AutoModelForSequenceClassification"),
         ("ForTokenClassification", "AutoModelForTokenClassification"),
         ("ForQuestionAnswering", "AutoModelForQuestionAnswering"),
         ("ForPreTraining", "AutoModelForPreTraining"), ("Model", "AutoModel"))
_ATOL = 1e-5


@dataclass(frozen=True)
class _Widths:
    """One layer's widths, read from its tensors."""
    heads: int
    kv_heads: int
    head_dim: int
    mlp: int


class _Misfit(Exception):
    """A one-line reason why the pruned widths do not fit the config."""


def _out(m: nn.Module) -> int:
    """Output width of a Linear or a Hugging Face Conv1D (weight stored (in, out))."""
    return m.weight.shape[0] if isinstance(m, nn.Linear) else m.weight.shape[1]


def _in(m: nn.Module) -> int:
    return m.weight.shape[1] if isinstance(m, nn.Linear) else m.weight.shape[0]


def _same(i: int, what: str, widths: dict[str, int]) -> int:
    """The one value of `widths` (tensor name -> width), or _Misfit naming the disagreement."""
    if len(set(widths.values())) != 1:
        told = ", ".join(f"{k} {v}" for k, v in widths.items())
        raise _Misfit(f"layer {i}: {what} widths disagree ({told})")
    return next(iter(widths.values()))


def _heads(i: int, width: int, head_dim: int, what: str) -> int:
    if width % head_dim:
        raise _Misfit(f"layer {i}: {what} width {width} is not a whole number of heads of {head_dim}")
    return width // head_dim


def _decoder_widths(i: int, layer: nn.Module) -> _Widths:
    a, mlp = layer.self_attn, layer.mlp
    hd = int(a.head_dim)
    q = _same(i, "query", {"q_proj out": _out(a.q_proj), "o_proj in": _in(a.o_proj)})
    kv = _same(i, "key/value", {"k_proj out": _out(a.k_proj), "v_proj out": _out(a.v_proj)})
    ffn = {"up_proj out": _out(mlp.up_proj), "down_proj in": _in(mlp.down_proj)}
    if getattr(mlp, "gate_proj", None) is not None:
        ffn["gate_proj out"] = _out(mlp.gate_proj)
    return _Widths(_heads(i, q, hd, "query"), _heads(i, kv, hd, "key/value"), hd, _same(i, "MLP", ffn))


def _bert_widths(i: int, layer: nn.Module) -> _Widths:
    a = layer.attention.self
    hd = int(a.attention_head_size)
    q = _same(i, "attention", {"query out": _out(a.query), "key out": _out(a.key), "value out": _out(a.value),
                               "attention.output.dense in": _in(layer.attention.output.dense)})
    ffn = _same(i, "MLP", {"intermediate.dense out": _out(layer.intermediate.dense),
                           "output.dense in": _in(layer.output.dense)})
    n = _heads(i, q, hd, "attention")
    return _Widths(n, n, hd, ffn)


def _gpt2_widths(i: int, layer: nn.Module) -> _Widths:
    a, mlp = layer.attn, layer.mlp
    hd = int(a.head_dim)
    fused = _out(a.c_attn)
    if fused % 3:
        raise _Misfit(f"layer {i}: attn.c_attn width {fused} is not three equal q/k/v parts")
    q = _same(i, "attention", {"c_attn out / 3": fused // 3, "attn.c_proj in": _in(a.c_proj)})
    ffn = _same(i, "MLP", {"mlp.c_fc out": _out(mlp.c_fc), "mlp.c_proj in": _in(mlp.c_proj)})
    n = _heads(i, q, hd, "attention")
    return _Widths(n, n, hd, ffn)


_READ: dict[str, Callable[[int, nn.Module], _Widths]] = {
    "decoder": _decoder_widths, "bert": _bert_widths, "gpt2": _gpt2_widths}


def _layer_list(model: nn.Module, family: str) -> list[nn.Module]:
    m: Any = getattr(model, "base_model", model)
    for part in _LAYERS[family].split("."):
        m = getattr(m, part, None)
    if not isinstance(m, nn.ModuleList) or len(m) == 0:
        raise _Misfit(f"{type(model).__name__}: no layer list at {_LAYERS[family]!r} under the base model")
    return list(m)


def _uniform(per_layer: list[_Widths]) -> _Widths:
    """The widths every layer shares, or _Misfit naming the first layer that differs from layer 0."""
    first = per_layer[0]
    for what, field in (("query heads", "heads"), ("key/value heads", "kv_heads"),
                        ("head size", "head_dim"), ("MLP units", "mlp")):
        v0 = getattr(first, field)
        for i, w in enumerate(per_layer[1:], 1):
            if getattr(w, field) != v0:
                raise _Misfit(f"layer {i} keeps {getattr(w, field)} {what}, layer 0 keeps {v0}: "
                              f"save_pretrained needs the same width in every layer")
    return first


def _shapes(model: nn.Module) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    params = {k: tuple(p.shape) for k, p in model.named_parameters(remove_duplicate=False)}
    bufs = {k: tuple(b.shape) for k, b in model.named_buffers(remove_duplicate=False)}
    return params, bufs


def _check_rebuild(model: nn.Module, cfg: Any) -> None:
    """_Misfit unless `type(model)(cfg)` (built on the meta device, no memory) has exactly the
    pruned model's parameter shapes and the same shapes for the buffers both have."""
    name = type(cfg).__name__
    try:
        with torch.device("meta"):
            ref = type(model)(copy.deepcopy(cfg))
    except Exception as e:  # the config class rejects the widths (e.g. hidden_size % heads)
        raise _Misfit(f"{name} rejects the pruned widths: {_line(e)}") from None
    (p_have, b_have), (p_want, b_want) = _shapes(model), _shapes(ref)
    for k in sorted(set(p_have) | set(p_want)):
        if k not in p_want:
            raise _Misfit(f"{name} builds no parameter {k} (the pruned model has one)")
        if k not in p_have:
            raise _Misfit(f"{name} builds a parameter {k} the pruned model lacks")
        if p_have[k] != p_want[k]:
            raise _Misfit(f"{name} builds {k} as {list(p_want[k])}, the pruned model has {list(p_have[k])}")
    for k in sorted(set(b_have) & set(b_want)):
        if b_have[k] != b_want[k]:
            raise _Misfit(f"{name} builds buffer {k} as {list(b_want[k])}, "
                          f"the pruned model has {list(b_have[k])}")


def _line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}"


def _fit(model: nn.Module) -> Any:
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(model, "save_pretrained"):
        raise _Misfit(f"{type(model).__name__} is not a Hugging Face PreTrainedModel")
    family = _FAMILY.get(getattr(cfg, "model_type", None))
    if family is None:
        raise _Misfit(f"model_type {getattr(cfg, 'model_type', None)!r} is not supported "
                      f"(supported: {', '.join(sorted(_FAMILY))})")
    layers = _layer_list(model, family)
    try:
        w = _uniform([_READ[family](i, layer) for i, layer in enumerate(layers)])
    except AttributeError as e:     # a variant without the modules this family has
        raise _Misfit(f"{type(model).__name__}: a layer lacks a module the {family} reader "
                      f"needs ({e})") from None
    emb = model.get_input_embeddings()
    if not isinstance(emb, nn.Embedding):
        raise _Misfit(f"{type(model).__name__}: input embeddings are not an nn.Embedding")
    hidden = emb.embedding_dim
    name = type(cfg).__name__
    out = copy.deepcopy(cfg)
    if family == "decoder":
        out.hidden_size, out.num_attention_heads = hidden, w.heads
        out.num_key_value_heads, out.head_dim, out.intermediate_size = w.kv_heads, w.head_dim, w.mlp
    else:
        if w.heads * w.head_dim != hidden:
            ratio = "hidden_size / num_attention_heads" if family == "bert" else "n_embd / n_head"
            raise _Misfit(f"{name} derives the head size from {ratio}, so pruned "
                          f"heads do not fit it ({w.heads} heads of {w.head_dim} over hidden size {hidden})")
        if family == "bert":
            out.hidden_size, out.num_attention_heads, out.intermediate_size = hidden, w.heads, w.mlp
        else:
            out.n_embd, out.n_head, out.n_inner = hidden, w.heads, w.mlp
    _check_rebuild(model, out)
    return out


def fit_hf_config(model: PreTrainedModel) -> tuple[PretrainedConfig | None, str]:
    """A config for the pruned `model` (a transformers.PreTrainedModel), read from its tensors.

    Per layer: query heads = query width // head size, key/value heads = key width // head size
    (head size from the attention module's own attribute, which pruning never changes), MLP width
    (gate/up/down_proj, BERT intermediate.dense / output.dense, GPT-2 mlp.c_fc / mlp.c_proj);
    hidden size from the input embeddings. Returns (a deep copy of `model.config` with those
    widths, "") when every layer has the same widths, the config class can express them and
    `type(model)(config)` (built on the meta device) has exactly the model's parameter shapes;
    otherwise (None, a one-line reason). Never raises for a misfit and never changes `model`."""
    from secateur.pruning.tracing import unwrap
    try:
        return _fit(unwrap(model)), ""
    except _Misfit as e:
        return None, str(e)


def _auto_class(model: nn.Module) -> Any:
    """The transformers Auto class that loads `model`'s class, or _Misfit."""
    import transformers
    cls = type(model).__name__
    for suffix, auto in _AUTO:
        if cls.endswith(suffix):
            return getattr(transformers, auto)
    raise _Misfit(f"{cls}: no Auto class loads this kind of head")


def _default_probe(model: nn.Module) -> dict[str, Tensor]:
    """input_ids (2, <= 8) over the model's vocabulary, from a fixed seed."""
    cfg = model.config
    vocab = model.get_input_embeddings().num_embeddings
    n_pos = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 8
    gen = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(0, vocab, (2, min(8, int(n_pos))), generator=gen)}


def _result(out: Any) -> Tensor:
    for k in ("logits", "last_hidden_state"):
        t = getattr(out, k, None)
        if isinstance(t, Tensor):
            return t
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def _run(model: nn.Module, probe: dict[str, Any], device: torch.device) -> Tensor:
    was = model.training
    model.eval()
    try:
        x = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in probe.items()}
        return _result(model(**x)).float()
    finally:
        model.train(was)


def _reload_mismatch(model: nn.Module, auto: Any, folder: Path, probe: dict[str, Any]) -> str | None:
    """None when `auto.from_pretrained(folder)` is `model`'s class with every tensor loaded and the
    same output on `probe`; else a one-line reason."""
    p = next(model.parameters())
    impl = getattr(model.config, "_attn_implementation", None)
    kw: dict[str, Any] = {"local_files_only": True, "dtype": p.dtype, "output_loading_info": True}
    if impl:
        kw["attn_implementation"] = impl
    try:
        loaded, info = auto.from_pretrained(folder, **kw)
    except Exception as e:
        return f"{auto.__name__}.from_pretrained failed on the saved folder: {_line(e)}"
    if type(loaded) is not type(model):
        return f"{auto.__name__} loads a {type(loaded).__name__}, not a {type(model).__name__}"
    for k in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        if info.get(k):
            keys = sorted(map(str, info[k]))[:3]
            return f"{auto.__name__}.from_pretrained reports {k.replace('_', ' ')}: {keys}"
    loaded.to(p.device)
    want, got = _run(model, probe, p.device), _run(loaded, probe, p.device)
    if want.shape != got.shape:
        return (f"the reloaded model's output has shape {list(got.shape)}, "
                f"the pruned model's {list(want.shape)}")
    fp32 = p.dtype in (torch.float32, torch.float64)
    tol = _ATOL if fp32 else 8 * torch.finfo(p.dtype).eps * max(1.0, float(want.abs().max()))
    diff = float((want - got).abs().max()) if want.numel() else 0.0
    if not diff <= tol:
        return f"the reloaded model's output differs from the pruned model's by {diff:.3g} (> {tol:.3g})"
    return None


def save_pretrained_pruned(model: PreTrainedModel, out_dir: str | Path,
                           probe: dict[str, Any] | None = None) -> str | None:
    """Save the pruned `model` (a transformers.PreTrainedModel) so that the matching Auto class
    (AutoModelForCausalLM / ForMaskedLM / ForSequenceClassification / AutoModel ..., from the
    model's class name) loads it from `out_dir` with the same output.

    The config comes from `fit_hf_config`; the weights are written as safetensors to a temporary
    sibling of `out_dir`, reloaded with `from_pretrained(..., local_files_only=True)` in the
    model's dtype and attention implementation, and run on `probe` (keyword inputs; default:
    input_ids of shape (2, 8) over the vocabulary) beside the in-memory model, both in eval mode
    under no_grad (the model's train/eval mode is restored; statistics hooks on it see this one
    forward). When the logits (or last_hidden_state) agree to 1e-5 (fp32; 8 ulps of the output's
    scale in half precision) the folder is renamed to `out_dir` and None is returned. Otherwise a
    one-line reason is returned and nothing is left behind. `model.config` is not changed.

    Raises FileExistsError when `out_dir` exists and is not an empty folder. Errors writing
    the folder (disk full, permissions) are raised after the temporary folder is removed."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: exists and is not an empty folder; "
                              "save_pretrained_pruned never overwrites")
    from secateur.pruning.tracing import unwrap
    model = unwrap(model)
    try:
        cfg = _fit(model)
        auto = _auto_class(model)
    except _Misfit as e:
        return str(e)
    probe = _default_probe(model) if probe is None else probe
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        cfg.architectures = [type(model).__name__]
        old = model.config
        model.config = cfg
        try:
            model.save_pretrained(tmp, safe_serialization=True)
        finally:
            model.config = old
        why = _reload_mismatch(model, auto, tmp, probe)
        if why is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            return why
        if out.exists():
            if any(out.iterdir()):   # filled while we were writing
                raise FileExistsError(f"{out}: became non-empty while saving; "
                                      "save_pretrained_pruned never overwrites")
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return None
