"""Coupled unit axes of traced models, each pinned by an oracle that does not use secateur:

- silent units: units whose consumer weights are zero (and whose producer rows are tiny, so the L2
  criterion picks them) are the ones removed, and the model's output is unchanged;
- a hand-pruned reference: for norms that mix channels (LayerNorm, RMSNorm, GroupNorm) a model
  built at the smaller width with the kept rows/columns copied by hand gives the same output;
- shapes, size attributes and kept tensors equal what slicing by hand gives;
- an optimizer step right after the prune works.

Every model here is a few lines of fresh torch with tiny shapes. Widths expected after a prune are
derived by hand from the rule: a ratio r removes floor(r * n) of a group's n units.
"""
import gc
import math
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secateur.pruning import Pruner, Rule

# ---- helpers ----------------------------------------------------------------------------------


def _pruner(model, x, ratio, **kw):
    return Pruner(model, "l2", Rule("ratio", ratio), example_input=x, **kw)


def _groups_producing(pruner, module):
    return [g for g in pruner.groups if any(s.module is module for s in g.producers)]


def _name_of_group(model, x, module, **kw):
    """Name of the (single) traced group whose producers include `module`."""
    probe = _pruner(model, x, 0.3, **kw)
    found = _groups_producing(probe, module)
    names = [g.name for g in probe.groups]
    probe.close()
    assert len(found) == 1, f"groups produced by {type(module).__name__}: {len(found)}; groups: {names}"
    return found[0].name


def _prune_group_of(model, x, module, ratio, optimizer=None, **kw):
    """Prune only the group whose producers include `module` (through the public `layers=`)."""
    name = _name_of_group(model, x, module, **kw)
    pr = _pruner(model, x, ratio, layers=[name], **kw)
    assert [g.name for g in pr.groups] == [name]
    report = pr.prune(optimizer)
    pr.close()
    return report


def _flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = [v for v in out.values() if isinstance(v, torch.Tensor)]
    return [t for o in out for t in _flat(o)]


def _assert_same(after, before, rtol=1e-5):
    a, b = _flat(after), _flat(before)
    assert len(a) == len(b)
    for u, v in zip(a, b):
        assert u.shape == v.shape, f"output shape {tuple(u.shape)} != {tuple(v.shape)}"
        err = (u - v).abs().max().item()
        assert err <= rtol * max(1.0, v.abs().max().item()), f"output changed by {err:.3g}"


def _run(model, x):
    with torch.no_grad():
        if isinstance(x, dict):
            return model(**x)
        return model(x)


def _removed_by_l2(row_norms, ratio):
    """Units the L2 rule removes: the floor(ratio * n) smallest norms (ties by index)."""
    n = row_norms.numel()
    k = int(math.floor(ratio * n + 1e-9))
    return torch.sort(row_norms.double(), stable=True).indices[:k]


def _kept_by_l2(row_norms, ratio):
    gone = set(_removed_by_l2(row_norms, ratio).tolist())
    return torch.tensor([u for u in range(row_norms.numel()) if u not in gone], dtype=torch.long)


def _recorded(fn):
    """(fn's result, messages of the RuntimeWarnings it raised)."""
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(w.message) for w in rec if issubclass(w.category, RuntimeWarning)]


def _train_steps(model, x, opt, n=1):
    for _ in range(n):
        loss = sum(o.float().pow(2).mean() for o in _flat(model(x)))
        loss.backward()
        for p in model.parameters():
            assert p.grad is None or p.grad.shape == p.shape
        opt.step()
        opt.zero_grad()
    return loss


# ---- 1. training right after a prune ----------------------------------------------------------


class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8, 12)
        self.fc2 = nn.Linear(12, 4)

    def forward(self, x):
        h = F.relu(self.bn(self.conv(x))).mean((2, 3))
        return self.fc2(F.relu(self.fc1(h)))


def test_adam_adamw_and_sgd_train_right_after_prune_while_the_last_loss_is_alive():
    """No gc.collect() anywhere: the last training `loss` and a never-backwarded loss keep the
    parameters' gradient accumulators alive across the prune; the next backward must not see the
    old shapes ("invalid gradient ... got [8, ...] but expected [6, ...]")."""
    makers = {"Adam": lambda p: torch.optim.Adam(p, 1e-2),
              "AdamW": lambda p: torch.optim.AdamW(p, 1e-2),
              "SGD(momentum)": lambda p: torch.optim.SGD(p, 0.05, momentum=0.9)}
    failures = []
    for name, make in makers.items():
        torch.manual_seed(0)
        model, x, y = _ConvNet().train(), torch.randn(4, 3, 5, 5), torch.randint(0, 4, (4,))
        opt = make(model.parameters())
        pruner = _pruner(model, x, 0.25)              # traced at step 0, before training
        for _ in range(3):
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
        pending = F.cross_entropy(model(x), y)        # a graph that is never backwarded
        params = list(model.parameters())
        pruner.prune(opt)
        pruner.close()
        assert model.conv.out_channels == 6 and model.fc1.out_features == 9, name
        try:
            for _ in range(2):
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad()
        except RuntimeError as e:
            failures.append(f"{name}: {' '.join(str(e).split())[:160]}")
            continue
        assert list(model.parameters()) == params, f"{name}: parameters were replaced"
        for p in params:
            for k, v in opt.state[p].items():
                if torch.is_tensor(v) and v.dim() > 0:
                    assert v.shape == p.shape, f"{name}: state {k} {tuple(v.shape)} vs {tuple(p.shape)}"
        assert torch.isfinite(loss) and pending.requires_grad
    assert not failures, "; ".join(failures)


