"""Merging partial attention results: one softmax over key sets computed apart (the online-softmax identity).

Whoever splits a query's keys into disjoint sets — a ring step per rank (context parallelism), a raw
window beside compressed entries (compressed attention), blocks streamed from a KV tier — gets per set
an output normalised over that set and its log-sum-exp, and merges them here, exactly (`merge_partials`,
differentiable). `merged_attention` is the same merge as one autograd node with its own backward: each
set's gradients come from the merged output and log-sum-exp (the executor's split halves), so nothing
per set is kept between forward and backward and the fused kernels serve every set.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

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


class KeySets(Protocol):
    """Key sets computed apart for one softmax over their union, with their own backward.

    `tensors` are the differentiable inputs the sets are made of (e.g. each set's key and value).
    `forward` yields each set's partial (out (B, H, L, D), lse (B, H, L)) without autograd; `backward` gets
    the *merged* output, its gradient and the final log-sum-exp `total` (sinks included) and returns dq and
    the gradients of `tensors` (None where not needed), exact because P = exp(S - total) per set is what
    one pass over all keys would use.
    """

    def forward(self, query: torch.Tensor, tensors: tuple) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def backward(
        self, query: torch.Tensor, tensors: tuple, grad_out: torch.Tensor, out: torch.Tensor, total: torch.Tensor
    ) -> tuple[torch.Tensor, tuple]: ...


class _Merged(torch.autograd.Function):
    @staticmethod
    def forward(fctx, query, sink, sets: KeySets, *tensors):
        with torch.no_grad():
            out, lse = merge_partials([], query)
            for part in sets.forward(query, tensors):  # merged as they come: one partial result held
                out, lse = merge_partials([(out, lse), part], query)
            total = lse
            if sink is not None:
                total = torch.logaddexp(lse, sink.float().view(1, -1, 1))
                share = torch.where(torch.isfinite(lse), torch.exp(lse - total), torch.zeros_like(total))
                out = out * share.to(out.dtype)[..., None]
        fctx.save_for_backward(query, sink, out, total, *tensors)
        fctx.sets = sets
        return out

    @staticmethod
    def backward(fctx, grad_out):
        query, sink, out, total, *tensors = fctx.saved_tensors
        grad_out = grad_out.contiguous()
        dq, grads = fctx.sets.backward(query, tuple(tensors), grad_out, out, total)
        dsink = None
        if sink is not None and fctx.needs_input_grad[1]:
            delta = (grad_out.float() * out.float()).sum(-1)  # (B, H, L)
            seen = total.masked_fill(~torch.isfinite(total), float("inf"))
            dsink = -(delta * torch.exp(sink.float().view(1, -1, 1) - seen)).sum(dim=(0, 2)).to(sink.dtype)
        return dq, dsink, None, *grads


def merged_attention(
    query: torch.Tensor, sets: KeySets, tensors: tuple, sink: torch.Tensor | None = None
) -> torch.Tensor:
    """One softmax of query (B, H, L, D) over every key set of `sets`, plus per-head sink logits (H,) or None:
    (B, H, L, D), as one autograd node that keeps only the query, `tensors`, the output and its log-sum-exp
    (a ring's received shards, a chunk's temporaries are not kept). Rows that see nothing give zeros."""
    return _Merged.apply(query, sink, sets, *tensors)


class LayoutSets:
    """Key sets held at once: `tensors` = (key_0, value_0, key_1, value_1, ...), set i read through `layouts[i]`
    by the block executor's split halves (the fused CPU kernels where they apply)."""

    def __init__(self, layouts: list, scaling: float, softcap: float | None = None):
        self.layouts, self.scaling, self.softcap = layouts, scaling, softcap

    def forward(self, query, tensors):
        from .block_torch import partial_attention

        for i, layout in enumerate(self.layouts):
            yield partial_attention(query, tensors[2 * i], tensors[2 * i + 1], layout, self.scaling, self.softcap)

    def backward(self, query, tensors, grad_out, out, total):
        from .block_torch import partial_attention_backward

        dq = torch.zeros_like(query)
        grads = []
        for i, layout in enumerate(self.layouts):
            k, v = tensors[2 * i], tensors[2 * i + 1]
            gq, gk, gv = partial_attention_backward(
                query, k, v, layout, self.scaling, self.softcap, grad_out, out, total
            )
            dq += gq
            grads += [gk, gv]
        return dq, tuple(grads)
