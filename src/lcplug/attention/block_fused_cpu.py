"""Block-sparse attention through torch's fused CPU flash-attention kernels.

torch's CPU flash kernel (`aten._scaled_dot_product_flash_attention_for_cpu`) computes a masked
softmax-attention tile in one fused pass and returns the log-sum-exp; its backward op takes the output
and log-sum-exp. That is all a block-sparse executor needs:
- a layout's *band* (key blocks fully allowed and laid out identically below each query block's
  diagonal; see `blocks.Band`) runs mask-free from an overlapping strided view of K/V: no copy;
- every other kept block is gathered (whole-block row copies) and masked with an additive bias;
- the parts of one query block are merged through their log-sum-exps, and sink logits enter the same way.
The backward calls the fused backward per part with the *final* output and log-sum-exp, which gives
exact gradients, and adds key/value gradients back into their blocks. A layout whose rows each read at
most two key ranges (`BlockLayout.row_ranges`: windows, sinks, streaming blocks) runs forward and backward
on lcplug's own `range_kernel` instead, which computes no masked pair outside its tile edges; where that
kernel cannot be built, the parts above run.

Speed comes from three choices. Banded layouts run on merged query blocks (`BlockLayout.merged`, about
`TILE_ROWS` rows per tile), where the kernel's backward works on deeper products. Each kernel call sees
a chunk's query blocks as its batch and the units as its heads, so the gradients it writes are
token-major (block, row, unit, dim): every key block's gradient is one contiguous row, folded back with
plain slice-adds into token-major accumulators, with no reshape copies and no scatter. Backward chunks
are small (`CACHE_ELEMENTS`), so that fold reads cache-resident data. These are private aten ops, so
everything touching them lives in this module, and `available()` lets callers fall back to the
portable executor when a torch release drops them.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import torch

from . import range_kernel
from .blocks import Band, BlockLayout
from .row_ranges import Ranges

_FWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)

TILE_ROWS = 256
"""Query rows per kernel tile to aim for. torch's CPU flash kernels pick their inner tile by the query
length (32 rows below 192, 64 from there), and on 64-row query blocks the backward spends most of its
time in depth-32 products for the key/value gradients: at 256 rows it does about 1.5x the pairs per
second. Merging query blocks (`BlockLayout.merged`) costs the pairs the merged blocks do not share
(for a 1024 window in 64-blocks, 21 key blocks per 4 query blocks instead of 4 x 18)."""

MERGE_COST = 1.25
"""Most key blocks a merged tile may compute, relative to its members' own: above it, merging loses."""

CACHE_ELEMENTS = 1 << 22
"""Key/value gradient elements the backward kernel writes per chunk (16 MiB in fp32); the forward cuts its
chunks the same way: see `_cache_step`."""


def available(query: torch.Tensor, softcap: float | None) -> bool:
    """The fused path runs on CPU tensors of float32/bfloat16 without logit soft-capping."""
    return (
        _FWD is not None
        and _BWD is not None
        and query.device.type == "cpu"
        and softcap is None
        and query.dtype in (torch.float32, torch.bfloat16)
    )