def test_pruner_keeps_the_inner_model_and_no_reference_to_its_wrapper():
    torch.manual_seed(0)
    model, x = _ConvNet().eval(), torch.randn(2, 3, 5, 5)
    wrapper = nn.DataParallel(model)
    gone = weakref.ref(wrapper)
    pruner = _pruner(wrapper, x, 0.25)
    assert pruner.model is model
    del wrapper
    gc.collect()
    assert gone() is None, "the Pruner (or its groups/criterion) still references the DataParallel wrapper"
    pruner.prune()
    assert model.conv.out_channels == 6


# ---- 2. depthwise and grouped convolutions -----------------------------------------------------


class _DepthwiseNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn2 = nn.BatchNorm2d(8)
        self.pw = nn.Conv2d(8, 6, 1)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv(x)))
        h = F.relu(self.bn2(self.dw(h)))
        return self.head(F.relu(self.pw(h)).mean((2, 3)))


def test_depthwise_conv_follows_its_producer_and_stays_depthwise():
    torch.manual_seed(0)
    model, x = _DepthwiseNet().eval(), torch.randn(2, 3, 6, 6)
    silent = torch.tensor([1, 6])
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
        model.pw.weight[:, silent] = 0
        model.conv.weight[silent] *= 1e-3
        dw_before = model.dw.weight.clone()
        before = _run(model, x)
    _prune_group_of(model, x, model.conv, 0.25)
    keep = torch.tensor([0, 2, 3, 4, 5, 7])
    dw = model.dw
    assert dw.weight.shape == (6, 1, 3, 3)
    assert dw.groups == dw.in_channels == dw.out_channels == 6
    assert torch.equal(dw.weight, dw_before[keep])
    assert model.bn2.num_features == 6 and model.pw.in_channels == 6
    _assert_same(_run(model, x), before)


class _GroupedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.gconv = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.c = nn.Conv2d(8, 6, 1)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = F.relu(self.gconv(F.relu(self.a(x))))
        return self.head(F.relu(self.c(h)).mean((2, 3)))


def test_grouped_conv_is_left_untouched_with_a_warning_while_other_groups_prune():
    torch.manual_seed(0)
    model, x = _GroupedNet().eval(), torch.randn(2, 3, 5, 5)
    pruner, msgs = _recorded(lambda: _pruner(model, x, 0.5))
    assert any("gconv" in m and "groups=2" in m for m in msgs), msgs
    assert not _groups_producing(pruner, model.a) and not _groups_producing(pruner, model.gconv)
    assert len(_groups_producing(pruner, model.c)) == 1
    pruner.prune()
    assert model.a.out_channels == 8 and model.gconv.weight.shape == (8, 4, 3, 3)
    assert model.c.out_channels == 3 and model.head.in_features == 3
    assert _run(model, x).shape == (2, 3)


# ---- 3. concatenation, chunk, GLU, reshape -----------------------------------------------------


class _TwoBranches(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 6, 3, padding=1)
        self.c = nn.Conv2d(10, 5, 1)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], 1)
        return self.head(F.relu(self.c(h)).mean((2, 3)))


def test_concat_branches_cut_consumer_columns_at_their_offsets():
    torch.manual_seed(0)
    model, x = _TwoBranches().eval(), torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        model.a.weight[2] *= 1e-3                  # branch a, unit 2 -> c column 2
        model.c.weight[:, 2] = 0
        model.b.weight[[1, 4]] *= 1e-3             # branch b, units 1, 4 -> c columns 4+1, 4+4
        model.c.weight[:, [5, 8]] = 0
        c_before = model.c.weight.clone()
        before = _run(model, x)
    names = [_name_of_group(model, x, model.a), _name_of_group(model, x, model.b)]
    pr = _pruner(model, x, 0.34, layers=names)     # a: floor(1.36) = 1 of 4; b: floor(2.04) = 2 of 6
    pr.prune()
    assert model.a.out_channels == 3 and model.b.out_channels == 4 and model.c.in_channels == 7
    cols = torch.tensor([0, 1, 3, 4, 6, 7, 9])
    assert torch.equal(model.c.weight, c_before[:, cols])
    _assert_same(_run(model, x), before)


