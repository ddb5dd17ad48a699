"""Block-sparse attention through torch's fused CPU flash-attention kernels.

torch's CPU flash kernel (`aten._scaled_dot_product_flash_attention_for_cpu`) computes a masked
softmax-attention tile in one fused pass and returns the log-sum-exp; its backward op takes the output
and log-sum-exp. That is all a block-sparse executor needs:
- a layout's *band* (key blocks fully allowed and laid out identically below each query block's
  diagonal; see `blocks.Band`) runs mask-free from an overlapping strided view of K/V: no copy;
- every other kept block is gathered (whole-block row copies) and masked with an additive bias;
- the parts of one query block are merged through their log-sum-exps, and sink logits enter the same way.
The backward calls the fused backward per part with the *final* output and log-sum-exp, which gives
exact gradients, and adds key/value gradients back into their blocks. These are private aten ops, so
everything touching them lives in this module, and `available()` lets callers fall back to the
portable executor when a torch release drops them.
"""

from __future__ import annotations

import itertools

import torch

from .blocks import Band, BlockLayout

_FWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


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
    """Keys/values of one part for a chunk of query blocks, in the kernel's (N, nc, S, D) layout, plus where
    their gradients go back: `band_start` (the first key block of the chunk's band; query block c0 + i
    reads blocks band_start + i + w) or the flat block `rows` of a gather. `bias` None means mask-free."""

    def __init__(self, k2, v2, bias, width, *, rows=None, band_start=None):
        self.k2, self.v2, self.bias, self.width = k2, v2, bias, width
        self.rows, self.band_start = rows, band_start

    def add_grad(self, grad: torch.Tensor, into: torch.Tensor, nkb: int) -> None:
        """Add a (N, nc, width*BK, D) key/value gradient into `into` (N*NKB, BK*D) at its blocks."""
        n, nc = grad.shape[:2]
        if self.band_start is None:
            into.index_put_((self.rows,), grad.reshape(self.rows.numel(), -1), accumulate=True)
            return
        # the band is a diagonal: shift-and-add `width` slices instead of a scatter over every (block, slot)
        g = grad.reshape(n, nc, self.width, -1)
        target = into.view(n, nkb, -1)
        for w in range(self.width):
            target[:, self.band_start + w : self.band_start + w + nc] += g[:, :, w]


def _band_part(k, v, band: Band, c0: int, c1: int) -> _Part:
    """Overlapping strided view: query block i reads blocks [i + offset - width, i + offset). No copy."""
    b, u, nkb, bk, d = k.shape
    start = c0 + band.offset - band.width
    size, stride = (b * u, c1 - c0, band.width * bk, d), (nkb * bk * d, bk * d, d, 1)
    k2 = k.as_strided(size, stride, k.storage_offset() + start * bk * d)
    v2 = v.as_strided(size, stride, v.storage_offset() + start * bk * d)
    return _Part(k2, v2, None, band.width, band_start=start)


def _gather_part(k, v, blocks: torch.Tensor, bias: torch.Tensor, per_unit: int) -> _Part:
    """Row copies of the kept blocks `blocks` (B, U, nc, K) with their bias (B, U, nc, BQ, K*BK)."""
    b, u, nkb, bk, d = k.shape
    _, _, nc, kk = blocks.shape
    rows = _rows(blocks.clamp(min=0), nkb)
    k2 = torch.index_select(k.reshape(-1, bk * d), 0, rows).view(b * u, nc, kk * bk, d)
    v2 = torch.index_select(v.reshape(-1, bk * d), 0, rows).view(b * u, nc, kk * bk, d)
    bq = bias.shape[-2]
    bias = bias[:, :, :, None].expand(-1, -1, -1, per_unit, -1, -1).reshape(b * u, nc, per_unit * bq, kk * bk)
    return _Part(k2, v2, bias, kk, rows=rows)


def _rows(blocks: torch.Tensor, nkb: int) -> torch.Tensor:
    """Flat row index into K viewed as (B*U*NKB, BK*D) for blocks (B, U, nc, K)."""
    b, u = blocks.shape[:2]
    base = (torch.arange(b * u) * nkb).view(b, u, 1, 1)
    return (blocks + base).reshape(-1)


