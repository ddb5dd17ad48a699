"""Block-sparse layouts and the torch executor against the dense masked reference.

Cases: left padding, packed documents (position ids restart), decode and chunked prefill (query offsets),
sinks, GQA, head-dependent patterns (S2), soft-capping (portable path), the fused CPU path with and
without the range kernel, and the range kernel itself. fp32; outputs and gradients within 1e-5.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers.masking_utils import and_masks, causal_mask_function, packed_sequence_mask_function

from lcplug.attention import block_fused_cpu, range_kernel
from lcplug.attention.block_torch import block_attention
from lcplug.attention.blocks import static_layout
from lcplug.attention.mask import LazyMask
from lcplug.attention.pattern import SlidingWindowPattern
from lcplug.attention.positions import pattern_positions
from lcplug.attention.reference import reference_attention
from lcplug.attention.row_ranges import _count_true, row_ranges
from lcplug.plugins.attention.loza import StreamingBlocksPattern
from lcplug.plugins.attention.s2 import ShiftedGroupsPattern

TOL = 1e-5


def make_mask(batch, lq, lkv, *, q_offset=0, pad=0, packed=None):
    padding = None
    mask_fn = causal_mask_function
    if pad:
        padding = torch.ones(batch, lkv, dtype=torch.bool)
        padding[0, :pad] = False
    if packed is not None:
        mask_fn = and_masks(causal_mask_function, packed_sequence_mask_function(packed))
    return LazyMask(
        batch_size=batch,
        q_length=lq,
        kv_length=lkv,
        q_offset=q_offset,
        kv_offset=0,
        mask_function=mask_fn,
        attention_mask=padding,
        device=torch.device("cpu"),
    )


def reference_mask(mask, pattern, position_ids, heads):
    q_pos, kv_pos = pattern_positions(mask, position_ids, torch.device("cpu"))
    group = None
    if pattern.head_groups > 1:
        group = (torch.arange(heads) // (heads // pattern.head_groups)).view(1, heads, 1, 1)
    return mask.dense() & pattern.allows(q_pos[:, None, :, None], kv_pos[:, None, None, :], group)


CASES = {
    "prefill": {"lq": 70, "lkv": 70},
    "left-padded": {"lq": 70, "lkv": 70, "pad": 9},
    "decode": {"lq": 1, "lkv": 70, "q_offset": 69, "pad": 9},
    "chunked": {"lq": 21, "lkv": 70, "q_offset": 49, "pad": 9},
    "packed": {"lq": 70, "lkv": 70, "packed": True},
}
PATTERNS = {
    "window+sinks": lambda: SlidingWindowPattern(window=13, sinks=3, block_size=8),
    "window": lambda: SlidingWindowPattern(window=20, sinks=0, block_size=16),
    "banded": lambda: SlidingWindowPattern(window=40, sinks=2, block_size=8),  # wide enough for the fused band
    "s2": lambda: ShiftedGroupsPattern(group=12, block_size=8),
    "streaming": lambda: StreamingBlocksPattern(sink_blocks=1, local_blocks=3, block=8),
}


def case_inputs(case):
    spec = dict(CASES[case])
    position_ids = None
    if spec.pop("packed", None):
        position_ids = torch.cat([torch.arange(30), torch.arange(25), torch.arange(15)])[None].expand(2, -1)
        spec["packed"] = torch.cat([torch.zeros(30), torch.ones(25), torch.full((15,), 2)]).long()[None].expand(2, -1)
    mask = make_mask(
        2, spec["lq"], spec["lkv"], q_offset=spec.get("q_offset", 0), pad=spec.get("pad", 0), packed=spec.get("packed")
    )
    return mask, position_ids


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("pattern_name", list(PATTERNS))
def test_layout_equals_dense_predicate(case, pattern_name):
    pattern = PATTERNS[pattern_name]()
    mask, position_ids = case_inputs(case)
    layout = static_layout(pattern, mask, position_ids, block_q=pattern.block_size, block_k=pattern.block_size)
    dense = reference_mask(mask, pattern, position_ids, heads=4)
    got = layout.to_dense()
    if layout.groups == 1:
        got = got.expand(-1, dense.shape[1], -1, -1)
    else:
        got = got.repeat_interleave(4 // layout.groups, dim=1)
    assert torch.equal(got, dense.expand_as(got))
    # every row of a window keeps at most two key ranges, and they hold the same pairs (S2 depends on the head)
    ranges = layout.row_ranges()
    assert (ranges is None) == (pattern_name == "s2")
    if ranges is not None:
        from_ranges = ranges_to_dense(ranges, mask.kv_length)
        assert not from_ranges[:, mask.q_length :].any()  # padding rows of the last query block read nothing
        assert torch.equal(from_ranges[:, : mask.q_length], got[:, 0])
    # and it is sparse: fewer kept blocks than block-causal attention would touch
    if CASES[case]["lq"] == 70:
        nq = layout.num_q_blocks
        assert int((layout.kv_blocks >= 0).sum()) < 2 * layout.groups * nq * (nq + 1) // 2


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("pattern_name", list(PATTERNS))
@pytest.mark.parametrize("variant", ["fused", "sinks", "softcap", "torch-kernels"])
def test_executor_matches_reference(monkeypatch, case, pattern_name, variant):
    """`fused` and `sinks` run on the range kernel where the layout has row ranges (every window here);
    `torch-kernels` turns it off, so torch's kernels run the band and gathered parts, forward and backward."""
    if variant == "torch-kernels":
        monkeypatch.setattr(range_kernel, "usable", lambda query: False)
    torch.manual_seed(0)
    pattern = PATTERNS[pattern_name]()
    mask, position_ids = case_inputs(case)
    heads, kv_heads, dim = 4, 2, 16
    q = torch.randn(2, heads, mask.q_length, dim, requires_grad=True)
    k = torch.randn(2, kv_heads, mask.kv_length, dim, requires_grad=True)
    v = torch.randn(2, kv_heads, mask.kv_length, dim, requires_grad=True)
    sink = torch.randn(heads, requires_grad=True) if variant == "sinks" else None
    softcap = 2.0 if variant == "softcap" else None
    inputs = [q, k, v] + ([sink] if sink is not None else [])
    layout = static_layout(pattern, mask, position_ids, block_q=pattern.block_size, block_k=pattern.block_size)
    out = block_attention(q, k, v, layout, 0.3, sink_logit=sink, softcap=softcap)
    ref, _ = reference_attention(
        q, k, v, reference_mask(mask, pattern, position_ids, heads), 0.3, sink_logit=sink, softcap=softcap
    )
    assert (out - ref).abs().max() < TOL
    grad = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad((out * grad).sum(), inputs), torch.autograd.grad((ref * grad).sum(), inputs)):
        assert (a - b).abs().max() < TOL