class _SelfConcat(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(5, 8)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        h = F.relu(self.fc1(x))
        return self.fc2(torch.cat([h, h], -1))


def test_tensor_concatenated_with_itself_unit_owns_columns_u_and_n_plus_u():
    torch.manual_seed(0)
    model, x = _SelfConcat().eval(), torch.randn(4, 5)
    with torch.no_grad():
        model.fc1.weight[[3, 5]] *= 1e-3
        model.fc2.weight[:, [3, 5, 11, 13]] = 0
        w2 = model.fc2.weight.clone()
        before = _run(model, x)
    _prune_group_of(model, x, model.fc1, 0.25)
    keep = torch.tensor([0, 1, 2, 4, 6, 7])
    assert model.fc1.out_features == 6 and model.fc2.in_features == 12
    assert torch.equal(model.fc2.weight, w2[:, torch.cat([keep, keep + 8])])
    _assert_same(_run(model, x), before)


class _FusedSwiGLU(nn.Module):
    def __init__(self, d=6, h=8):
        super().__init__()
        self.w12 = nn.Linear(d, 2 * h)
        self.w3 = nn.Linear(h, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        gate, up = self.w12(x).chunk(2, -1)
        return self.head(x + self.w3(F.silu(gate) * up))


def test_fused_gate_up_chunked_into_swiglu_unit_owns_rows_u_and_h_plus_u():
    torch.manual_seed(0)
    model, x = _FusedSwiGLU().eval(), torch.randn(2, 3, 6)
    with torch.no_grad():
        model.w12.weight[[0, 7, 8, 15]] *= 1e-3
        model.w3.weight[:, [0, 7]] = 0
        w12 = model.w12.weight.clone()
        before = _run(model, x)
    _prune_group_of(model, x, model.w12, 0.25)
    keep = torch.arange(1, 7)
    assert model.w12.out_features == 12 and model.w3.in_features == 6
    assert torch.equal(model.w12.weight, w12[torch.cat([keep, keep + 8])])
    _assert_same(_run(model, x), before)


class _GLULinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 12)
        self.glu = nn.GLU(-1)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(self.glu(self.fc(x)))


class _GLUConv1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Conv1d(3, 12, 3, padding=1)
        self.glu = nn.GLU(dim=1)
        self.out = nn.Conv1d(6, 4, 1)

    def forward(self, x):
        return self.out(self.glu(self.fc(x))).mean(-1)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_glu_halves_couple_unit_u_with_row_h_plus_u(kind):
    torch.manual_seed(0)
    model, x = (_GLULinear(), torch.randn(4, 5)) if kind == "linear" else (_GLUConv1d(), torch.randn(2, 3, 7))
    model.eval()
    with torch.no_grad():
        model.fc.weight[[2, 8]] *= 1e-3
        model.out.weight[:, 2] = 0
        w = model.fc.weight.clone()
        before = _run(model, x)
    _prune_group_of(model, x, model.fc, 0.2)         # floor(1.2) = 1 of 6 units
    keep = torch.tensor([0, 1, 3, 4, 5])
    assert model.fc.weight.shape[0] == 10 and model.out.weight.shape[1] == 5
    assert torch.equal(model.fc.weight, w[torch.cat([keep, keep + 6])])
    _assert_same(_run(model, x), before)


class _LinearToConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 4 * 2 * 2)
        self.conv = nn.Conv2d(4, 3, 1)

    def forward(self, x):
        h = F.relu(self.fc(x)).view(x.shape[0], -1, 2, 2)
        return self.conv(h).flatten(1)


def test_linear_viewed_as_channels_unit_owns_a_block_of_h_times_w_rows():
    torch.manual_seed(0)
    model, x = _LinearToConv().eval(), torch.randn(3, 5)
    with torch.no_grad():
        model.fc.weight[4:8] *= 1e-3                # channel 1 = rows 4..7
        model.conv.weight[:, 1] = 0
        w = model.fc.weight.clone()
        before = _run(model, x)
    _prune_group_of(model, x, model.fc, 0.25)
    assert model.conv.in_channels == 3 and model.fc.out_features == 12
    assert torch.equal(model.fc.weight, torch.cat([w[:4], w[8:]]))
    _assert_same(_run(model, x), before)


class _ConvToLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 3 * 3, 3)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).flatten(1))


def test_conv_flattened_into_linear_unit_owns_a_block_of_columns():
    torch.manual_seed(0)
    model, x = _ConvToLinear().eval(), torch.randn(2, 3, 3, 3)
    with torch.no_grad():
        model.conv.weight[2] *= 1e-3
        model.fc.weight[:, 18:27] = 0
        w = model.fc.weight.clone()
        before = _run(model, x)
    _prune_group_of(model, x, model.conv, 0.25)
    assert model.conv.out_channels == 3 and model.fc.in_features == 27
    assert torch.equal(model.fc.weight, torch.cat([w[:, :18], w[:, 27:]], 1))
    _assert_same(_run(model, x), before)


# ---- 4. attention in whole heads --------------------------------------------------------------


class _BertLikeSelf(nn.Module):
    """q/k/v with a head_dim attribute; the output projection lives in the parent (as in BERT)."""

    def __init__(self, d=12, heads=3):
        super().__init__()
        self.num_attention_heads, self.head_dim, self.all_head_size = heads, d // heads, d
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        B, T, _ = x.shape

        def split(t):
            return t.view(B, T, self.num_attention_heads, self.head_dim).transpose(1, 2)
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        a = torch.softmax(q @ k.transpose(-1, -2) / self.head_dim ** 0.5, -1)
        return (a @ v).transpose(1, 2).reshape(B, T, self.all_head_size)