def _parts(k, v, plan, c0: int, c1: int, per_unit: int) -> list[_Part]:
    """The parts query blocks [c0, c1) read: the band (if these blocks are banded) and the gathered rest."""
    blocks, bias, used, band = plan
    parts = []
    if band is not None and c0 >= band.first:
        parts.append(_band_part(k, v, band, c0, c1))
    n_used = max(used[c0:c1])  # slot lists are sorted with -1 last: trim the padding
    if n_used > 0 or not parts:
        n_used = max(n_used, 1)
        bk = k.shape[3]
        chunk_bias = bias[:, :, c0:c1, :, : n_used * bk]
        parts.append(_gather_part(k, v, blocks[:, :, c0:c1, :n_used], chunk_bias, per_unit))
    return parts


def _chunks(nq: int, step: int, band: Band | None) -> list[tuple[int, int]]:
    """Chunk boundaries; a chunk never straddles the band's first query block."""
    cuts = sorted({0, nq, *range(0, nq, step), *([band.first] if band is not None else [])})
    return list(itertools.pairwise(cuts))


def _fold_q(x: torch.Tensor, c0: int, c1: int) -> torch.Tensor:
    """(B, U, P, NQ, BQ, D) -> (B*U, nc, P*BQ, D): a unit's P query heads share its keys."""
    b, u, p, _, bq, d = x.shape
    return x[:, :, :, c0:c1].permute(0, 1, 3, 2, 4, 5).reshape(b * u, c1 - c0, p * bq, d)


def _unfold_q(x: torch.Tensor, shape) -> torch.Tensor:
    b, u, p, nc, bq, _ = shape
    return x.view(b, u, nc, p, bq, *x.shape[3:]).transpose(2, 3)


def block_attention(q, k, v, layout: BlockLayout, blocks, bias, scaling: float, step: int, sink=None):
    """q (B, U, P, NQ, BQ, D); k, v (B, U, NKB, BK, D); blocks (B, U, NQ, K) from the layout and `bias(dtype)`
    its additive mask (B, U, NQ, BQ, K*BK), built only if no band takes over (it is O(kept pairs));
    sink None or (1, U, P, 1, 1). Returns (B, U, P, NQ, BQ, D)."""
    q, k, v = _inputs(q, k, v)
    return _Fused.apply(q, k, v, sink, _plan(layout, blocks, bias, q.dtype), scaling, step)


def partial_forward(q, k, v, layout: BlockLayout, blocks, bias, scaling: float, step: int):
    """`block_attention` without autograd and without sinks: (out, lse (B, U, P, NQ, BQ), -inf where no key).

    For callers that merge results over several key sets themselves (ring attention) and hand the merged
    output and log-sum-exp to `partial_backward`.
    """
    q, k, v = _inputs(q, k, v)
    return forward(q, k, v, _plan(layout, blocks, bias, q.dtype), scaling, step)


def partial_backward(q, k, v, layout: BlockLayout, blocks, bias, scaling: float, step: int, grad_out, out, total):
    """Gradients (dq, dk, dv) of these keys' share of an attention whose *final* output is `out` and whose
    final log-sum-exp (over every key set, sinks included) is `total`: exact, as in one fused pass."""
    q, k, v = _inputs(q, k, v)
    dq, dk, dv = backward(
        q, k, v, _plan(layout, blocks, bias, q.dtype), scaling, step, grad_out, out.to(q.dtype), total
    )
    return dq, dk, dv


def _inputs(q, k, v):
    q, k, v = _autocast(q, k, v)
    # the band's overlapping view assumes contiguous blocks (a model's V arrives transposed from its
    # projection: (B, L, H, D) memory seen as (B, H, L, D))
    return q, k.contiguous(), v.contiguous()


def _plan(layout: BlockLayout, blocks, bias, dtype):
    """(blocks, bias, used slots per query block, band): what `_parts` cuts each chunk with; `bias(dtype)`
    gives the layout's whole bias, needed only without a band (the band has its own, smaller one)."""
    units = blocks.shape[1]
    band = layout.band() if layout.groups == 1 else None
    if band is not None:
        blocks = _expand_units(band.rest_blocks.clamp(min=0), units)
        bias = _expand_units(band.rest_bias(dtype), units)
        used = band.rest_used()
    else:
        bias = bias(dtype)
        used = (layout.kv_blocks >= 0).sum(-1).amax(dim=(0, 1)).tolist()
    return blocks, bias, used, band


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


