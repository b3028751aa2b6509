"""The measuring pieces of benchmarks/transformer_perf.py: FLOPs of a training step counted by
FlopCounterMode (matrix products by hand, CPU flash attention through the script's own formulas),
paired ratios, and the widths a uniform Pruner event leaves in a grouped-query LLaMA."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "transformer_perf.py"


@pytest.fixture(scope="module")
def tp():
    threads = torch.get_num_threads()       # the benchmarks' common module pins one thread
    spec = importlib.util.spec_from_file_location("transformer_perf", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod            # its dataclass looks its module up there
    spec.loader.exec_module(mod)
    torch.set_num_threads(threads)
    return mod


def test_step_flops_of_linear_layers(tp):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(5, 8)
    flops = tp.step_flops(net, x, lambda m, inp: m(inp).square().mean())
    forward = 2 * 5 * (8 * 16 + 16 * 4)
    # backward: weight and input gradients of the second layer, weight gradient only of the first
    backward = 2 * 5 * (2 * 16 * 4 + 8 * 16)
    assert flops == forward + backward
    assert all(p.grad is None for p in net.parameters())


def test_step_flops_counts_cpu_flash_attention(tp):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # the pinned torch has the op; FlopCounterMode does not count it, so the benchmark must
    assert tp.cpu_attention_flops(), "this torch has no CPU flash-attention op"
    b, h, s, d = 2, 3, 10, 4
    q, k, v = (torch.randn(b, h, s, d, requires_grad=True) for _ in range(3))

    def loss(_: nn.Module, inputs: tuple) -> torch.Tensor:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(*inputs, is_causal=True).sum()
    flops = tp.step_flops(nn.Module(), (q, k, v), loss)
    assert flops == 2 * b * h * s * s * (d + d) + 2 * b * h * s * s * (3 * d + 2 * d)


def test_paired_ratio(tp):
    assert tp.paired_ratio([2.0, 4.0, 6.0], [1.0, 2.0, 2.0]) == 2.0
    with pytest.raises(ValueError, match="equally long"):
        tp.paired_ratio([1.0], [1.0, 2.0])


def test_uniform_event_on_grouped_query_llama(tp):
    pytest.importorskip("transformers")
    setup = tp.Setup("toy", batch=2, seq=8)
    ids = tp.token_batch(setup)
    model = tp.build_llama("toy")
    dense = tp.step_flops(model, ids, tp.lm_loss)
    assert tp.llama_widths(model) == {"q_heads": 4, "kv_heads": 2, "mlp": 128}
    tp.prune_llama(model, ids, 0.5).close()
    # one of two key/value heads goes with its two query heads; half of the MLP neurons
    assert tp.llama_widths(model) == {"q_heads": 2, "kv_heads": 1, "mlp": 64}
    assert tp.step_flops(model, ids, tp.lm_loss) < dense
    tp.train_step(model, ids)()
