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
    results over disjoint key sets merge exactly (context parallelism).
    """
    b, h, lq, d = query.shape
    hkv = key.shape[1]
    g = layout.groups
    bq, bk = layout.block_q, layout.block_k
    nq, kmax = layout.num_q_blocks, layout.kv_blocks.shape[-1]
    if hkv % g == 0:  # each KV head's query heads share one layout group: gather per KV head
        units, per_unit = hkv, h // hkv
        unit_group = torch.arange(hkv, device=query.device) // (hkv // g)
    else:  # a head-dependent layout splits a KV group: gather per query head
        units, per_unit = h, 1
        key = key.repeat_interleave(h // hkv, dim=1)
        value = value.repeat_interleave(h // hkv, dim=1)
        unit_group = torch.arange(h, device=query.device) // (h // g)
    nkb = (key.shape[2] + bk - 1) // bk
    q = _pad(query, nq * bq).view(b, units, per_unit, nq, bq, d)
    k = _pad(key, nkb * bk).view(b, units, nkb, bk, d)
    v = _pad(value, nkb * bk).view(b, units, nkb, bk, d)
    idx = _per_unit(layout.kv_blocks, unit_group, units).clamp(min=0)  # (B, U, NQ, K)
    step = max(1, CHUNK_ELEMENTS // max(1, b * h * bq * kmax * bk))
    if block_fused_cpu.available(query, softcap) and not return_lse:
        sink = None if sink_logit is None else sink_logit.view(1, units, per_unit, 1, 1)
        bias = _per_unit(layout.bias(query.dtype), unit_group, units)
        out = block_fused_cpu.block_attention(q, k, v, layout, idx, bias, scaling, step, sink)
        return out.reshape(b, h, nq * bq, d)[:, :, :lq].transpose(1, 2).contiguous()
    allowed = _per_unit(layout.mask, unit_group, units)  # (B, U, NQ, K, BQ, BK)
    sink = None if sink_logit is None else sink_logit.float().view(1, units, per_unit, 1, 1, 1)
    outs = []
    for c0 in range(0, nq, step):
        c1 = min(nq, c0 + step)
        args = (q[:, :, :, c0:c1], k, v, idx[:, :, c0:c1], allowed[:, :, c0:c1], sink)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value) if t is not None):
            outs.append(checkpoint(_chunk, *args, scaling, softcap, use_reentrant=False))
        else:
            outs.append(_chunk(*args, scaling, softcap))
    out = torch.cat([o for o, _ in outs], dim=3).reshape(b, h, nq * bq, d)[:, :, :lq].transpose(1, 2).contiguous()
    if not return_lse:
        return out
    return out, torch.cat([lse for _, lse in outs], dim=3).reshape(b, h, nq * bq)[:, :, :lq]


def _chunk(q, k, v, idx, allowed, sink, scaling: float, softcap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    b, units, _, nc, bq, d = q.shape
    kmax, bk = idx.shape[-1], k.shape[-2]
    bi = torch.arange(b, device=q.device).view(b, 1, 1, 1)
    ui = torch.arange(units, device=q.device).view(1, units, 1, 1)
    kg = k[bi, ui, idx].reshape(b, units, 1, nc, kmax * bk, d)
    vg = v[bi, ui, idx].reshape(b, units, 1, nc, kmax * bk, d)
    scores = torch.matmul(q, kg.transpose(-1, -2)) * scaling  # (B, U, P, nc, BQ, K*BK)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    keep = allowed.permute(0, 1, 2, 4, 3, 5).reshape(b, units, 1, nc, bq, kmax * bk)
    probs, lse = masked_softmax_lse(scores.float(), keep, sink)
    return torch.matmul(probs.to(q.dtype), vg), lse


def _per_unit(x: torch.Tensor, unit_group: torch.Tensor, units: int) -> torch.Tensor:
    """Index a per-group layout tensor (B, G, ...) by unit; a broadcast view when there is one group."""
    return x.expand(-1, units, *x.shape[2:]) if x.shape[1] == 1 else x[:, unit_group]


def _pad(x: torch.Tensor, length: int) -> torch.Tensor:
    extra = length - x.shape[2]
    return torch.nn.functional.pad(x, (0, 0, 0, extra)) if extra > 0 else x