class _BertLike(nn.Module):
    def __init__(self, d=12):
        super().__init__()
        self.inp = nn.Linear(5, d)
        self.attn = _BertLikeSelf(d)
        self.dense = nn.Linear(d, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.inp(x)
        return self.head(h + self.dense(self.attn(h)))


def test_separate_qkv_heads_bert_like_silent_head_removed_and_counts_updated():
    torch.manual_seed(0)
    model, x = _BertLike().eval(), torch.randn(2, 4, 5)
    at = model.attn
    with torch.no_grad():
        model.dense.weight[:, 4:8] = 0
        for p in (at.query, at.key, at.value):
            p.weight[4:8] *= 1e-3
            p.bias[4:8] *= 1e-3
        before = _run(model, x)
    _prune_group_of(model, x, at.query, 0.34)       # floor(1.02) = 1 of 3 heads
    assert (at.query.out_features, at.key.out_features, at.value.out_features) == (8, 8, 8)
    assert model.dense.in_features == 8
    assert at.num_attention_heads == 2 and at.all_head_size == 8 and at.head_dim == 4
    _assert_same(_run(model, x), before)


class _GQA(nn.Module):
    def __init__(self, d=16, hd=4, nq=4, nkv=2):
        super().__init__()
        self.head_dim, self.num_heads, self.num_kv_heads = hd, nq, nkv
        self.q_proj = nn.Linear(d, nq * hd, bias=False)
        self.k_proj = nn.Linear(d, nkv * hd, bias=False)
        self.v_proj = nn.Linear(d, nkv * hd, bias=False)
        self.o_proj = nn.Linear(nq * hd, d, bias=False)

    def forward(self, x):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        r = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(r, 1), v.repeat_interleave(r, 1)
        a = torch.softmax(q @ k.transpose(-1, -2) / self.head_dim ** 0.5, -1)
        return self.o_proj((a @ v).transpose(1, 2).reshape(B, T, -1))


class _Residual(nn.Module):
    """inp -> h + attn(h) -> head: a host for one attention module."""

    def __init__(self, attn, d):
        super().__init__()
        self.inp = nn.Linear(5, d)
        self.attn = attn
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.inp(x)
        return self.head(h + self.attn(h))


def test_gqa_kv_head_leaves_with_its_query_heads():
    torch.manual_seed(0)
    model, x = _Residual(_GQA(16), 16).eval(), torch.randn(2, 5, 5)
    at = model.attn
    with torch.no_grad():                   # KV head 1 serves query heads 2, 3 (rows 8..15)
        at.o_proj.weight[:, 8:16] = 0
        at.q_proj.weight[8:16] *= 1e-3
        at.k_proj.weight[4:8] *= 1e-3
        at.v_proj.weight[4:8] *= 1e-3
        q0, k0 = at.q_proj.weight.clone(), at.k_proj.weight.clone()
        before = _run(model, x)
    _prune_group_of(model, x, at.q_proj, 0.5)
    w = (at.q_proj.out_features, at.k_proj.out_features, at.v_proj.out_features, at.o_proj.in_features)
    assert w == (8, 4, 4, 8)
    assert (at.num_heads, at.num_kv_heads) == (2, 1) and at.num_heads % at.num_kv_heads == 0
    assert torch.equal(at.q_proj.weight, q0[:8]) and torch.equal(at.k_proj.weight, k0[:4])
    _assert_same(_run(model, x), before)


class _FusedQKV(nn.Module):
    """timm-style: one qkv Linear reshaped to (B, N, 3, num_heads, head_dim)."""

    def __init__(self, d=12, num_heads=3):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, d // num_heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        a = torch.softmax(q @ k.transpose(-2, -1) * self.head_dim ** -0.5, -1)
        return self.proj((a @ v).transpose(1, 2).reshape(B, N, -1))


def test_fused_qkv_prunes_whole_heads_and_updates_num_heads():
    torch.manual_seed(0)
    model, x = _Residual(_FusedQKV(12), 12).eval(), torch.randn(2, 4, 5)
    at = model.attn
    rows = torch.tensor([4, 5, 6, 7])
    with torch.no_grad():                   # head 1: q rows 4..7, k rows 16..19, v rows 28..31
        at.proj.weight[:, rows] = 0
        at.qkv.weight[torch.cat([rows, rows + 12, rows + 24])] *= 1e-3
        w = at.qkv.weight.clone()
        before = _run(model, x)
    _prune_group_of(model, x, at.qkv, 0.34)
    assert at.qkv.out_features == 24 and at.proj.in_features == 8 and at.num_heads == 2
    keep = torch.tensor([0, 1, 2, 3, 8, 9, 10, 11])
    assert torch.equal(at.qkv.weight, w[torch.cat([keep, keep + 12, keep + 24])])
    _assert_same(_run(model, x), before)


def _transformers():
    return pytest.importorskip("transformers")


def _hf(cls, cfg):
    cfg._attn_implementation = "eager"
    cfg.use_cache = False
    torch.manual_seed(0)
    return cls(cfg).eval()


@pytest.mark.parametrize("cls_name", ["BertModel", "BertForSequenceClassification"])
def test_hf_bert_silent_head_is_removed_with_output_unchanged(cls_name):
    T = _transformers()
    cfg = T.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=4,
                       intermediate_size=24, max_position_embeddings=16, num_labels=3)
    model, ids = _hf(getattr(T, cls_name), cfg), torch.randint(0, 40, (1, 6))
    bert = model if cls_name == "BertModel" else model.bert
    layer = bert.encoder.layer[0].attention
    sa, dense = layer.self, layer.output.dense
    with torch.no_grad():                   # head 2 of 4 (head_dim 4): rows/columns 8..11
        dense.weight[:, 8:12] = 0
        for p in (sa.query, sa.key, sa.value):
            p.weight[8:12] *= 1e-3
            p.bias[8:12] *= 1e-3
        before = _run(model, ids)
    _prune_group_of(model, ids, sa.query, 0.25)
    assert (sa.query.out_features, sa.key.out_features, sa.value.out_features, dense.in_features) == (12,) * 4
    assert sa.num_attention_heads == 3 and sa.all_head_size == 12 and sa.attention_head_size == 4
    _assert_same(_run(model, ids), before)


def test_hf_llama_gqa_prunes_a_kv_head_with_its_query_heads():
    T = _transformers()
    cfg = T.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16)
    model, ids = _hf(T.LlamaForCausalLM, cfg), torch.randint(0, 40, (1, 6))
    at = model.model.layers[0].self_attn
    with torch.no_grad():                   # head_dim 4: KV head 1 = k/v rows 4..7, q rows 8..15
        at.o_proj.weight[:, 8:16] = 0
        at.q_proj.weight[8:16] *= 1e-3
        at.k_proj.weight[4:8] *= 1e-3
        at.v_proj.weight[4:8] *= 1e-3
        before = _run(model, ids).logits
    _prune_group_of(model, ids, at.q_proj, 0.5)
    w = (at.q_proj.out_features, at.k_proj.out_features, at.v_proj.out_features, at.o_proj.in_features)
    assert w == (8, 4, 4, 8)
    nq, nkv = w[0] // at.head_dim, w[1] // at.head_dim
    assert nq % nkv == 0 and at.num_key_value_groups == nq // nkv
    _assert_same(_run(model, ids).logits, before)


