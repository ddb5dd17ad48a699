"""The torch block-gather executor: exact block-sparse attention with autograd, on any device.

Per chunk of query blocks it gathers only the kept key/value blocks, computes scores for those, masks
them with the layout's token mask and applies a safe softmax. On the CPU it runs each chunk through
torch's fused flash kernels (`block_fused_cpu`); elsewhere, or with logit soft-capping, it uses plain
torch ops. Cost and memory scale with the kept
blocks; no N x N tensor exists. Under autograd each chunk is recomputed in backward (activation
checkpointing), so training memory stays O(N * D) plus one chunk. GQA never copies K/V per query head
unless a head-dependent layout forces it.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from . import block_fused_cpu
from .blocks import BlockLayout
from .reference import masked_softmax_lse

CHUNK_ELEMENTS = 1 << 24
"""Score elements per chunk (64 MiB in fp32): bounds peak memory whatever the sequence length."""


class _Setup:
    """A layout's execution geometry for one call: query/key/value cut into blocks per *unit* (a KV head, or a
    query head when a head-dependent layout splits a KV group), each unit's kept key blocks, chunk size."""

    def __init__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: BlockLayout):
        b, h, lq, d = query.shape
        hkv = key.shape[1]
        g = layout.groups
        bq, bk = layout.block_q, layout.block_k
        nq, kmax = layout.num_q_blocks, layout.kv_blocks.shape[-1]
        if hkv % g == 0:  # each KV head's query heads share one layout group: gather per KV head
            units, per_unit = hkv, h // hkv
            self.unit_group = torch.arange(hkv, device=query.device) // (hkv // g)
        else:  # a head-dependent layout splits a KV group: gather per query head
            units, per_unit = h, 1
            key = key.repeat_interleave(h // hkv, dim=1)
            value = value.repeat_interleave(h // hkv, dim=1)
            self.unit_group = torch.arange(h, device=query.device) // (h // g)
        self.shape, self.units, self.per_unit, self.kv_repeat = (b, h, lq, d), units, per_unit, units // hkv
        self.layout, self.nkb, self.lkv = layout, (key.shape[2] + bk - 1) // bk, key.shape[2]
        self.q = _pad(query, nq * bq).view(b, units, per_unit, nq, bq, d)
        self.k = _pad(key, self.nkb * bk).view(b, units, self.nkb, bk, d)
        self.v = _pad(value, self.nkb * bk).view(b, units, self.nkb, bk, d)
        self.idx = self.per_unit_view(layout.kv_blocks).clamp(min=0)  # (B, U, NQ, K)
        self.step = max(1, CHUNK_ELEMENTS // max(1, b * h * bq * kmax * bk))

    def per_unit_view(self, x: torch.Tensor) -> torch.Tensor:
        return _per_unit(x, self.unit_group, self.units)

    def unblock_q(self, x: torch.Tensor) -> torch.Tensor:
        """(B, U, P, NQ, BQ, ...) -> (B, H, Lq, ...)."""
        b, h, lq, _ = self.shape
        return x.reshape(b, h, -1, *x.shape[5:])[:, :, :lq]

    def block_q(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, Lq, E) -> (B, U, P, NQ, BQ, E), blocked like the query."""
        return _pad(x, self.q.shape[3] * self.q.shape[4]).view(*self.q.shape[:-1], x.shape[-1])

    def unblock_kv(self, x: torch.Tensor) -> torch.Tensor:
        """(B, U, NKB, BK, D) gradients -> (B, Hkv, Lkv, D), summed over replicated KV heads."""
        b, _, _, _, d = x.shape
        x = x.reshape(b, self.units, -1, d)[:, :, : self.lkv]
        return x.view(b, -1, self.kv_repeat, self.lkv, d).sum(2) if self.kv_repeat > 1 else x


def block_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: BlockLayout,
    scaling: float,
    *,
    sink_logit: torch.Tensor | None = None,
    softcap: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of query (B, H, Lq, D) over key/value (B, Hkv, Lkv, D) restricted to `layout`.

    Returns (B, Lq, H, D), the layout transformers' attention functions return; with `return_lse` also
    the log-sum-exp of each query's scores (B, H, Lq), -inf where no key is allowed, so that partial
    results over disjoint key sets merge exactly (with autograd through both; `partial_attention` is the
    cheaper split form for callers that run their own backward).
    """
    s = _Setup(query, key, value, layout)
    if block_fused_cpu.available(query, softcap) and not return_lse:
        sink = None if sink_logit is None else sink_logit.view(1, s.units, s.per_unit, 1, 1)
        out = block_fused_cpu.block_attention(s.q, s.k, s.v, layout, s.per_unit_view, scaling, s.step, sink)
        return s.unblock_q(out).transpose(1, 2).contiguous()
    allowed = s.per_unit_view(layout.mask)  # (B, U, NQ, K, BQ, BK)
    sink = None if sink_logit is None else sink_logit.float().view(1, s.units, s.per_unit, 1, 1, 1)
    outs = []
    for c0 in range(0, layout.num_q_blocks, s.step):
        c1 = min(layout.num_q_blocks, c0 + s.step)
        args = (s.q[:, :, :, c0:c1], s.k, s.v, s.idx[:, :, c0:c1], allowed[:, :, c0:c1], sink)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value) if t is not None):
            outs.append(checkpoint(_chunk, *args, scaling, softcap, use_reentrant=False))
        else:
            outs.append(_chunk(*args, scaling, softcap))
    out = s.unblock_q(torch.cat([o for o, _ in outs], dim=3)).transpose(1, 2).contiguous()
    if not return_lse:
        return out
    return out, s.unblock_q(torch.cat([lse for _, lse in outs], dim=3))


def partial_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: BlockLayout, scaling: float, softcap=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward half of split block attention, no autograd: (out (B, H, Lq, D), lse (B, H, Lq), -inf where no key).

    Ring attention computes one softmax over key sets that arrive one at a time and leave again; keeping each
    set for autograd would keep every rank's keys. Instead it merges these partial results itself and, in its
    own backward, calls `partial_attention_backward` per key set with the *merged* output and log-sum-exp.
    """
    s = _Setup(query, key, value, layout)
    with torch.no_grad():
        if block_fused_cpu.available(query, softcap):
            out, lse = block_fused_cpu.partial_forward(s.q, s.k, s.v, layout, s.per_unit_view, scaling, s.step)
            return s.unblock_q(out), s.unblock_q(lse)
        allowed = s.per_unit_view(layout.mask)
        outs = [
            _chunk(s.q[:, :, :, c0:c1], s.k, s.v, s.idx[:, :, c0:c1], allowed[:, :, c0:c1], None, scaling, softcap)
            for c0 in range(0, layout.num_q_blocks, s.step)
            for c1 in [min(layout.num_q_blocks, c0 + s.step)]
        ]
        out = torch.cat([o for o, _ in outs], dim=3)
        return s.unblock_q(out), s.unblock_q(torch.cat([lse for _, lse in outs], dim=3))


def partial_attention_backward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: BlockLayout,
    scaling: float,
    softcap: float | None,
    grad_out: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward half: (dq, dk, dv) of these keys' share of an attention whose final output is `out` (B, H, Lq, D)
    with gradient `grad_out` and whose final log-sum-exp over every key set (and sink) is `lse` (B, H, Lq).

    With P = exp(S - lse) restricted to this layout, dS = P * (dO V^T - rowsum(dO * out)): the same formula
    one pass over all keys would use, so the per-set gradients add up to the exact ones.
    """
    s = _Setup(query, key, value, layout)
    go, o, total = s.block_q(grad_out), s.block_q(out), s.block_q(lse[..., None])[..., 0]
    with torch.no_grad():
        if block_fused_cpu.available(query, softcap):
            dq, dk, dv = block_fused_cpu.partial_backward(
                s.q, s.k, s.v, layout, s.per_unit_view, scaling, s.step, go, o, total
            )
        else:
            dq, dk, dv = _portable_backward(s, go, o, total, scaling, softcap)
    return s.unblock_q(dq).to(query.dtype), s.unblock_kv(dk).to(key.dtype), s.unblock_kv(dv).to(value.dtype)


def _portable_backward(s: _Setup, go, o, total, scaling: float, softcap: float | None):
    """`partial_attention_backward` in plain torch ops, chunk by chunk (any device, soft-capping)."""
    allowed = s.per_unit_view(s.layout.mask)
    bi, ui = _unit_index(s.q)
    total = total.masked_fill(~torch.isfinite(total), float("inf"))  # rows that see nothing: P = 0
    dq = torch.zeros_like(s.q)
    dk = torch.zeros_like(s.k)
    dv = torch.zeros_like(s.v)
    nq = s.layout.num_q_blocks
    for c0 in range(0, nq, s.step):
        c1 = min(nq, c0 + s.step)
        q, idx = s.q[:, :, :, c0:c1], s.idx[:, :, c0:c1]
        kg, vg, scores, keep = _gathered(q, s.k, s.v, idx, allowed[:, :, c0:c1], scaling, softcap)
        probs = torch.exp(scores.float() - total[:, :, :, c0:c1, :, None]).masked_fill(~keep, 0.0)
        g, oc = go[:, :, :, c0:c1].float(), o[:, :, :, c0:c1].float()
        dvg = torch.matmul(probs.transpose(-1, -2), g).sum(2)  # (B, U, nc, K*BK, D)
        delta = (g * oc).sum(-1, keepdim=True)
        ds = probs * (torch.matmul(g, vg.float().transpose(-1, -2)) - delta)
        if softcap is not None:
            ds = ds * (1 - (scores.float() / softcap) ** 2)  # d(c tanh(x / c)) / dx = 1 - tanh^2
        ds = ds * scaling
        dq[:, :, :, c0:c1] = torch.matmul(ds, kg.float()).to(dq.dtype)
        dkg = torch.matmul(ds.transpose(-1, -2), q.float()).sum(2)
        blocks = (*idx.shape, *s.k.shape[3:])  # (B, U, nc, K, BK, D)
        dk.index_put_((bi, ui, idx), dkg.view(blocks).to(dk.dtype), accumulate=True)
        dv.index_put_((bi, ui, idx), dvg.view(blocks).to(dv.dtype), accumulate=True)
    return dq, dk, dv


def _chunk(q, k, v, idx, allowed, sink, scaling: float, softcap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    _, vg, scores, keep = _gathered(q, k, v, idx, allowed, scaling, softcap)
    probs, lse = masked_softmax_lse(scores.float(), keep, sink)
    return torch.matmul(probs.to(q.dtype), vg), lse


def _gathered(q, k, v, idx, allowed, scaling: float, softcap: float | None):
    """One chunk of query blocks q (B, U, P, nc, BQ, D) against its kept key blocks `idx` (B, U, nc, K): the
    gathered keys and values (B, U, 1, nc, K*BK, D), the (soft-capped) scores and the token mask to apply."""
    b, units, _, nc, bq, d = q.shape
    kmax, bk = idx.shape[-1], k.shape[-2]
    bi, ui = _unit_index(q)
    kg = k[bi, ui, idx].reshape(b, units, 1, nc, kmax * bk, d)
    vg = v[bi, ui, idx].reshape(b, units, 1, nc, kmax * bk, d)
    scores = torch.matmul(q, kg.transpose(-1, -2)) * scaling  # (B, U, P, nc, BQ, K*BK)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    keep = allowed.permute(0, 1, 2, 4, 3, 5).reshape(b, units, 1, nc, bq, kmax * bk)
    return kg, vg, scores, keep


def _unit_index(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and unit indices (B, 1, 1, 1), (1, U, 1, 1) that gather per-unit blocks with an index (B, U, ...)."""
    b, units = q.shape[:2]
    return torch.arange(b, device=q.device).view(b, 1, 1, 1), torch.arange(units, device=q.device).view(1, units, 1, 1)


def _per_unit(x: torch.Tensor, unit_group: torch.Tensor, units: int) -> torch.Tensor:
    """Index a per-group layout tensor (B, G, ...) by unit; a broadcast view when there is one group."""
    return x.expand(-1, units, *x.shape[2:]) if x.shape[1] == 1 else x[:, unit_group]


def _pad(x: torch.Tensor, length: int) -> torch.Tensor:
    extra = length - x.shape[2]
    return torch.nn.functional.pad(x, (0, 0, 0, extra)) if extra > 0 else x
