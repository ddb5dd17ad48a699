"""The FlexAttention executor against the dense reference on the layout's own mask.

Cases: GQA with a left-padded row (its first queries see nothing), decode and chunked prefill (query
offsets; block counts padded to powers of two), sinks and soft-capping on and off, a dynamic layout
(random, unsorted key blocks with unused slots) and a head-dependent layout (S2, G=2, one KV head).
fp32 outputs within 1e-5. Flex's eager path runs most cases (LCPLUG_FLEX_COMPILE=0); one small case
runs the compiled CPU kernel. FlexAttention has no backward on the CPU, so gradients are not compared
here: a backward request must raise.
"""

from __future__ import annotations

import pytest
import torch
from transformers.masking_utils import causal_mask_function

from lcplug.attention import block_flex
from lcplug.attention.block_flex import _block_mask, flex_block_attention
from lcplug.attention.blocks import BlockLayout, layout_from_blocks, static_layout
from lcplug.attention.mask import LazyMask
from lcplug.attention.pattern import SlidingWindowPattern
from lcplug.attention.positions import pattern_positions
from lcplug.attention.reference import reference_attention
from lcplug.plugins.attention.s2 import ShiftedGroupsPattern

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

TOL = 1e-5
"""fp32 output tolerance (absolute)."""
CPU = torch.device("cpu")

CASES: dict[str, dict] = {
    "gqa_left_padded": {"pad": 9},
    "sink_softcap": {"sink": True, "softcap": 5.0},
    "decode": {"lq": 1, "q_offset": 69, "pad": 9, "sink": True},
    "chunked_prefill": {"lq": 37, "q_offset": 33, "pad": 9, "softcap": 3.0},
    "short_chunk": {"lq": 5, "q_offset": 40, "pad": 9, "sink": True},  # one 5-token query block
    "dynamic": {"layout": "dynamic", "pad": 9, "sink": True},
    "head_groups": {"layout": "s2", "kv_heads": 1, "pad": 9, "sink": True, "softcap": 5.0},
}
"""Two rows, 70 keys, 4 heads over 2 KV heads, head dim 16, 8-token blocks, a 13-token window plus 3
sink tokens, unless a case says otherwise."""


@pytest.fixture(autouse=True)
def eager_flex(monkeypatch):
    monkeypatch.setenv("LCPLUG_FLEX_COMPILE", "0")


def make_layout(lq=70, q_offset=0, pad=0, layout="window", **_) -> BlockLayout:
    padding = torch.ones(2, 70, dtype=torch.bool)
    padding[0, :pad] = False
    mask = LazyMask(
        batch_size=2,
        q_length=lq,
        kv_length=70,
        q_offset=q_offset,
        kv_offset=0,
        mask_function=causal_mask_function,
        attention_mask=padding,
        device=CPU,
    )
    if layout == "s2":
        return static_layout(ShiftedGroupsPattern(group=12, block_size=8), mask, None, block_q=8, block_k=8)
    if layout == "window":
        return static_layout(SlidingWindowPattern(13, 3, 8), mask, None, block_q=8, block_k=8)
    # dynamic (top-k style): 5 random key blocks per query block, in random order, one slot unused
    gen = torch.Generator().manual_seed(0)
    nq, nkb = (lq + 7) // 8, (70 + 7) // 8
    kv_blocks = torch.stack([torch.randperm(nkb, generator=gen)[:5] for _ in range(2 * nq)]).view(2, 1, nq, 5)
    kv_blocks[..., 2] = -1
    q_pos, kv_pos = pattern_positions(mask, None, CPU)
    return layout_from_blocks(kv_blocks, mask, None, q_pos, kv_pos, block_q=8, block_k=8)


def run_case(spec: dict) -> tuple[torch.Tensor, torch.Tensor, BlockLayout]:
    """(flex output, reference output, layout) for one case."""
    layout = make_layout(**spec)
    heads, kv_heads, lq = 4, spec.get("kv_heads", 2), layout.q_len
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, heads, lq, 16, generator=gen)
    k, v = (torch.randn(2, kv_heads, 70, 16, generator=gen) for _ in range(2))
    sink = torch.randn(heads, generator=gen) if spec.get("sink") else None
    softcap = spec.get("softcap")
    out = flex_block_attention(q, k, v, layout, 0.3, sink_logit=sink, softcap=softcap)
    allowed = layout.to_dense().repeat_interleave(heads // layout.groups, dim=1)
    ref, _ = reference_attention(q, k, v, allowed, 0.3, sink_logit=sink, softcap=softcap)
    return out, ref, layout


@pytest.mark.parametrize("case", CASES)
def test_matches_reference(case):
    out, ref, _ = run_case(CASES[case])
    assert out.shape == ref.shape
    assert (out - ref).abs().max() < TOL


def test_rows_with_nothing_visible_are_zero():
    """Row 0's first 9 slots are padding: without a sink those queries see no key at all."""
    out, _, layout = run_case(CASES["gqa_left_padded"])
    assert not layout.to_dense()[0, 0, :9].any()
    assert torch.equal(out[0, :9], torch.zeros_like(out[0, :9]))


def test_compiled_cpu_kernel(monkeypatch):
    """The compiled kernel (static shapes, captured mask tables) on GQA, padding, sinks and soft-cap, with
    8-token layout blocks grouped in pairs (the CPU kernel needs key blocks of 16 tokens or more)."""
    monkeypatch.setenv("LCPLUG_FLEX_COMPILE", "1")
    out, ref, _ = run_case({**CASES["chunked_prefill"], "sink": True})
    assert (out - ref).abs().max() < TOL


@pytest.mark.parametrize("case", ["dynamic", "decode", "short_chunk"])
def test_coarser_flex_blocks(monkeypatch, case):
    """Layout blocks finer than flex's minimum block (as on CUDA) are grouped: still exact."""
    monkeypatch.setitem(block_flex.MIN_FLEX_BLOCK, "cpu", (16, 32))
    out, ref, _ = run_case({**CASES[case], "softcap": 5.0})
    assert (out - ref).abs().max() < TOL


def test_full_and_partial_blocks_split(monkeypatch):
    """Blocks whose token mask is all True are listed as full (no mask_mod), the others as partial."""
    monkeypatch.setitem(block_flex.MIN_FLEX_BLOCK, "cpu", (1, 1))
    layout = make_layout(pad=9)
    block_mask = _block_mask(layout, 4, sink=False, backward=False)
    kept = layout.kv_blocks >= 0
    pairs = layout.mask.flatten(-2)
    assert int(block_mask.full_kv_num_blocks.sum()) == int((kept & pairs.all(-1)).sum())
    assert int(block_mask.kv_num_blocks.sum()) == int((kept & pairs.any(-1) & ~pairs.all(-1)).sum())


def test_cpu_backward_raises_and_no_grad_runs():
    layout = make_layout()
    q = torch.randn(2, 4, 70, 16, requires_grad=True)
    k, v = torch.randn(2, 2, 70, 16), torch.randn(2, 2, 70, 16)
    with pytest.raises(RuntimeError, match="no backward on the CPU"):
        flex_block_attention(q, k, v, layout, 0.3)
    with torch.no_grad():
        out = flex_block_attention(q, k, v, layout, 0.3)
    assert out.shape == (2, 70, 4, 16)