class _Part:
    """Keys/values of one part for a chunk of query blocks as the kernel reads them, (nc, U', S, D) with the
    chunk's query blocks as its batch and units (U' = B*U) as its heads, plus where their gradients go back:
    `band_start` (the first key block of the chunk's band; query block c0 + i reads blocks
    band_start + i * band_stride + w) or the `blocks` (B, U, nc, K) of a gather. `bias` None means
    mask-free; `empty` (like the kernel's log-sum-exp, (nc, U', rows)) marks rows the bias leaves no key."""

    def __init__(self, k2, v2, bias, width, *, blocks=None, shared=False, band_start=None, band_stride=1, empty=None):
        self.k2, self.v2, self.bias, self.width, self.empty = k2, v2, bias, width, empty
        self.blocks, self.shared, self.band_start, self.band_stride = blocks, shared, band_start, band_stride

    def add_grad(self, grad: torch.Tensor, into: torch.Tensor) -> None:
        """Add a key/value gradient as the kernel returns it ((nc, U', S, D) over token-major memory) into
        `into` (NKB, BK, U', D), K/V token-major: every block is one contiguous row, whatever the unit."""
        nc, units = grad.shape[:2]
        g = grad.transpose(1, 2).reshape(nc, self.width, -1)  # a view: the kernel's memory is (nc, S, U', D)
        if self.band_start is not None:
            # the band is a diagonal: `width` shift-and-adds of contiguous rows instead of a scatter
            target = into.view(into.shape[0], -1)
            step = self.band_stride
            for w in range(self.width):
                start = self.band_start + w
                target[start : start + (nc - 1) * step + 1 : step] += g[:, w]
        elif self.shared:  # every unit reads the same blocks: each (query block, slot) adds one contiguous row
            into.view(into.shape[0], -1).index_add_(0, self.blocks[0, 0].reshape(-1), g.reshape(nc * self.width, -1))
        else:
            blocks = self.blocks.flatten(0, 1).permute(1, 2, 0)  # (nc, K, U')
            g = g.view(nc, self.width, *into.shape[1:]).transpose(2, 3)  # (nc, K, U', BK, D)
            into.transpose(1, 2).index_put_((blocks, torch.arange(units)), g, accumulate=True)


def _band_part(k, v, band: Band, c0: int, c1: int) -> _Part:
    """Overlapping strided view: query block i reads blocks [i * stride + offset - width, ...). No copy."""
    b, u, nkb, bk, d = k.shape
    start = c0 * band.stride + band.offset - band.width
    size, stride = (c1 - c0, b * u, band.width * bk, d), (band.stride * bk * d, nkb * bk * d, d, 1)
    k2 = k.as_strided(size, stride, k.storage_offset() + start * bk * d)
    v2 = v.as_strided(size, stride, v.storage_offset() + start * bk * d)
    return _Part(k2, v2, None, band.width, band_start=start, band_stride=band.stride)


def _gather_part(k, v, blocks: torch.Tensor, bias: torch.Tensor, empty, per_unit: int, shared: bool) -> _Part:
    """Row copies of the kept blocks `blocks` (B, U, nc, K) with their bias (B, U, nc, BQ, K*BK) and the rows it
    leaves without a key (B, U, nc, BQ), or None."""
    b, u, nkb, bk, d = k.shape
    _, _, nc, kk = blocks.shape
    rows = _rows(blocks, nkb)
    k2 = torch.index_select(k.reshape(-1, bk * d), 0, rows).view(b * u, nc, kk * bk, d).transpose(0, 1)
    v2 = torch.index_select(v.reshape(-1, bk * d), 0, rows).view(b * u, nc, kk * bk, d).transpose(0, 1)
    bq = bias.shape[-2]
    bias = bias[:, :, :, None].expand(-1, -1, -1, per_unit, -1, -1).reshape(b * u, nc, per_unit * bq, kk * bk)
    if empty is not None:
        empty = empty[:, :, :, None].expand(-1, -1, -1, per_unit, -1).reshape(b * u, nc, per_unit * bq).transpose(0, 1)
    return _Part(k2, v2, bias.transpose(0, 1), kk, blocks=blocks, shared=shared, empty=empty)


def _rows(blocks: torch.Tensor, nkb: int) -> torch.Tensor:
    """Flat row index into K viewed as (B*U*NKB, BK*D) for blocks (B, U, nc, K)."""
    b, u = blocks.shape[:2]
    base = (torch.arange(b * u) * nkb).view(b, u, 1, 1)
    return (blocks + base).reshape(-1)


class _Plan(NamedTuple):
    """What `_parts` cuts each chunk with: the gathered blocks (B, U, NQ, K) (clamped to >= 0), their bias and
    the rows they leave without a key (B, U, NQ, BQ) or None, the used slots per query block, the band, and
    whether every unit gathers the same blocks."""

    blocks: torch.Tensor
    bias: torch.Tensor
    empty: torch.Tensor | None
    used: list[int]
    band: Band | None
    shared: bool
    merge: int  # query blocks merged into one kernel tile (`BlockLayout.merged`)


