"""The dense masked reference executor: the oracle every other executor is tested against.

It materialises the full score matrix, so it is O(N^2) in time and memory; it exists to be obviously
right, not fast. It supports GQA, logit soft-capping (Gemma-2), and a learnable per-head sink logit
(an extra column of probability mass that belongs to no value, as in MiMo-V2 / gpt-oss). A query with no
visible key returns zeros instead of NaN.
"""

from __future__ import annotations

import torch


def masked_softmax(scores: torch.Tensor, allowed: torch.Tensor, sink: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax over the last dim restricted to `allowed`, with optional sink logits (broadcastable to
    scores[..., :1]) that take probability mass without a value. A row with nothing allowed gives zeros,
    with finite gradients (no NaN from an all -inf row)."""
    return masked_softmax_lse(scores, allowed, sink)[0]


def masked_softmax_lse(
    scores: torch.Tensor, allowed: torch.Tensor, sink: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`masked_softmax` and the log of its normaliser (scores[..., 0]'s shape; -inf for a row with nothing
    allowed), what context parallelism needs to merge softmaxes computed over disjoint key sets."""
    scores = scores.masked_fill(~allowed, float("-inf"))
    peak = scores.amax(dim=-1, keepdim=True)
    if sink is not None:
        peak = torch.maximum(peak, sink)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak)).detach()
    weights = torch.exp(scores - peak)
    denom = weights.sum(dim=-1, keepdim=True)
    if sink is not None:
        denom = denom + torch.exp(sink - peak)
    tiny = torch.finfo(weights.dtype).tiny
    lse = torch.where(denom > 0, torch.log(denom.clamp_min(tiny)) + peak, float("-inf")).squeeze(-1)
    return weights / denom.clamp_min(tiny), lse


def reference_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    allowed: torch.Tensor,
    scaling: float,
    *,
    softcap: float | None = None,
    sink_logit: torch.Tensor | None = None,
    dropout: float = 0.0,
    training: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over `allowed` keys.

    query (B, H, Lq, D); key/value (B, Hkv, Lkv, D) with H a multiple of Hkv; allowed boolean,
    broadcastable to (B, H, Lq, Lkv). Returns the output as (B, Lq, H, D), the layout transformers'
    attention functions return, and the probabilities (B, H, Lq, Lkv).
    """
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    sink = None if sink_logit is None else sink_logit.float().view(1, -1, 1, 1)
    probs = masked_softmax(scores.float(), allowed, sink).to(query.dtype)
    if dropout and training:
        probs = torch.nn.functional.dropout(probs, p=dropout, training=True)
    out = torch.matmul(probs, value)
    return out.transpose(1, 2).contiguous(), probs
