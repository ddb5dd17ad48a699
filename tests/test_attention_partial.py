"""Split block attention (`partial_attention` + `partial_attention_backward`) against the dense reference.

A caller that merges key sets itself (ring attention) computes each set's (out, lse) without autograd and,
in its own backward, each set's gradients from the *merged* output and log-sum-exp. Here the keys of one
layout are cut into two disjoint token sets; merging the two forward halves must give the reference
output, and the two backward halves must add up to the reference gradients (fp32, within 1e-5), on the
fused CPU path and the portable one, with left padding, GQA, a sink and logit soft-capping.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers.masking_utils import causal_mask_function

from lcplug.attention import block_fused_cpu
from lcplug.attention.block_torch import partial_attention, partial_attention_backward
from lcplug.attention.blocks import BlockLayout, static_layout
from lcplug.attention.mask import LazyMask
from lcplug.attention.merge import LayoutSets, merge_partials, merged_attention
from lcplug.attention.pattern import Pattern, SlidingWindowPattern
from lcplug.attention.reference import reference_attention

TOL = 1e-5
B, H, HKV, L, D = 2, 4, 2, 70, 16


def _layout(pattern: Pattern, pad: int) -> BlockLayout:
    padding = torch.ones(B, L, dtype=torch.bool)
    padding[0, :pad] = False
    mask = LazyMask(
        batch_size=B,
        q_length=L,
        kv_length=L,
        q_offset=0,
        kv_offset=0,
        mask_function=causal_mask_function,
        attention_mask=padding,
        device=torch.device("cpu"),
    )
    size = pattern.block_size
    return static_layout(pattern, mask, None, block_q=size, block_k=size)


def _split(layout: BlockLayout, at: int) -> tuple[BlockLayout, BlockLayout]:
    """Two layouts over the same keys: tokens before `at`, and from `at` on."""
    bk = layout.block_k
    kv_idx = layout.kv_blocks.clamp(min=0)[..., None, None] * bk + torch.arange(bk)  # (B, G, NQ, K, 1, BK)
    before = kv_idx < at
    return (
        dataclasses.replace(layout, mask=layout.mask & before, _memo={}),
        dataclasses.replace(layout, mask=layout.mask & ~before, _memo={}),
    )


def _dense(layout: BlockLayout) -> torch.Tensor:
    """The layout's token mask as (B, 1, Lq, Lkv), built independently of the executors."""
    b, _, nq, kk, bq, bk = layout.mask.shape
    dense = torch.zeros(b, nq * bq, (layout.kv_len + bk - 1) // bk * bk + bk, dtype=torch.bool)
    for qb in range(nq):
        for slot in range(kk):
            for row in range(b):
                block = int(layout.kv_blocks[row, 0, qb, slot])
                if block >= 0:
                    dense[row, qb * bq : (qb + 1) * bq, block * bk : (block + 1) * bk] |= layout.mask[row, 0, qb, slot]
    return dense[:, None, : layout.q_len, : layout.kv_len]


@pytest.fixture(params=["fused", "portable"])
def path(request, monkeypatch):
    if request.param == "portable":
        monkeypatch.setattr(block_fused_cpu, "available", lambda *a: False)
    elif not block_fused_cpu.available(torch.zeros(1), None):
        pytest.skip("this torch has no fused CPU flash kernels")
    return request.param


@pytest.mark.parametrize(
    "pattern",
    [Pattern(block_size=16), SlidingWindowPattern(window=40, sinks=2, block_size=8)],
    ids=["causal", "window"],
)
@pytest.mark.parametrize("extra", ["plain", "sink", "softcap"])
def test_split_halves_equal_reference(path, pattern, extra):
    if path == "fused" and extra == "softcap":
        pytest.skip("soft-capping always runs the portable path")
    torch.manual_seed(0)
    q = torch.randn(B, H, L, D, requires_grad=True)
    k = torch.randn(B, HKV, L, D, requires_grad=True)
    v = torch.randn(B, HKV, L, D, requires_grad=True)
    sink = torch.randn(H, requires_grad=True) if extra == "sink" else None
    softcap = 5.0 if extra == "softcap" else None
    scaling = D**-0.5
    layout = _layout(pattern, pad=9)
    allowed = _dense(layout)

    ref, _ = reference_attention(q, k, v, allowed, scaling, softcap=softcap, sink_logit=sink)
    ref = ref.transpose(1, 2)  # (B, H, L, D)
    grad = torch.randn_like(ref)
    inputs = [q, k, v] + ([sink] if sink is not None else [])
    ref_grads = torch.autograd.grad(ref, inputs, grad)

    halves = _split(layout, at=33)
    parts = [partial_attention(q, k, v, half, scaling, softcap) for half in halves]
    assert all(not out.requires_grad for out, _ in parts)
    out, lse = merge_partials(parts, q)
    total = lse
    if sink is not None:
        total = torch.logaddexp(lse, sink.detach().view(1, -1, 1))
        out = out * torch.exp(lse - total)[..., None]
    rows = torch.isfinite(lse)  # a row that sees nothing: zeros here, the reference's uniform mean there
    assert rows.any()
    torch.testing.assert_close(out[rows], ref.detach()[rows], atol=TOL, rtol=TOL)

    grads = [partial_attention_backward(q, k, v, half, scaling, softcap, grad, out, total) for half in halves]
    for name, got, want in zip("qkv", [sum(g[i] for g in grads) for i in range(3)], ref_grads):
        torch.testing.assert_close(got, want, atol=TOL, rtol=TOL, msg=f"d{name}")


def test_one_half_alone_is_not_the_whole_gradient(path):
    """The backward uses the merged normaliser: a half's gradient differs from its own standalone one."""
    torch.manual_seed(1)
    q, k, v = torch.randn(B, H, L, D), torch.randn(B, HKV, L, D), torch.randn(B, HKV, L, D)
    layout = _layout(Pattern(block_size=16), pad=0)
    first, second = _split(layout, at=20)
    parts = [partial_attention(q, k, v, half, D**-0.5) for half in (first, second)]
    out, lse = merge_partials(parts, q)
    grad = torch.randn_like(out)
    merged = partial_attention_backward(q, k, v, first, D**-0.5, None, grad, out, lse)
    alone = partial_attention_backward(q, k, v, first, D**-0.5, None, grad, parts[0][0], parts[0][1])
    assert not torch.allclose(merged[1], alone[1], atol=1e-3)


def test_merged_attention_is_one_autograd_node_over_the_sets(path):
    """`merged_attention` over two key sets equals the reference, outputs and gradients (sink included)."""
    torch.manual_seed(2)
    q = torch.randn(B, H, L, D, requires_grad=True)
    k = torch.randn(B, HKV, L, D, requires_grad=True)
    v = torch.randn(B, HKV, L, D, requires_grad=True)
    sink = torch.randn(H, requires_grad=True)
    layout = _layout(SlidingWindowPattern(window=40, sinks=2, block_size=8), pad=0)
    ref, _ = reference_attention(q, k, v, _dense(layout), D**-0.5, sink_logit=sink)
    out = merged_attention(q, LayoutSets(list(_split(layout, at=37)), D**-0.5), (k, v, k, v), sink)
    torch.testing.assert_close(out.transpose(1, 2), ref, atol=TOL, rtol=TOL)
    grad = torch.randn_like(ref)
    want = torch.autograd.grad(ref, (q, k, v, sink), grad)
    got = torch.autograd.grad(out.transpose(1, 2), (q, k, v, sink), grad)
    for name, g, w in zip(["q", "k", "v", "sink"], got, want):
        torch.testing.assert_close(g, w, atol=TOL, rtol=TOL, msg=f"d{name}")