def test_hf_gpt2_conv1d_fused_c_attn_prunes_whole_heads_and_updates_split_size():
    T = _transformers()
    cfg = T.GPT2Config(vocab_size=40, n_embd=16, n_layer=1, n_head=2, n_positions=16)
    model, ids = _hf(T.GPT2LMHeadModel, cfg), torch.randint(0, 40, (1, 6))
    at = model.transformer.h[0].attn
    cols = torch.arange(8, 16)              # head 1 (head_dim 8); Conv1D weights are (in, out)
    with torch.no_grad():
        at.c_proj.weight[cols] = 0
        qkv_cols = torch.cat([cols, cols + 16, cols + 32])
        at.c_attn.weight[:, qkv_cols] *= 1e-3
        at.c_attn.bias[qkv_cols] *= 1e-3
        before = _run(model, ids).logits
    _prune_group_of(model, ids, at.c_attn, 0.5)
    assert at.c_attn.weight.shape == (16, 24) and at.c_attn.nf == 24
    assert at.c_proj.weight.shape == (8, 16) and at.c_proj.nx == 8
    assert at.num_heads == 1 and at.split_size == 8 and at.head_dim == 8
    _assert_same(_run(model, ids).logits, before)


class _MHABlock(nn.Module):
    def __init__(self, d=8, hidden=12):
        super().__init__()
        self.inp = nn.Linear(5, d)
        self.mha = nn.MultiheadAttention(d, 2, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.mha(h, h, h, need_weights=False)[0]
        h = h + self.fc2(F.relu(self.fc1(h)))
        return self.head(h)


def test_multihead_attention_loses_a_silent_head_whole_and_still_trains():
    from secateur.pruning.mha import PrunedMultiheadAttention
    torch.manual_seed(0)
    model, x = _MHABlock().eval(), torch.randn(2, 4, 5)
    mha = model.mha                                  # 2 heads of 4; in_proj rows [q | k | v]
    with torch.no_grad():
        mha.out_proj.weight[:, 4:8] = 0              # head 1 is silent ...
        for part in range(3):                        # ... and its q/k/v rows are the smallest
            mha.in_proj_weight[part * 8 + 4:part * 8 + 8] *= 1e-3
        before = _run(model, x)
    assert "mha" in [g.name for g in _pruner(model, x, 0.5).groups]      # the heads' group
    _pruner(model, x, 0.5, layers=["mha"]).prune()
    assert type(mha) is PrunedMultiheadAttention and mha.num_heads == 1 and mha.head_dim == 4
    assert mha.in_proj_weight.shape == (12, 8) and mha.out_proj.weight.shape == (8, 4)
    _assert_same(_run(model, x), before)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    model.train()
    model(x).pow(2).mean().backward()
    opt.step()


@pytest.mark.parametrize("batch_first", [True, False])
def test_pruned_multihead_attention_forward_equals_torch_before_any_cut(batch_first):
    from secateur.pruning.mha import PrunedMultiheadAttention
    torch.manual_seed(0)
    m = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    q = torch.randn(2, 5, 16) if batch_first else torch.randn(5, 2, 16)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[0, -1] = True
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    for kw in ({}, {"key_padding_mask": pad}, {"attn_mask": causal}, {"average_attn_weights": False}):
        with torch.no_grad():
            ref = m(q, q, q, **kw)
            m.__class__ = PrunedMultiheadAttention
            got = m(q, q, q, **kw)
            m.__class__ = nn.MultiheadAttention
        torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[1], ref[1], atol=1e-5, rtol=1e-5)


# ---- 5. the hidden (residual) dimension ---------------------------------------------------------


class _TiedLM(nn.Module):
    def __init__(self, vocab=20, d=8, hidden=12):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.fc2(F.relu(self.fc1(h)))
        return self.lm_head(h)


def test_tied_embeddings_stay_tied_and_keep_the_vocabulary():
    torch.manual_seed(0)
    model, ids = _TiedLM().eval(), torch.randint(0, 20, (2, 5))
    silent = [1, 6]
    with torch.no_grad():           # residual channels 1 and 6 are zero everywhere
        model.embed.weight[:, silent] = 0
        model.fc2.weight[silent] = 0
        model.fc2.bias[silent] = 0
        before = _run(model, ids)
    _prune_group_of(model, ids, model.embed, 0.25)
    assert model.lm_head.weight is model.embed.weight
    assert model.embed.weight.shape == (20, 6) and model.embed.num_embeddings == 20
    assert model.embed.embedding_dim == 6 and model.lm_head.in_features == 6
    assert model.lm_head.out_features == 20 and model.fc1.in_features == 6 and model.fc2.out_features == 6
    _assert_same(_run(model, ids), before)


class _LlamaStyleRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, h):
        var = h.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (h.float() * torch.rsqrt(var + self.variance_epsilon)).to(h.dtype)


def _make_norm(kind, d):
    return {"layernorm": lambda: nn.LayerNorm(d),
            "torch_rmsnorm": lambda: nn.RMSNorm(d),
            "custom_rmsnorm": lambda: _LlamaStyleRMSNorm(d)}[kind]()


