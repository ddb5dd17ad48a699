"""Merging partial attention results: one softmax over key sets computed apart (the online-softmax identity).

Whoever splits a query's keys into disjoint sets — a ring step per rank (context parallelism), a raw
window beside compressed entries (compressed attention), blocks streamed from a KV tier — gets per set
an output normalised over that set and its log-sum-exp, and merges them here, exactly.
"""

from __future__ import annotations

import torch


def merge_partials(
    parts: list[tuple[torch.Tensor, torch.Tensor]], like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine partial (out (B, H, L, D), lse (B, H, L)) results over disjoint key sets into one (out, lse).

    A set with nothing visible has lse -inf and weighs nothing (with zero gradient); no parts at all give
    zeros and -inf. `like` (B, H, L, D) gives the output's dtype and, for no parts, its shape.
    """
    if not parts:
        return torch.zeros_like(like), like.new_full(like.shape[:-1], float("-inf"), dtype=torch.float32)
    if len(parts) == 1:
        return parts[0]
    lse = torch.stack([p[1] for p in parts])
    peak = lse.amax(0).detach()
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    weights = torch.exp(lse - peak)
    total = weights.sum(0)
    tiny = torch.finfo(total.dtype).tiny
    out = sum(w[..., None] * o.float() for w, (o, _) in zip(weights, parts)) / total.clamp_min(tiny)[..., None]
    merged = torch.where(total > 0, torch.log(total.clamp_min(tiny)) + peak, float("-inf"))
    return out.to(like.dtype), merged
