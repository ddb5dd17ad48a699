"""What each layer of a cp model attends to, as rules over global token spans.

A `Rule` answers one question for a strategy: for queries in span q and keys in span kv (global
indices), which (query, key) pairs may attend, as a `BlockLayout` (None when none may: the strategy then
skips that work, and a ring skips the transfer if no rank needs it). Every rule ANDs the global mask
(causal, same document, the model's own sliding window) with the layer's own pattern:

- `StaticRule`: a position-defined `Pattern` (sliding window, LoZA streaming blocks, ...) built with the
  core's `static_layout`; a layer on the model's own attention is the full pattern, so it is dense causal.
- `DynamicRule`: a layer that selects keys from content (DSA's top-k indexer) through its own
  `layout(query, key, mask, position_ids)`: the rank all-gathers the keys the selection scores and
  selects for its own queries, once per forward, before any strategy moves data.
- `Mix`: a gated layer's two branches, run one after the other and mixed by the layer's gate.

`plan_for` maps a layer module to its rule(s) and refuses, at patch time, layer types it cannot run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..attention.blocks import BlockLayout, layout_from_blocks, static_layout
from ..attention.gated import GatedAttention
from ..attention.indexer import blocks_from_selection
from ..attention.layer import LayerAttention, NativeAttention, PatternAttention
from ..attention.pattern import Pattern
from .comm import Comm
from .errors import CPConfigError
from .shard import ShardContext, Span

FULL = Pattern()
"""The model's own attention under cp: every key the global mask allows (dense causal, by documents)."""


class Rule:
    """Base: which pairs of a (query span, key span) may attend; `sink` (H,) logits, `head_groups` of the pattern."""

    sink: torch.Tensor | None = None
    head_groups: int = 1
    cache_key: Any = None  # rules with equal keys need the same ring steps in one forward pass (None: not shared)

    def prepare(self, ctx: ShardContext, query: torch.Tensor, key: torch.Tensor, all_queries: bool) -> None:
        """Called once per attention call with this rank's query/key shards, before any data moves."""

    def layout(self, ctx: ShardContext, q: Span, kv: Span) -> BlockLayout | None:
        raise NotImplementedError  # abstract: each rule defines it


class StaticRule(Rule):
    def __init__(self, pattern: Pattern, window: int | None, sink: torch.Tensor | None = None):
        self.pattern, self.window, self.sink = pattern, window, sink
        self.head_groups = pattern.head_groups
        self.cache_key = ("static", pattern.key(), window)

    def layout(self, ctx: ShardContext, q: Span, kv: Span) -> BlockLayout | None:
        if kv.start >= q.end:  # causal: every key is after every query
            return None
        mask = ctx.mask(q, kv, self.window)
        size = self.pattern.block_size
        layout = static_layout(self.pattern, mask, None, block_q=size, block_k=size, causal=True)
        return layout if bool(layout.mask.any()) else None


@dataclass
class DynamicRule(Rule):
    """A content-selected pattern: `layer.layout` selects over the gathered keys for this rank's queries."""

    layer: Any
    window: int | None
    selected: dict[Span, torch.Tensor] = field(default_factory=dict)  # q span -> (B, Lq, L) bool

    def prepare(self, ctx: ShardContext, query: torch.Tensor, key: torch.Tensor, all_queries: bool) -> None:
        comm: Comm = ctx.comm
        with torch.no_grad():
            full_key = _in_global_order(ctx, comm.all_gather(key.detach()))
            whole = Span(0, ctx.seq_len)
            local = []
            offset = 0
            for span in ctx.spans(comm.rank):
                chunk = query[:, :, offset : offset + span.length]
                layout = self.layer.layout(chunk, full_key, ctx.mask(span, whole, self.window))
                local.append(layout.to_dense()[:, 0])
                offset += span.length
            if not all_queries:
                self.selected = dict(zip(ctx.spans(comm.rank), local))
                return
            gathered = comm.all_gather(torch.cat(local, dim=1).to(torch.uint8))
            for r, part in enumerate(gathered):
                offset = 0
                for span in ctx.spans(r):
                    self.selected[span] = part[:, offset : offset + span.length].bool()
                    offset += span.length

    def rows(self, q: Span) -> torch.Tensor:
        """The selection (B, Lq, L) of queries `q`, from the stored spans that hold or tile it."""
        if q in self.selected:
            return self.selected[q]
        for s, rows in self.selected.items():
            if s.start <= q.start and q.end <= s.end:  # a piece of one stored span
                return rows[:, q.start - s.start : q.end - s.start]
        parts = sorted((s for s in self.selected if q.start <= s.start < q.end), key=lambda s: s.start)
        return torch.cat([self.selected[s] for s in parts], dim=1)

    def layout(self, ctx: ShardContext, q: Span, kv: Span) -> BlockLayout | None:
        chosen = self.rows(q)[:, :, kv.start : kv.end]
        if not bool(chosen.any()):
            return None
        mask = ctx.mask(q, kv, self.window)
        bq, bk = max(1, min(self.layer.block_size, q.length)), self.layer.block_size
        blocks, keep = blocks_from_selection(chosen, bq, bk)
        q_pos, kv_pos = mask.positions(chosen.device)
        return layout_from_blocks(
            blocks[:, None], mask, None, q_pos, kv_pos, block_q=bq, block_k=bk, token_keep=keep[:, None]
        )


def _in_global_order(ctx: ShardContext, parts: list[torch.Tensor]) -> torch.Tensor:
    """Every rank's (B, H, L_local, D) shard laid out along the whole row's token order."""
    out = parts[0].new_empty(*parts[0].shape[:2], ctx.seq_len, *parts[0].shape[3:])
    for r, part in enumerate(parts):
        offset = 0
        for span in ctx.spans(r):
            out[:, :, span.start : span.end] = part[:, :, offset : offset + span.length]
            offset += span.length
    return out


@dataclass
class Mix:
    """A gated layer: `full` and `sparse` branches, combined by `layer.mix`."""

    layer: GatedAttention
    full: Rule
    sparse: Rule


Plan = Rule | Mix


def plan_for(layer: LayerAttention, window: int | None = None) -> Plan:
    """The rule(s) a cp rank runs for one layer module; `window` is the model's own sliding window."""
    if isinstance(layer, NativeAttention):
        return StaticRule(FULL, window)
    if isinstance(layer, PatternAttention):
        return StaticRule(layer.pattern, window, layer.sink_logit)
    if isinstance(layer, GatedAttention):
        sparse = plan_for(layer.sparse, window)
        if isinstance(sparse, Mix):
            raise CPConfigError("cp cannot run a gated layer whose sparse branch is gated again")
        return Mix(layer, StaticRule(FULL, window), sparse)
    if callable(getattr(layer, "layout", None)) and hasattr(layer, "stage"):  # a content-selected pattern (dsa)
        if getattr(layer, "compute_loss", False):
            raise CPConfigError(
                "cp does not run the dsa indexer loss yet (its KL target needs every key of each query); "
                "valid under cp: stages whose losses leave out indexer_kl"
            )
        return DynamicRule(layer, window) if layer.stage == "sparse" else StaticRule(FULL, window)
    raise CPConfigError(
        f"cp cannot run attention layer {type(layer).__name__}; valid: the model's own attention, pattern layers "
        "(sliding-window, loza, s2, ...), gated layers and layers with a `layout(query, key, mask)` method (dsa)"
    )


def rules_of(plan: Plan) -> list[Rule]:
    return [plan.full, plan.sparse] if isinstance(plan, Mix) else [plan]