def _parts(k, v, plan: _Plan, c0: int, c1: int, per_unit: int) -> list[_Part]:
    """The parts query blocks [c0, c1) read: the band (if these blocks are banded) and the gathered rest."""
    parts = []
    if plan.band is not None and c0 >= plan.band.first:
        parts.append(_band_part(k, v, plan.band, c0, c1))
    n_used = max(plan.used[c0:c1])  # slot lists are sorted with -1 last: trim the padding
    if n_used > 0 or not parts:
        n_used = max(n_used, 1)
        bk = k.shape[3]
        chunk_bias = plan.bias[:, :, c0:c1, :, : n_used * bk]
        blocks = plan.blocks[:, :, c0:c1, :n_used]
        empty = None if plan.empty is None else plan.empty[:, :, c0:c1]
        parts.append(_gather_part(k, v, blocks, chunk_bias, empty, per_unit, plan.shared))
    return parts


def _chunks(nq: int, step: int, band: Band | None) -> list[tuple[int, int]]:
    """Chunk boundaries; a chunk never straddles the band's first query block."""
    cuts = sorted({0, nq, *range(0, nq, step), *([band.first] if band is not None else [])})
    return list(itertools.pairwise(cuts))


def _cache_step(k: torch.Tensor, plan: _Plan, step: int) -> int:
    """Query blocks per chunk, at most `step`: few enough that the kernel's per-chunk key/value gradients
    (one copy of the kept blocks per query block) stay in the last-level cache for the fold that follows,
    and that the allocator reuses their buffers instead of faulting in fresh pages."""
    b, u, _, bk, d = k.shape
    kept = (0 if plan.band is None else plan.band.width) + plan.blocks.shape[-1]
    return max(1, min(step, CACHE_ELEMENTS // (b * u * kept * bk * d)))


def _fold_q(x: torch.Tensor, c0: int, c1: int) -> torch.Tensor:
    """(B, U, P, NQ, BQ, ...) -> (nc, P*BQ, B*U, ...): query blocks [c0, c1) token-major, as the kernel lays out
    (batch, length, heads, ...) with query blocks as its batch and units as its heads (a unit's P query
    heads share its keys)."""
    b, u, p, _, bq = x.shape[:5]
    rest = tuple(range(5, x.dim()))
    return x[:, :, :, c0:c1].permute(3, 2, 4, 0, 1, *rest).reshape(c1 - c0, p * bq, b * u, *x.shape[5:])


def _unfold_q(x: torch.Tensor, b: int, u: int, p: int) -> torch.Tensor:
    """(nc, P*BQ, B*U, ...) -> (B, U, P, nc, BQ, ...): a view."""
    nc, rows = x.shape[:2]
    rest = tuple(range(5, x.dim() + 2))
    return x.view(nc, p, rows // p, b, u, *x.shape[3:]).permute(3, 4, 1, 0, 2, *rest)


def _attend(q2: torch.Tensor, part: _Part, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused forward of one part for token-major queries (nc, P*BQ, U', D): (out like q2, lse (nc, P*BQ, U'))."""
    bias = None if part.bias is None else part.bias.to(q2.dtype)
    o, lse = _FWD(q2.transpose(1, 2), part.k2, part.v2, attn_mask=bias, scale=scaling)
    if part.empty is not None:  # the kernel gives lse 0 to a row its mask leaves nothing: it must weigh nothing
        lse = lse.masked_fill(part.empty, float("-inf"))
    return o.transpose(1, 2), lse.transpose(1, 2).float()


def block_attention(q, k, v, layout: BlockLayout, per_unit, scaling: float, step: int, sink=None):
    """q (B, U, P, NQ, BQ, D); k, v (B, U, NKB, BK, D); `per_unit` maps a layout tensor (B, G, ...) to its units
    (B, U, ...); sink None or (1, U, P, 1, 1). Returns (B, U, P, NQ, BQ, D)."""
    q, k, v = _autocast(q, k, v)
    return _Fused.apply(q, k, v, sink, layout, per_unit, scaling, step)


def partial_forward(q, k, v, layout: BlockLayout, per_unit, scaling: float, step: int):
    """`block_attention` without autograd and without sinks: (out, lse (B, U, P, NQ, BQ), -inf where no key).

    For callers that merge results over several key sets themselves (ring attention) and hand the merged
    output and log-sum-exp to `partial_backward`.
    """
    return _forward(*_autocast(q, k, v), layout, per_unit, scaling, step)


def partial_backward(q, k, v, layout: BlockLayout, per_unit, scaling: float, step: int, grad_out, out, total):
    """Gradients (dq, dk, dv) of these keys' share of an attention whose *final* output is `out` and whose
    final log-sum-exp (over every key set, sinks included) is `total`: exact, as in one fused pass."""
    return _backward(*_autocast(q, k, v), layout, per_unit, scaling, step, grad_out, out.to(q.dtype), total)


def _inputs(q, k, v):
    q, k, v = _autocast(q, k, v)
    # the band's overlapping view assumes contiguous blocks (a model's V arrives transposed from its
    # projection: (B, L, H, D) memory seen as (B, H, L, D))
    return q, k.contiguous(), v.contiguous()


def _ranges(q: torch.Tensor, layout: BlockLayout) -> Ranges | None:
    """The layout's row ranges when the range kernel can run on these inputs, else None."""
    return layout.row_ranges() if range_kernel.usable(q) else None


def _forward(q, k, v, layout: BlockLayout, per_unit, scaling: float, step: int):
    """(out, lse): on `range_kernel` when the layout has row ranges (it reads K/V as they come), else through
    torch's kernels on the layout's plan."""
    ranges = _ranges(q, layout)
    if ranges is not None:
        return _range_forward(q, k, v, ranges, scaling)
    q, k, v = _inputs(q, k, v)
    return forward(q, k, v, _plan(q, layout, per_unit), scaling, step)


def _plan(q: torch.Tensor, layout: BlockLayout, per_unit) -> _Plan:
    """The plan for query q (B, U, P, NQ, BQ, D) on this layout; `per_unit` maps the layout's group tensors to
    units. The layout's whole bias is built only without a band (the band has its own, smaller one). A
    banded layout runs on kernel tiles of about `TILE_ROWS` query rows (a unit's P query heads times merged
    query blocks) when the merged layout still has a band."""
    units, dtype = q.shape[1], q.dtype
    band = layout.band() if layout.groups == 1 else None
    merge = max(1, TILE_ROWS // (q.shape[2] * layout.block_q))
    merged = None
    if band is not None and merge > 1 and layout.num_q_blocks % merge == 0 and layout.num_q_blocks >= 2 * merge:
        merged = layout.merged(merge).band()
    if merged is not None and _tile_blocks(merged) <= MERGE_COST * _tile_blocks(band):
        band = merged
    else:
        merge = 1
    if band is not None:
        blocks = _expand_units(band.rest_blocks.clamp(min=0), units)
        bias = _expand_units(band.rest_bias(dtype), units)
        empty = band.rest_empty()
        empty = None if empty is None else _expand_units(empty, units)
        used = band.rest_used()
    else:
        blocks = per_unit(layout.kv_blocks).clamp(min=0)
        bias = per_unit(layout.bias(dtype))
        empty = layout.empty_rows()
        empty = None if empty is None else per_unit(empty)
        used = (layout.kv_blocks >= 0).sum(-1).amax(dim=(0, 1)).tolist()
    return _Plan(blocks, bias, empty, used, band, bool((blocks == blocks[:1, :1]).all()), merge)


def _tile_blocks(band: Band) -> int:
    """Key blocks a banded query block computes (for a merged block: per member's worth of rows)."""
    return band.width + max(band.rest_used()[band.first :])


def _autocast(q, k, v):
    """q, k, v in one dtype, as SDPA gets them: autocast's (e.g. bf16) when it is on, else q's.

    The fused kernels take one dtype for q, k, v and the mask, but a custom autograd Function is not cast by
    autocast, and under it the rotary embedding can hand back q and k in different dtypes.
    """
    device = q.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else q.dtype
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _expand_units(x: torch.Tensor, units: int) -> torch.Tensor:
    return x.expand(-1, units, *x.shape[2:])


def forward(q, k, v, plan: _Plan, scaling: float, step: int):
    """(out, lse) of q over the plan's key blocks, chunk by chunk, parts merged through their lse."""
    q = _merge_q(q, plan.merge)
    b, u, p, nq = q.shape[:4]
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:5], dtype=torch.float32)
    for c0, c1 in _chunks(nq, _cache_step(k, plan, step), plan.band):
        q2 = _fold_q(q, c0, c1)
        acc, acc_lse = None, None
        for part in _parts(k, v, plan, c0, c1, p):
            o, part_lse = _attend(q2, part, scaling)
            if acc is None:
                acc, acc_lse = o.float(), part_lse
            else:
                new = torch.logaddexp(acc_lse, part_lse)
                acc = acc * _weight(acc_lse, new)[..., None] + o.float() * _weight(part_lse, new)[..., None]
                acc_lse = new
        out[:, :, :, c0:c1] = _unfold_q(acc.to(q.dtype), b, u, p)
        lse[:, :, :, c0:c1] = _unfold_q(acc_lse, b, u, p)
    return _split_q(out, plan.merge), _split_q(lse, plan.merge)


def _backward(q, k, v, layout: BlockLayout, per_unit, scaling: float, step: int, grad_out, out, total):
    """(dq, dk, dv): on `range_kernel` when the layout has row ranges, else through torch's kernels. Both
    recompute P = exp(S - total), so rows that see nothing get total +inf here: their P is 0."""
    total = total.masked_fill(~torch.isfinite(total), float("inf"))
    ranges = _ranges(q, layout)
    if ranges is not None:
        return _range_backward(q, k, v, ranges, scaling, grad_out, out, total)
    q, k, v = _inputs(q, k, v)
    return backward(q, k, v, _plan(q, layout, per_unit), scaling, step, grad_out, out, total)


def _range_backward(q, k, v, ranges: Ranges, scaling: float, grad_out, out, total):
    """`backward` on `range_kernel`, shapes as `backward` takes and returns them."""
    b, u, p, nq, bq, d = q.shape
    rows = (b, u * p, nq * bq)
    delta = (grad_out.float() * out.float()).sum(-1)
    grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()  # autograd may hand an expand
    dq, dk, dv = range_kernel.range_attention_backward(
        q.reshape(*rows, d),
        k.reshape(b, u, -1, d),
        v.reshape(b, u, -1, d),
        grad_out.reshape(*rows, d),
        total.reshape(rows),
        delta.reshape(rows),
        ranges,
        scaling,
    )
    return dq.view(q.shape), dk.view(k.shape), dv.view(v.shape)


def _range_forward(q, k, v, ranges: Ranges, scaling: float):
    """`forward` on `range_kernel`: the whole query at once, each row over its own key ranges. The output is a
    view of token-major (B, L, H, D) memory, so the attention layer's final transpose copies nothing."""
    b, u, p, nq, bq, d = q.shape
    kv_shape = (b, u, -1, d)
    out, lse = range_kernel.range_attention(
        q.reshape(b, u * p, nq * bq, d), k.reshape(kv_shape), v.reshape(kv_shape), ranges, scaling
    )
    return out.unflatten(1, (u, p)).unflatten(3, (nq, bq)), lse.view(q.shape[:5])


def backward(q, k, v, plan: _Plan, scaling: float, step: int, grad_out, out, total):
    """(dq, dk, dv) given the final output and log-sum-exp (+inf where a row sees nothing): the fused backward
    per part recomputes P = exp(S - total), so parts of one softmax computed apart get exact gradients.

    Gradients accumulate token-major ((NQ, P, BQ, B*U, D) and (NKB, BK, B*U, D)), the layout the kernel
    writes them in, and are returned as (B, U, ...) views of it.
    """
    q, grad_out, out, total = (_merge_q(x, plan.merge) for x in (q, grad_out, out, total))
    b, u, p, nq, bq, d = q.shape
    nkb, bk = k.shape[2:4]
    dq = torch.zeros(nq, p * bq, b * u, d, dtype=q.dtype)
    dk = torch.zeros(nkb, bk, b * u, d, dtype=k.dtype)
    dv = torch.zeros_like(dk)
    for c0, c1 in _chunks(nq, _cache_step(k, plan, step), plan.band):
        q2, go2, o2, l2 = (_fold_q(t, c0, c1) for t in (q, grad_out, out, total))
        for part in _parts(k, v, plan, c0, c1, p):
            bias = None if part.bias is None else part.bias.to(q.dtype)
            go, qt, ot, lt = (x.transpose(1, 2) for x in (go2, q2, o2, l2))  # the kernel's (batch, heads, rows)
            gq, gk, gv = _BWD(go, qt, part.k2, part.v2, ot, lt, 0.0, False, attn_mask=bias, scale=scaling)
            dq[c0:c1] += gq.transpose(1, 2)
            part.add_grad(gk, dk)
            part.add_grad(gv, dv)
    return _split_q(_unfold_q(dq, b, u, p), plan.merge), _unfold_kv(dk, b, u), _unfold_kv(dv, b, u)


def _merge_q(x: torch.Tensor, merge: int) -> torch.Tensor:
    """(B, U, P, NQ, BQ, ...) -> (B, U, P, NQ / merge, merge * BQ, ...)."""
    return x.reshape(*x.shape[:3], x.shape[3] // merge, merge * x.shape[4], *x.shape[5:])


def _split_q(x: torch.Tensor, merge: int) -> torch.Tensor:
    """Inverse of `_merge_q`."""
    return x.reshape(*x.shape[:3], -1, x.shape[4] // merge, *x.shape[5:])


def _unfold_kv(x: torch.Tensor, b: int, u: int) -> torch.Tensor:
    """(NKB, BK, B*U, D) -> (B, U, NKB, BK, D): a view."""
    nkb, bk, _, d = x.shape
    return x.view(nkb, bk, b, u, d).permute(2, 3, 0, 1, 4)


class _Fused(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sink, layout: BlockLayout, per_unit, scaling: float, step: int):
        out, lse = _forward(q, k, v, layout, per_unit, scaling, step)
        if sink is not None:
            total = torch.logaddexp(lse, sink.float())
            out = out * _weight(lse, total).to(out.dtype)[..., None]
        else:
            total = lse
        ctx.save_for_backward(q, k, v, sink, out, total)
        ctx.layout, ctx.per_unit, ctx.scaling, ctx.step = layout, per_unit, scaling, step
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, sink, out, total = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, ctx.layout, ctx.per_unit, ctx.scaling, ctx.step, grad_out, out, total)
        dsink = None
        if sink is not None and ctx.needs_input_grad[3]:
            delta = (grad_out.float() * out.float()).sum(-1)  # (B, U, P, NQ, BQ)
            finite = total.masked_fill(~torch.isfinite(total), float("inf"))
            dsink = -(delta * torch.exp(sink.float() - finite)).sum(dim=(0, 3, 4), keepdim=True).to(sink.dtype)
        return dq, dk, dv, dsink, None, None, None, None


def _weight(part_lse: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """exp(part - total), 0 where the part saw nothing (part lse -inf)."""
    w = torch.exp(part_lse - total)
    return torch.where(torch.isfinite(part_lse), w, torch.zeros_like(w))