class _NormNet(nn.Module):
    def __init__(self, norm, d=8):
        super().__init__()
        self.inp = nn.Linear(5, d)
        self.norm = norm
        self.fc = nn.Linear(d, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(F.relu(self.fc(self.norm(self.inp(x)))))


@pytest.mark.parametrize("kind", ["layernorm", "torch_rmsnorm", "custom_rmsnorm"])
def test_channel_mixing_norm_matches_a_hand_pruned_reference(kind):
    torch.manual_seed(0)
    model, x = _NormNet(_make_norm(kind, 8)).eval(), torch.randn(4, 5)
    with torch.no_grad():
        for p in model.norm.parameters():
            p.uniform_(0.5, 1.5)
    keep = _kept_by_l2(model.inp.weight.detach().norm(dim=1), 0.3)     # 6 of 8
    ref = _NormNet(_make_norm(kind, len(keep)), len(keep)).eval()
    with torch.no_grad():
        ref.inp.weight.copy_(model.inp.weight[keep])
        ref.inp.bias.copy_(model.inp.bias[keep])
        for name, p in ref.norm.named_parameters():
            p.copy_(getattr(model.norm, name)[keep])
        ref.fc.weight.copy_(model.fc.weight[:, keep])
        ref.fc.bias.copy_(model.fc.bias)
        ref.out.load_state_dict(model.out.state_dict())
    _prune_group_of(model, x, model.inp, 0.3)
    assert model.inp.out_features == 6 and model.fc.in_features == 6
    assert all(p.shape == (6,) for p in model.norm.parameters())
    if kind != "custom_rmsnorm":
        assert tuple(model.norm.normalized_shape) == (6,)
    _assert_same(_run(model, x), _run(ref, x))


class _ConvNorm(nn.Module):
    """conv -> norm -> relu -> 1x1 conv -> pool -> linear, for one norm over the conv's channels."""

    def __init__(self, norm, c):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.norm = norm
        self.conv2 = nn.Conv2d(c, 4, 1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = F.relu(self.norm(self.conv(x)))
        return self.head(F.relu(self.conv2(h)).mean((2, 3)))


def test_groupnorm_prunes_whole_groups_and_matches_a_hand_pruned_reference():
    torch.manual_seed(0)
    model, x = _ConvNorm(nn.GroupNorm(4, 8), 8).eval(), torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.bias.uniform_(-0.5, 0.5)
    unit_norms = model.conv.weight.detach().reshape(4, -1).norm(dim=1)   # a unit = 2 channels
    kept_groups = _kept_by_l2(unit_norms, 0.5)                          # 2 of 4 groups
    ch = torch.stack([2 * kept_groups, 2 * kept_groups + 1], 1).reshape(-1)
    ref = _ConvNorm(nn.GroupNorm(2, 4), 4).eval()
    with torch.no_grad():
        ref.conv.weight.copy_(model.conv.weight[ch])
        ref.conv.bias.copy_(model.conv.bias[ch])
        ref.norm.weight.copy_(model.norm.weight[ch])
        ref.norm.bias.copy_(model.norm.bias[ch])
        ref.conv2.weight.copy_(model.conv2.weight[:, ch])
        ref.conv2.bias.copy_(model.conv2.bias)
        ref.head.load_state_dict(model.head.state_dict())
    name = _name_of_group(model, x, model.conv)
    pr = _pruner(model, x, 0.5, layers=[name])
    assert pr.groups[0].size == 4
    pr.prune()
    assert model.norm.num_groups == 2 and model.norm.num_channels == 4
    assert model.norm.num_channels // model.norm.num_groups == 2
    assert model.conv.out_channels == 4 and model.conv2.in_channels == 4
    _assert_same(_run(model, x), _run(ref, x))


def test_batchnorm_running_statistics_are_sliced_with_the_units():
    torch.manual_seed(0)
    model, x = _ConvNorm(nn.BatchNorm2d(6), 6).train(), torch.randn(4, 3, 4, 4)
    with torch.no_grad():
        for _ in range(3):
            model(x + torch.randn_like(x))
        model.norm.weight.uniform_(0.5, 1.5)
    model.eval()
    bn = model.norm
    old = {k: getattr(bn, k).detach().clone() for k in ("running_mean", "running_var", "weight", "bias")}
    batches = int(bn.num_batches_tracked)
    keep = _kept_by_l2(model.conv.weight.detach().flatten(1).norm(dim=1), 0.34)   # 4 of 6
    _prune_group_of(model, x, model.conv, 0.34)
    assert bn.num_features == 4 and int(bn.num_batches_tracked) == batches == 3
    for k, v in old.items():
        assert torch.equal(getattr(bn, k), v[keep]), k
    assert _run(model, x).shape == (4, 3)


class _TinyViT(nn.Module):
    def __init__(self, d=8, hidden=12):
        super().__init__()
        self.patch = nn.Conv2d(3, d, 2, stride=2)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d))
        self.pos_embed = nn.Parameter(torch.randn(1, 5, d))
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)
        self.head = nn.Linear(d, 3)

    def forward(self, img):
        x = self.patch(img).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        x = x + self.fc2(F.gelu(self.fc1(x)))
        return self.head(x[:, 0])


def test_class_token_and_position_embedding_shrink_with_the_hidden_width():
    torch.manual_seed(0)
    model, x = _TinyViT().eval(), torch.randn(2, 3, 4, 4)
    silent = [3, 5]
    with torch.no_grad():           # hidden channels 3, 5 are zero everywhere in the residual stream
        model.patch.weight[silent] = 0
        model.patch.bias[silent] = 0
        model.cls_token[..., silent] = 0
        model.pos_embed[..., silent] = 0
        model.fc2.weight[silent] = 0
        model.fc2.bias[silent] = 0
        pos = model.pos_embed.clone()
        before = _run(model, x)
    _prune_group_of(model, x, model.patch, 0.25)
    assert model.cls_token.shape == (1, 1, 6) and model.pos_embed.shape == (1, 5, 6)
    assert torch.equal(model.pos_embed, pos[..., [0, 1, 2, 4, 6, 7]])
    assert model.patch.out_channels == 6 and model.fc1.in_features == 6 and model.head.in_features == 6
    _assert_same(_run(model, x), before)