def forward(q, k, v, plan, scaling: float, step: int):
    """(out, lse) of q over the plan's key blocks, chunk by chunk, parts merged through their lse."""
    b, u, p, nq, bq, d = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(b, u, p, nq, bq, dtype=torch.float32)
    for c0, c1 in _chunks(nq, step, plan[3]):
        q2 = _fold_q(q, c0, c1)
        shape = (b, u, p, c1 - c0, bq, d)
        acc, acc_lse = None, None
        for part in _parts(k, v, plan, c0, c1, p):
            bias = None if part.bias is None else part.bias.to(q.dtype)
            o, part_lse = _FWD(q2, part.k2, part.v2, attn_mask=bias, scale=scaling)
            o, part_lse = _unfold_q(o, shape), _unfold_q(part_lse.float(), shape)
            if acc is None:
                acc, acc_lse = o.float(), part_lse
            else:
                new = torch.logaddexp(acc_lse, part_lse)
                acc = acc * _weight(acc_lse, new)[..., None] + o.float() * _weight(part_lse, new)[..., None]
                acc_lse = new
        out[:, :, :, c0:c1] = acc.to(q.dtype)
        lse[:, :, :, c0:c1] = acc_lse
    return out, lse


def backward(q, k, v, plan, scaling: float, step: int, grad_out, out, total):
    """(dq, dk, dv) given the final output and log-sum-exp: the fused backward per part recomputes
    P = exp(S - total), so parts of one softmax computed apart get exact gradients."""
    b, u, p, nq, bq, d = q.shape
    bk = k.shape[3]
    # +inf for rows that see nothing makes their P 0
    total = total.masked_fill(~torch.isfinite(total), float("inf"))
    grad_out = grad_out.contiguous()
    dq = torch.zeros_like(q)
    dk = torch.zeros(k.numel() // (bk * d), bk * d, dtype=k.dtype)
    dv = torch.zeros_like(dk)
    for c0, c1 in _chunks(nq, step, plan[3]):
        q2, go2, o2 = (_fold_q(t, c0, c1) for t in (q, grad_out, out))
        l2 = total[:, :, :, c0:c1].permute(0, 1, 3, 2, 4).reshape(b * u, c1 - c0, p * bq)
        for part in _parts(k, v, plan, c0, c1, p):
            bias = None if part.bias is None else part.bias.to(q.dtype)
            gq, gk, gv = _BWD(go2, q2, part.k2, part.v2, o2, l2, 0.0, False, attn_mask=bias, scale=scaling)
            dq[:, :, :, c0:c1] += _unfold_q(gq, (b, u, p, c1 - c0, bq, d))
            part.add_grad(gk, dk, k.shape[2])
            part.add_grad(gv, dv, k.shape[2])
    return dq, dk.view_as(k), dv.view_as(v)


class _Fused(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sink, plan, scaling: float, step: int):
        out, lse = forward(q, k, v, plan, scaling, step)
        if sink is not None:
            total = torch.logaddexp(lse, sink.float())
            out = out * _weight(lse, total).to(out.dtype)[..., None]
        else:
            total = lse
        ctx.save_for_backward(q, k, v, sink, out, total)
        ctx.plan, ctx.scaling, ctx.step = plan, scaling, step
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, sink, out, total = ctx.saved_tensors
        dq, dk, dv = backward(q, k, v, ctx.plan, ctx.scaling, ctx.step, grad_out, out, total)
        dsink = None
        if sink is not None and ctx.needs_input_grad[3]:
            delta = (grad_out.float() * out.float()).sum(-1)  # (B, U, P, NQ, BQ)
            finite = total.masked_fill(~torch.isfinite(total), float("inf"))
            dsink = -(delta * torch.exp(sink.float() - finite)).sum(dim=(0, 3, 4), keepdim=True).to(sink.dtype)
        return dq, dk, dv, dsink, None, None, None


def _weight(part_lse: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """exp(part - total), 0 where the part saw nothing (part lse -inf)."""
    w = torch.exp(part_lse - total)
    return torch.where(torch.isfinite(part_lse), w, torch.zeros_like(w))