def test_banded_executor_takes_kv_as_models_hand_it_over():
    """K/V as a transposed view of (B, L, Hkv, D) memory (what a model's projections give), at a length the
    executor does not pad (padding would copy): the band's overlapping view must not assume contiguity."""
    torch.manual_seed(0)
    pattern = PATTERNS["banded"]()
    mask = make_mask(2, 64, 64)
    q = torch.randn(2, 4, 64, 16, requires_grad=True)
    k, v = (torch.randn(2, 64, 2, 16).transpose(1, 2).requires_grad_() for _ in range(2))
    layout = static_layout(pattern, mask, None, block_q=8, block_k=8)
    assert layout.band() is not None
    out = block_attention(q, k, v, layout, 0.3)
    ref, _ = reference_attention(q, k, v, reference_mask(mask, pattern, None, 4), 0.3)
    assert (out - ref).abs().max() < TOL
    for a, b in zip(torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(ref.sum(), (q, k, v))):
        assert (a - b).abs().max() < TOL


def test_band_is_found_for_long_windows_and_covers_most_blocks():
    mask = make_mask(1, 1024, 1024)
    layout = static_layout(SlidingWindowPattern(256, 4, 32), mask, None, block_q=32, block_k=32)
    band = layout.band()
    assert band is not None and band.width == 7 and band.first == 7
    banded = band.width * (layout.num_q_blocks - band.first)
    assert banded / int((layout.kv_blocks >= 0).sum()) > 0.6


@pytest.mark.parametrize("length", [1000, 1023, 1025])
def test_band_survives_a_partial_last_query_block(length):
    """A length that is not a multiple of the block leaves the last query block with padding rows; they must not
    hide the band (which would send every block down the masked gather path), and the fused executor on that
    band must stay exact."""
    torch.manual_seed(0)
    pattern = SlidingWindowPattern(256, 4, 32)
    mask = make_mask(1, length, length)
    layout = static_layout(pattern, mask, None, block_q=32, block_k=32)
    band = layout.band()
    assert band is not None and band.width == 7 and band.first == 7
    q, k, v = (torch.randn(1, 2, length, 16, requires_grad=True) for _ in range(3))
    out = block_attention(q, k, v, layout, 0.3)
    ref, _ = reference_attention(q, k, v, reference_mask(mask, pattern, None, 2), 0.3)
    assert (out - ref).abs().max() < TOL
    grad = torch.randn_like(ref)
    for a, b in zip(
        torch.autograd.grad((out * grad).sum(), (q, k, v)), torch.autograd.grad((ref * grad).sum(), (q, k, v))
    ):
        assert (a - b).abs().max() < TOL