# ---- 6. layer kinds ---------------------------------------------------------------------------


class _ConvPair(nn.Module):
    def __init__(self, conv, dims):
        super().__init__()
        self.a = conv(3, 6, 3, padding=1)
        self.b = conv(6, 4, 1)
        self.dims = dims

    def forward(self, x):
        return self.b(F.relu(self.a(x))).mean(self.dims)


@pytest.mark.parametrize("kind", ["conv1d", "conv3d"])
def test_conv1d_and_conv3d_silent_channels_removed_with_output_unchanged(kind):
    torch.manual_seed(0)
    if kind == "conv1d":
        model, x = _ConvPair(nn.Conv1d, (2,)), torch.randn(2, 3, 5)
    else:
        model, x = _ConvPair(nn.Conv3d, (2, 3, 4)), torch.randn(2, 3, 3, 3, 3)
    model.eval()
    with torch.no_grad():
        model.a.weight[[0, 4]] *= 1e-3
        model.b.weight[:, [0, 4]] = 0
        before = _run(model, x)
    _prune_group_of(model, x, model.a, 0.34)
    assert model.a.out_channels == 4 and model.b.in_channels == 4
    assert model.a.weight.shape[:2] == (4, 3) and model.b.weight.shape[:2] == (4, 4)
    _assert_same(_run(model, x), before)


class _Transposed(nn.Module):
    def __init__(self, convt, conv):
        super().__init__()
        self.a = conv(3, 6, 1)
        self.up = convt(6, 5, 2, stride=2)       # weight (in=6, out=5, ...)
        self.b = conv(5, 4, 1)

    def forward(self, x):
        return self.b(F.relu(self.up(F.relu(self.a(x)))))


@pytest.mark.parametrize("dim", [1, 2])
def test_conv_transpose_cuts_outputs_on_weight_axis_1_and_inputs_on_axis_0(dim):
    torch.manual_seed(0)
    convt, conv = (nn.ConvTranspose1d, nn.Conv1d) if dim == 1 else (nn.ConvTranspose2d, nn.Conv2d)
    model, x = _Transposed(convt, conv).eval(), torch.randn((2, 3) + (3,) * dim)
    with torch.no_grad():
        model.a.weight[[1, 5]] *= 1e-3          # a's units 1, 5 -> up's input rows 1, 5
        model.up.weight[[1, 5]] = 0
        model.up.weight[:, 2] *= 1e-3           # up's unit 2 -> b's column 2
        model.b.weight[:, 2] = 0
        w = model.up.weight.clone()
        before = _run(model, x)
    names = [_name_of_group(model, x, model.a), _name_of_group(model, x, model.up)]
    _pruner(model, x, 0.34, layers=names).prune()   # a: 2 of 6; up: floor(1.7) = 1 of 5
    up = model.up
    assert (up.in_channels, up.out_channels) == (4, 4) and up.weight.shape[:2] == (4, 4)
    assert model.a.out_channels == 4 and model.b.in_channels == 4
    assert torch.equal(up.weight, w[[0, 2, 3, 4]][:, [0, 1, 3, 4]])
    _assert_same(_run(model, x), before)


def test_hf_conv1d_weight_stored_in_by_out_is_cut_on_the_right_axes():
    T = _transformers()
    from transformers.pytorch_utils import Conv1D

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc = Conv1D(8, 5)        # nf=8 outputs, nx=5 inputs: weight (5, 8)
            self.c_proj = Conv1D(3, 8)      # weight (8, 3)

        def forward(self, x):
            return self.c_proj(F.gelu(self.c_fc(x)))

    assert T is not None
    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(2, 4, 5)
    with torch.no_grad():
        model.c_fc.weight.normal_()
        model.c_proj.weight.normal_()
        model.c_fc.weight[:, [2, 7]] *= 1e-3
        model.c_proj.weight[[2, 7]] = 0
        w = model.c_fc.weight.clone()
        before = _run(model, x)
    _prune_group_of(model, x, model.c_fc, 0.25)
    assert model.c_fc.weight.shape == (5, 6) and model.c_fc.nf == 6 and model.c_fc.bias.shape == (6,)
    assert model.c_proj.weight.shape == (6, 3) and model.c_proj.nx == 6
    assert torch.equal(model.c_fc.weight, w[:, [0, 1, 3, 4, 5, 6]])
    _assert_same(_run(model, x), before)


class _EmbedNet(nn.Module):
    def __init__(self, vocab=30, d=8):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.fc = nn.Linear(d, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, ids):
        return self.head(F.relu(self.fc(self.embed(ids))).mean(1))


def test_embedding_is_cut_on_its_feature_axis_never_the_vocabulary():
    torch.manual_seed(0)
    model, ids = _EmbedNet().eval(), torch.randint(0, 30, (2, 5))
    with torch.no_grad():
        model.embed.weight[:, [3, 4]] *= 1e-3
        model.fc.weight[:, [3, 4]] = 0
        w = model.embed.weight.clone()
        before = _run(model, ids)
    _prune_group_of(model, ids, model.embed, 0.25)
    assert model.embed.weight.shape == (30, 6) and model.embed.num_embeddings == 30
    assert model.embed.embedding_dim == 6 and model.fc.in_features == 6
    assert torch.equal(model.embed.weight, w[:, [0, 1, 2, 5, 6, 7]])
    _assert_same(_run(model, ids), before)


# ---- 7. outputs never change size ---------------------------------------------------------------


class _TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(4, 8)
        self.head_a, self.head_b = nn.Linear(8, 3), nn.Linear(8, 2)

    def forward(self, x):
        h = F.relu(self.trunk(x))
        return self.head_a(h), self.head_b(h)