def test_no_nxn_tensor_in_layout():
    """A 64K layout for a 1024 window holds O(N * window) entries, not O(N^2)."""
    n = 65536
    mask = make_mask(1, n, n)
    layout = static_layout(SlidingWindowPattern(1024, 4, 64), mask, None, block_q=64, block_k=64)
    assert layout.mask.numel() <= n * 18 * 64
    assert layout.kv_blocks.shape == (1, 1, n // 64, 18)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("pattern_name", list(PATTERNS))
def test_merged_layout_keeps_every_pair(case, pattern_name):
    """Merging query blocks (padding the last merged block when they do not divide) keeps exactly the
    layout's (query, key) pairs."""
    pattern = PATTERNS[pattern_name]()
    mask, position_ids = case_inputs(case)
    layout = static_layout(pattern, mask, position_ids, block_q=pattern.block_size, block_k=pattern.block_size)
    merged = layout.merged(4)
    assert merged.block_q == 4 * layout.block_q
    assert torch.equal(merged.to_dense(), layout.to_dense())


def test_merged_layout_band_strides_by_the_merge():
    """Four merged 32-blocks of a 256 window: blocks fully allowed to all 128 rows are the 7 under the
    first member's diagonal minus the 3 its later members push past the window edge."""
    layout = static_layout(SlidingWindowPattern(256, 4, 32), make_mask(1, 1024, 1024), None, block_q=32, block_k=32)
    band = layout.merged(4).band()
    assert band is not None and (band.first, band.stride, band.width, band.offset) == (1, 4, 4, 0)
    dense = layout.to_dense()[0, 0]
    for i in range(2, 8):  # from the first merged block with a block below its band
        lo = i * band.stride + band.offset - band.width
        assert dense[i * 128 : (i + 1) * 128, lo * 32 : (lo + band.width) * 32].all()
        assert not dense[i * 128 : (i + 1) * 128, (lo - 1) * 32 : lo * 32].all()


@pytest.mark.parametrize(("heads", "merge"), [(2, 4), (4, 2)])
@pytest.mark.parametrize("sinks", [False, True])
def test_fused_executor_on_merged_query_blocks(monkeypatch, heads, merge, sinks):
    """The fused path merges query blocks into taller kernel tiles when the merged layout keeps a band (here
    forced by a small tile size): outputs and gradients still equal the reference, with GQA and sinks."""
    if not block_fused_cpu.available(torch.zeros(1), None):
        pytest.skip("this torch has no fused CPU flash kernels")
    monkeypatch.setattr(block_fused_cpu, "TILE_ROWS", 32)
    monkeypatch.setattr(range_kernel, "usable", lambda query: False)  # a window would run on the range kernel
    plans = []
    plan = block_fused_cpu._plan
    monkeypatch.setattr(block_fused_cpu, "_plan", lambda *a: plans.append(plan(*a)) or plans[-1])
    torch.manual_seed(0)
    pattern = SlidingWindowPattern(window=96, sinks=3, block_size=8)
    mask = make_mask(2, 128, 128)
    q = torch.randn(2, heads, 128, 16, requires_grad=True)
    k, v = (torch.randn(2, 2, 128, 16, requires_grad=True) for _ in range(2))
    sink = torch.randn(heads, requires_grad=True) if sinks else None
    inputs = [q, k, v] + ([sink] if sinks else [])
    layout = static_layout(pattern, mask, None, block_q=8, block_k=8)
    out = block_attention(q, k, v, layout, 0.3, sink_logit=sink)
    assert [p.merge for p in plans] == [merge]
    ref, _ = reference_attention(q, k, v, reference_mask(mask, pattern, None, heads), 0.3, sink_logit=sink)
    assert (out - ref).abs().max() < TOL
    grad = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad((out * grad).sum(), inputs), torch.autograd.grad((ref * grad).sum(), inputs)):
        assert (a - b).abs().max() < TOL


needs_compiler = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler for the range kernel")


@needs_compiler
def test_range_kernel_builds_here():
    """Where a compiler exists the kernel must build: otherwise the tests above never reach it."""
    assert range_kernel.kernel() is not None


def ranges_to_dense(ranges, kv_len):
    a0, a1, b0, b1 = ranges[..., None].unbind(-2)
    key = torch.arange(kv_len)
    return ((key >= a0) & (key < a1)) | ((key >= b0) & (key < b1))


def test_row_ranges_refuse_other_shapes():
    mask = make_mask(2, 70, 70)
    groups = static_layout(ShiftedGroupsPattern(group=12, block_size=8), mask, None, block_q=8, block_k=8)
    assert groups.row_ranges() is None  # the rule depends on the head group
    window = static_layout(SlidingWindowPattern(window=13, sinks=3, block_size=8), mask, None, block_q=8, block_k=8)
    gapped = window.mask.clone()
    gapped[0, 0, -1, -1, 5, 0] = False  # key 64 missing inside row 69's window: three runs
    assert row_ranges(window.kv_blocks, gapped, 8) is None
    unsorted = window.kv_blocks.flip(-1)  # block lists must be ascending
    assert row_ranges(unsorted, window.mask.flip(3), 8) is None


@pytest.mark.parametrize("width", [8, 64, 128, 12])
def test_row_ranges_count_bools_exactly(width):
    x = torch.rand(3, 5, 7, width) > 0.5
    x[0, 0, 0] = True  # a full block
    for t in (x, x[:, ::2], x.transpose(0, 1)):
        assert torch.equal(_count_true(t), t.sum(-1))


@needs_compiler
@pytest.mark.parametrize(("heads", "kv_heads", "lq", "lkv"), [(4, 2, 300, 300), (2, 2, 1, 700), (3, 1, 130, 260)])
def test_range_kernel_equals_masked_softmax_and_its_gradients(monkeypatch, heads, kv_heads, lq, lkv):
    """Forward and backward on random ranges per row and batch: first ranges apart from and touching the
    second, empty rows, rows longer than a key chunk, and tiles cut short (a small tile and chunk force
    every edge). K/V arrive token-major, as a model's projections hand them over."""
    monkeypatch.setattr(range_kernel, "TILE_ROWS", 64)
    monkeypatch.setattr(range_kernel, "CHUNK_KEYS", 96)
    torch.manual_seed(0)
    q = torch.randn(2, heads, lq, 32)
    k, v = (torch.randn(2, kv_heads, lkv, 32).transpose(1, 2).contiguous().transpose(1, 2) for _ in range(2))
    b0 = torch.randint(0, lkv, (2, lq))
    b1 = (b0 + torch.randint(0, lkv, (2, lq))).clamp(max=lkv)
    a1 = torch.minimum(torch.randint(0, 12, (2, lq)), b0)
    a0 = (a1 - torch.randint(0, 5, (2, lq))).clamp(min=0)
    b1[0, :3] = b0[0, :3]  # rows reading only their first range, or nothing
    a1[0, :2] = a0[0, :2]
    ranges = torch.stack([a0, a1, b0, b1], dim=-1)
    out, lse = range_kernel.range_attention(q, k, v, ranges, 0.2)
    allowed = ranges_to_dense(ranges, lkv)[:, None]
    ref, _ = reference_attention(q, k, v, allowed, 0.2)
    scores = q @ k.repeat_interleave(heads // kv_heads, 1).transpose(-1, -2) * 0.2
    ref_lse = scores.masked_fill(~allowed, float("-inf")).logsumexp(-1)
    assert (out - ref.transpose(1, 2)).abs().max() < TOL
    seen = allowed.any(-1).expand_as(lse)
    assert (lse[seen] - ref_lse[seen]).abs().max() < TOL
    assert torch.isneginf(lse[~seen]).all() and (out[~seen] == 0).all()
    # the backward, from the final output and log-sum-exp (+inf where a row reads nothing)
    inputs = [x.detach().requires_grad_() for x in (q, k, v)]
    ref, _ = reference_attention(*inputs, allowed, 0.2)
    grad = torch.randn_like(out)
    expected = torch.autograd.grad((ref.transpose(1, 2) * grad).sum(), inputs)
    lse = lse.masked_fill(~seen, float("inf"))
    got = range_kernel.range_attention_backward(q, k, v, grad, lse, (grad * out).sum(-1), ranges, 0.2)
    for a, b in zip(got, expected):
        assert (a - b).abs().max() < TOL


def test_fused_executor_falls_back_without_the_kernel(monkeypatch):
    """No compiler (or LCPLUG_CPU_KERNEL=0): `kernel()` is None and torch's kernels give the same answer."""
    monkeypatch.setenv("LCPLUG_CPU_KERNEL", "0")
    range_kernel.kernel.cache_clear()
    try:
        assert range_kernel.kernel() is None
        calls = []
        monkeypatch.setattr(range_kernel, "range_attention", lambda *a: calls.append(a))
        torch.manual_seed(0)
        pattern = SlidingWindowPattern(window=40, sinks=2, block_size=8)
        mask = make_mask(2, 70, 70)
        q, k, v = (torch.randn(2, 2, 70, 16) for _ in range(3))
        layout = static_layout(pattern, mask, None, block_q=8, block_k=8)
        out = block_attention(q, k, v, layout, 0.3)
        ref, _ = reference_attention(q, k, v, reference_mask(mask, pattern, None, 2), 0.3)
        assert not calls and (out - ref).abs().max() < TOL
    finally:
        monkeypatch.delenv("LCPLUG_CPU_KERNEL")
        range_kernel.kernel.cache_clear()