class _OutputFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.out = nn.Linear(6, 3)          # declared first, used last
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 6)

    def forward(self, x):
        return self.out(F.relu(self.fc2(F.relu(self.fc1(x)))))


def test_two_output_heads_keep_their_shapes_when_every_group_prunes():
    torch.manual_seed(0)
    model, x = _TwoHeads().eval(), torch.randn(5, 4)
    _pruner(model, x, 0.5).prune()
    a, b = _run(model, x)
    assert a.shape == (5, 3) and b.shape == (5, 2)
    assert model.trunk.out_features == 4
    assert model.head_a.out_features == 3 and model.head_b.out_features == 2


def test_output_layer_declared_first_keeps_its_outputs():
    torch.manual_seed(0)
    model, x = _OutputFirst().eval(), torch.randn(5, 4)
    _pruner(model, x, 0.5).prune()
    assert _run(model, x).shape == (5, 3) and model.out.out_features == 3
    assert model.fc1.out_features == 4 and model.fc2.out_features == 3


class _MLP3(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 8), nn.Linear(8, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


@pytest.mark.parametrize("by", ["module", "name"])
def test_ignored_layers_keep_their_outputs(by):
    torch.manual_seed(0)
    model, x = _MLP3().eval(), torch.randn(5, 4)
    ignored = [model.fc1] if by == "module" else ["fc1"]
    pr = _pruner(model, x, 0.5, ignored_layers=ignored)
    assert not _groups_producing(pr, model.fc1)
    pr.prune()
    assert model.fc1.out_features == 8 and model.fc2.in_features == 8
    assert model.fc2.out_features == 3 and _run(model, x).shape == (5, 3)


def test_layers_restricts_pruning_to_the_named_group():
    torch.manual_seed(0)
    model, x = _MLP3().eval(), torch.randn(5, 4)
    name = _name_of_group(model, x, model.fc2)
    pr = _pruner(model, x, 0.5, layers=[name])
    assert [g.name for g in pr.groups] == [name]
    pr.prune()
    assert model.fc1.out_features == 8 and model.fc2.out_features == 3


class _Mixer(nn.Module):
    """A custom module with a 2-D parameter secateur cannot know how to cut."""

    def __init__(self, d):
        super().__init__()
        self.mix = nn.Parameter(torch.randn(d, d) / d ** 0.5)

    def forward(self, x):
        return x @ self.mix


class _WithMixer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(5, 8)
        self.custom = _Mixer(8)
        self.fc2, self.fc3 = nn.Linear(8, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = F.relu(self.custom(F.relu(self.fc1(x))))
        return self.fc3(F.relu(self.fc2(h)))


def test_unknown_module_with_a_2d_parameter_blocks_only_its_own_groups():
    torch.manual_seed(0)
    model, x = _WithMixer().eval(), torch.randn(4, 5)
    with torch.no_grad():
        model.fc2.weight[[1, 4]] *= 1e-3
        model.fc3.weight[:, [1, 4]] = 0
        before = _run(model, x)
    pr, msgs = _recorded(lambda: _pruner(model, x, 0.34))
    assert any("custom" in m and "_Mixer" in m for m in msgs), msgs
    assert not _groups_producing(pr, model.fc1)
    assert [g.name for g in pr.groups] == [g.name for g in _groups_producing(pr, model.fc2)]
    pr.prune()
    assert model.fc1.out_features == 8 and model.custom.mix.shape == (8, 8)
    assert model.fc2.out_features == 4 and model.fc3.in_features == 4
    _assert_same(_run(model, x), before)


# ---- 8. wrappers ------------------------------------------------------------------------------


def test_dataparallel_wrapped_model_is_traced_pruned_and_trains():
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model, x = _ConvNet().to(dev), torch.randn(4, 3, 5, 5, device=dev)
    wrapped = nn.DataParallel(model)
    opt = torch.optim.Adam(wrapped.parameters(), 1e-2)
    _train_steps(wrapped, x, opt)
    pr = _pruner(wrapped, x, 0.25)
    assert pr.model is model
    pr.prune(opt)
    assert model.conv.out_channels == 6 and model.fc1.out_features == 9
    w = model.fc1.weight.detach().clone()
    loss = _train_steps(wrapped, x, opt, 2)
    assert torch.isfinite(loss) and not torch.equal(model.fc1.weight, w)
    _train_steps(model, x, opt)


# ---- 9. round_to --------------------------------------------------------------------------------


def test_round_to_keeps_linear_widths_multiples_of_n():
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(5, 24), nn.ReLU(), nn.Linear(24, 3)).eval(), torch.randn(3, 5)
    pr = _pruner(model, x, 0.3, round_to=8)     # 24 - floor(7.2) = 17 -> nearest multiple of 8: 16
    pr.prune()
    assert model[0].out_features == 16 and model[2].in_features == 16


def test_round_to_on_attention_keeps_whole_heads():
    torch.manual_seed(0)
    model, x = _Residual(_GQA(16, hd=4, nq=8, nkv=8), 16).eval(), torch.randn(2, 3, 5)
    at = model.attn
    name = _name_of_group(model, x, at.q_proj)
    # 8 heads of 4 channels: ratio 0.2 removes floor(1.6) = 1 -> 7 heads (28 channels); widths must
    # be multiples of 12 (round_to) made of whole heads (4): the nearest is 24 (6 heads)
    _pruner(model, x, 0.2, layers=[name], round_to=12).prune()
    q = at.q_proj.out_features
    assert q == 24
    assert at.k_proj.out_features == at.v_proj.out_features == at.o_proj.in_features == q
    assert at.num_heads == at.num_kv_heads == 6
    assert _run(model, x).shape == (2, 3, 3)
