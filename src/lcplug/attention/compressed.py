"""Compressed attention layers: a raw sliding window plus compressed entries (`compress`), per layer.

`CompressedAttention` runs one softmax over the union {raw keys of the query's window} + {visible
compressed entries, or the top-k of them by an indexer}: KSA (summaries of older chunks), CSA (indexer
top-k over overlapping entries) and HCA (every entry). `GatedCompressedAttention` runs NSA's three
branches, each its own softmax, mixed by learned per-head gates: compressed entries, raw blocks selected
by the compressed branch's attention, and the raw window.

Two executions of the same math, tested against each other:
- the dense reference: keys and compressed entries concatenated, one masked (B, H, Lq, Lkv + Nc) softmax;
- the block path: the raw window through the block-gather executor (`block_attention`, a static layout),
  the selected entries through the same executor on a layout built from the selection, merged exactly
  through their log-sum-exps. Only the torch executor returns log-sum-exps, so it runs every branch.

Where the entries come from: given plain K/V (transformers' `DynamicCache`, no cache, training), a layer
pools them afresh from the raw K/V at hand in every call (decode included). lcplug's KV tiers store them
instead (`kv_access` declares a `compress.Pooling`): the cache pools each entry once, when its window
completes, keeps raw only the window and the open entry windows (`kv_bytes_per_token`, the memory these
methods save), and hands the layer its raw blocks (compact K/V) with the entries in the tag
(`CompactKV.entries`); the layer then reads those and pools nothing. NSA keeps every raw token (its
selection branch may read any block) and always pools afresh.

Retrofit training (`compress_parameters`, `distill_loss`): with `distill` switched on each layer also runs
the model's own attention on the same query/key/value, detached, and records the mean squared error of
its output against it: layer-wise attention distillation against the unpatched layer, in one forward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .block_torch import CHUNK_ELEMENTS, block_attention
from .blocks import BlockLayout, layout_from_blocks, static_layout
from .compact import CompactKV, LayerAccess, compact_layout, compact_of, expand, full_kv
from .compress import CachedEntries, Compressor, Entries, Geometry, Pooling, entry_visibility, find_entries
from .executors import choose
from .indexer import LightningIndexer, blocks_from_selection, concat_blocks, index_scores, top_k_mask
from .layer import LayerAttention, dense_allowed
from .mask import LazyMask
from .merge import LayoutSets, merged_attention
from .positions import pattern_positions
from .reference import masked_softmax, reference_attention

SelectionLoss = Callable[..., tuple[torch.Tensor, torch.Tensor]]
"""(index scores (B, Lc, Nc), query (B, H, Lc, D), keys (B, Hkv, Nc, D), allowed (B, Lc, Nc), scaling,
softcap) -> (summed KL of the attention's distribution to the indexer's, rows counted)."""


@dataclass
class _Call:
    """What every query chunk of one attention call shares: the model's mask, positions, softmax settings."""

    mask: Any  # the LazyMask, or the model's mask as a dense boolean (B, 1, Lq, Lkv)
    q_pos: torch.Tensor  # (B, Lq)
    kv_pos: torch.Tensor  # (B, Lkv)
    scaling: float
    softcap: float | None
    position_ids: torch.Tensor | None
    compact: CompactKV | None = None  # the key tensor holds only these blocks (a KV tier's raw window)

    @property
    def lazy(self) -> bool:
        return isinstance(self.mask, LazyMask)

    def sees(self, q0: int, q1: int, slots: torch.Tensor) -> torch.Tensor:
        """The model's own mask for queries [q0, q1) at key slots (B, N): (B, q1 - q0, N)."""
        b = self.q_pos.shape[0]
        if self.lazy:
            q_idx = (torch.arange(q0, q1, device=slots.device) + self.mask.q_offset).view(1, 1, -1, 1)
            allowed = self.mask.allowed(q_idx, (slots + self.mask.kv_offset)[:, None, None, :])
            return allowed.expand(b, 1, q1 - q0, slots.shape[1])[:, 0]
        rows = self.mask[:, 0, q0:q1].expand(b, -1, -1)
        return rows.gather(-1, slots[:, None, :].expand(-1, q1 - q0, -1))


class CompressedAttention(LayerAttention):
    """One softmax over the raw window and the visible (or top-k selected) compressed entries of a layer.

    `compressor` pools K/V windows (geometry `geometry`); `indexer`, if given, picks each query's `topk`
    best visible entries (scores from the query states and the compressed keys, both detached, as DSA's
    indexer), trained by `selection_loss` when `compute_indexer_loss` is on. `sink_logit` (per query head)
    adds softmax mass on no value, as DeepSeek-V4's per-head sink.
    """

    def __init__(
        self,
        native_fn: Callable[..., Any],
        native_impl: str,
        *,
        geometry: Geometry,
        compressor: Compressor,
        kv_heads: int,
        head_dim: int,
        num_heads: int,
        block_size: int,
        executor: str,
        indexer: LightningIndexer | None = None,
        topk: int | None = None,
        selection_loss: SelectionLoss | None = None,
        learnable_sink: bool = False,
        sink_init: float = -20.0,
    ):
        super().__init__(native_fn, native_impl)
        self.geometry, self.compressor = geometry, compressor
        self.kv_heads, self.head_dim = kv_heads, head_dim
        self.pattern_raw = geometry.raw_pattern(block_size)
        self.block_size, self.executor = block_size, executor
        self.indexer, self.topk, self.selection_loss = indexer, topk, selection_loss
        self.sink_logit = nn.Parameter(torch.full((num_heads,), float(sink_init))) if learnable_sink else None
        self.distill = False
        self.compute_indexer_loss = False
        self.loss: torch.Tensor | None = None  # distillation loss of the last forward
        self.indexer_loss: torch.Tensor | None = None

    # ---- the forward -------------------------------------------------------------------------------------

    def forward(self, module: nn.Module, query, key, value, mask, *, scaling: float | None = None, dropout=0.0, **kw):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
        dense = (
            choose(self.executor, query.device, needs_grad) == "reference"
            or not isinstance(mask, LazyMask)
            or bool(dropout and module.training)
        )
        compact = compact_of(key, mask.kv_length if isinstance(mask, LazyMask) else None)
        if compact is not None and compact.entries is None:  # a cache that holds raw blocks only
            key, value = full_kv(key, value, compact)
            compact = None
        call = self._call(module, query, key, mask, scale, kw, compact)
        if compact is not None:  # a KV tier's raw window and the entries it pooled
            cached = self._cached(call)
            entries, ck, cv, index_keys = cached.entries, cached.keys, cached.values, cached.index_keys
            if dense:  # the reference reads full-length keys: the raw window in place, zeros it never reaches
                key, value = expand(key, value, compact)
        else:
            entries = find_entries(call.kv_pos, self.geometry.size, self.geometry.stride)
            (ck, cv), index_keys = self.compressor(key, value, entries), None
        if dense:
            out = self.dense(module, query, key, value, ck, cv, entries, call, dropout, index_keys)
        else:
            out = self.blocks(query, key, value, ck, cv, entries, call, index_keys)
        self.loss = self._distill(module, query, key, value, mask, out, scale, kw) if self.distill else None
        return out, None

    def _cached(self, call: _Call) -> CachedEntries:
        """The entries a KV tier handed over (`compress.CachedEntries`), checked against this call's positions:
        a cache and a layer that counted positions differently would read wrong entries silently."""
        if self.distill:
            raise RuntimeError(
                "compressed attention: distillation runs the model's own attention over every raw key, which a "
                "KV tier no longer holds; train without the tiered cache (use_cache=False or the default cache)"
            )
        if call.q_pos.shape[1] == call.kv_pos.shape[1] and bool((call.kv_pos.diff(dim=-1) != 1).any()):
            raise RuntimeError(
                "compressed attention: position ids that restart or jump (packed rows?) cannot be served by a KV "
                "tier, whose entries follow one position per slot; use the default cache"
            )
        cached = call.compact.entries
        e = cached.entries
        if e.count and bool((e.valid & (call.kv_pos.gather(1, e.slots) != e.start)).any()):
            raise RuntimeError(
                "compressed attention: the KV tier's entries sit at positions this call does not give their slots "
                "(position ids that do not count from each row's first real token?)"
            )
        return cached

    def dense(
        self, module, query, key, value, ck, cv, entries: Entries, call: _Call, dropout: float, index_keys=None
    ) -> torch.Tensor:
        """The reference: raw keys and selected entries concatenated, one masked softmax, O(N^2)."""
        raw = self._raw_allowed(call)
        chosen = torch.cat(self._entry_chunks(query, ck, entries, call, index_keys), dim=1)[:, None]
        out, _ = reference_attention(
            query,
            torch.cat([key, ck], dim=2),
            torch.cat([value, cv], dim=2),
            torch.cat([raw, chosen], dim=-1),
            call.scaling,
            softcap=call.softcap,
            sink_logit=self.sink_logit,
            dropout=dropout,
            training=module.training,
        )
        return out

    def blocks(self, query, key, value, ck, cv, entries: Entries, call: _Call, index_keys=None) -> torch.Tensor:
        """The block path: one softmax over the raw window and the selected entries, each set through the
        block executor's split halves (fused CPU kernels) and merged as one autograd node."""
        layouts, tensors = [self._raw_layout(call)], (key, value)
        if entries.count:
            layouts.append(
                self._entry_layout(query, self._entry_chunks(query, ck, entries, call, index_keys), entries.count)
            )
            tensors += (ck, cv)
        sets = LayoutSets(layouts, call.scaling, call.softcap)
        return merged_attention(query, sets, tensors, self.sink_logit).transpose(1, 2)

    # ---- pieces shared with the gated variant ------------------------------------------------------------

    def _call(
        self, module, query: torch.Tensor, key: torch.Tensor, mask: Any, scaling: float, kw: dict, compact=None
    ) -> _Call:
        if compact is not None and not isinstance(mask, LazyMask):
            raise RuntimeError(
                "compressed attention got a KV tier's compact K/V with a mask that is not lcplug's lazy mask; "
                "run the model through lcplug.patch (its dispatcher builds the mask)"
            )
        if isinstance(mask, LazyMask):
            q_pos, kv_pos = pattern_positions(mask, kw.get("position_ids"), query.device)
        else:
            mask = dense_allowed(mask, query, key, module)
            lq, lkv = query.shape[2], key.shape[2]
            kv_pos = torch.arange(lkv, device=query.device)[None].expand(query.shape[0], -1)
            q_pos = kv_pos[:, lkv - lq :]
        return _Call(mask, q_pos, kv_pos, scaling, kw.get("softcap"), kw.get("position_ids"), compact)

    def _rows(self, call: _Call, width: int, heads: int) -> int:
        """Queries per chunk of the selection loop: a multiple of the query block, bounded in memory."""
        block_q = self._block_q(call)
        per_row = call.q_pos.shape[0] * max(width, 1) * (heads + 4)
        return max(block_q, CHUNK_ELEMENTS // per_row // block_q * block_q)

    def _block_q(self, call: _Call) -> int:
        return max(1, min(self.block_size, call.q_pos.shape[1]))

    def _raw_allowed(self, call: _Call) -> torch.Tensor:
        """(B, 1, Lq, Lkv): the model's mask AND the raw window, densely."""
        allowed = call.mask.dense() if call.lazy else call.mask
        return allowed & self.pattern_raw.allows(call.q_pos[:, None, :, None], call.kv_pos[:, None, None, :])

    def _raw_layout(self, call: _Call) -> BlockLayout:
        bs = self.block_size
        layout = static_layout(self.pattern_raw, call.mask, call.position_ids, block_q=bs, block_k=bs)
        return compact_layout(layout, call.compact) if call.compact is not None else layout

    def _visible_entries(self, q0: int, q1: int, entries: Entries, call: _Call) -> torch.Tensor:
        """(B, Lc, Nc): entries queries [q0, q1) may read: complete, and both window ends allowed by the model."""
        last = (entries.slots + entries.size - 1).clamp(max=call.kv_pos.shape[1] - 1)
        visible = entry_visibility(call.q_pos[:, q0:q1], entries, self.geometry)
        return visible & call.sees(q0, q1, entries.slots) & call.sees(q0, q1, last)

    def _entry_chunks(self, query, ck, entries: Entries, call: _Call, index_keys=None) -> list[torch.Tensor]:
        """Per chunk of queries, the entries each query reads (B, Lc, Nc): the visible ones, or their top-k
        by the indexer (scoring `index_keys`, the entries' indexer keys a KV tier kept, when given); records
        the indexer loss when asked."""
        lq = query.shape[2]
        rows = self._rows(call, entries.count, query.shape[1])
        want_loss = self.compute_indexer_loss and self.indexer is not None
        scorer = self._scorer(query, ck, index_keys) if self.indexer is not None else None
        chunks, loss_sum, count = [], None, 0
        for q0 in range(0, lq, rows):
            q1 = min(lq, q0 + rows)
            visible = self._visible_entries(q0, q1, entries, call)
            if scorer is None or entries.count == 0:
                chunks.append(visible)
                continue
            scores = scorer(q0, q1)
            with torch.no_grad():
                chunks.append(top_k_mask(scores.detach().masked_fill(~visible, float("-inf")), self.topk) & visible)
            if want_loss:
                part, rows_counted = self.selection_loss(
                    scores, query[:, :, q0:q1].detach(), ck.detach(), visible, call.scaling, call.softcap
                )
                loss_sum = part if loss_sum is None else loss_sum + part
                count += int(rows_counted)
        if want_loss:
            self.indexer_loss = loss_sum / max(count, 1) if loss_sum is not None else ck.sum() * 0
        return chunks

    def _scorer(self, query, ck, index_keys=None) -> Callable[[int, int], torch.Tensor]:
        """Index scores (B, Lc, Nc) of a chunk of queries; differentiable (w.r.t. the indexer only) when its
        loss is on."""
        track = self.compute_indexer_loss and torch.is_grad_enabled()
        with torch.set_grad_enabled(track):
            q_i, w = self.indexer.queries(query.detach())
            k_i = index_keys if index_keys is not None and not track else self.indexer.keys(ck.detach())

        def score(q0: int, q1: int) -> torch.Tensor:
            with torch.set_grad_enabled(track):
                return index_scores(q_i[:, q0:q1], k_i, w[:, q0:q1])

        return score

    def _entry_layout(self, query, chunks: list[torch.Tensor], count: int) -> BlockLayout:
        """The block layout of per-query entry selections over the compressed keys (length `count`)."""
        lq = query.shape[2]
        block_q = max(1, min(self.block_size, lq))
        blocks, keep = concat_blocks([blocks_from_selection(c, block_q, self.block_size) for c in chunks])
        return BlockLayout(block_q, self.block_size, lq, count, blocks[:, None], keep[:, None])

    def _distill(self, module, query, key, value, mask, out, scale: float, kw: dict) -> torch.Tensor:
        """Mean squared error of this layer's output against the model's own attention on the same inputs
        (detached): the teacher is the layer as it was before patching."""
        with torch.no_grad():
            teacher = self.run_native(module, query.detach(), key.detach(), value.detach(), mask, scaling=scale, **kw)
        real = _real_queries(mask, query)
        diff = (out.float() - teacher[0].float()) ** 2  # (B, Lq, H, D)
        weight = real[..., None, None].to(diff.dtype)
        return (diff * weight).sum() / (weight.sum() * diff.shape[2] * diff.shape[3]).clamp_min(1.0)

    # ---- what a cache needs ------------------------------------------------------------------------------

    def kv_access(self) -> LayerAccess:
        """A KV tier keeps raw only this layer's window (and the open entry windows), pools each entry once
        with this layer's compressor (and indexer keys), and hands over both (see the module docstring)."""
        index = self.indexer.keys if self.indexer is not None else None
        return LayerAccess(
            pattern=self.pattern_raw,
            block_size=self.block_size,
            compact=True,
            compress=Pooling(self.geometry, self.compressor, index),
        )

    def raw_tokens_kept(self, length: int) -> int:
        """Raw tokens a cache must keep for this layer at `length` tokens."""
        return min(length, self.geometry.raw_tokens())

    def entries_kept(self, length: int) -> int:
        """Compressed entries a cache must keep at `length` tokens (KSA: only those older than the window)."""
        g = self.geometry
        behind = length - g.window * g.chunk if g.disjoint else length
        return g.entries_at(max(behind, 0))

    def kv_bytes_per_token(self, length: int, dtype_bytes: int = 2) -> float:
        """Bytes per token this layer's cache must keep at `length` tokens: raw window K/V plus compressed
        entries (plus their indexer keys), against 2 * Hkv * D * dtype_bytes for dense attention."""
        per_raw = 2 * self.kv_heads * self.head_dim * dtype_bytes
        per_entry = per_raw + (self.indexer.dim * dtype_bytes if self.indexer is not None else 0)
        return (self.raw_tokens_kept(length) * per_raw + self.entries_kept(length) * per_entry) / length

    def dense_kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.kv_heads * self.head_dim * dtype_bytes

    def extra_repr(self) -> str:
        g = self.geometry
        select = f", top-{self.topk} by indexer" if self.indexer is not None else ""
        return (
            f"{self.pattern_raw.describe()} + entries of {g.size} every {g.stride}{select}, "
            f"disjoint={g.disjoint}, executor={self.executor}, sink_logit={self.sink_logit is not None}"
        )


class GatedCompressedAttention(CompressedAttention):
    """NSA: three branches, each its own softmax, mixed per head by learned gates.

    cmp: every visible compressed entry; slc: the raw tokens of the `select_count` blocks of
    `select_block` positions that the cmp branch attends to most (head-summed probabilities of the entries
    starting in each block), the first block and the query's own and previous blocks always among them;
    win: the raw window. Gates g_c = clamp(bias_c + q . w_c, 0, 1) per query head, from the query state
    (NSA's gate MLP reads the hidden state, which the attention function does not receive). They start at
    (cmp, slc, win) = (0, 0, 1): patching alone gives exactly sliding-window attention, and clamping at the
    ends still passes gradients, so training moves mass onto the other branches.
    """

    BRANCHES = ("cmp", "slc", "win")

    def __init__(self, *args: Any, select_block: int, select_count: int, num_heads: int, **kwargs: Any):
        super().__init__(*args, num_heads=num_heads, **kwargs)
        self.select_block, self.select_count = select_block, select_count
        self.gate_weight = nn.Parameter(torch.zeros(num_heads, self.head_dim, len(self.BRANCHES)))
        self.gate_bias = nn.Parameter(torch.tensor([[0.0, 0.0, 1.0]]).repeat(num_heads, 1))

    def gates(self, query: torch.Tensor) -> torch.Tensor:
        """(B, Lq, H, 3) gates of query states (B, H, Lq, D)."""
        mix = torch.einsum("bhld,hdc->blhc", query, self.gate_weight.to(query.dtype))
        return (mix + self.gate_bias.to(query.dtype)).clamp(0.0, 1.0)

    def dense(
        self, module, query, key, value, ck, cv, entries: Entries, call: _Call, dropout: float, index_keys=None
    ) -> torch.Tensor:
        visible = torch.cat(self._entry_chunks(query, ck, entries, call, index_keys), dim=1)
        raw = call.mask.dense() if call.lazy else call.mask
        selected = torch.cat(list(self._selections(query, ck, entries, visible, call)), dim=1)
        kw = {"softcap": call.softcap, "dropout": dropout, "training": module.training}
        cmp = (
            reference_attention(query, ck, cv, visible[:, None], call.scaling, **kw)[0]
            if entries.count
            else query.new_zeros(query.shape).transpose(1, 2)
        )
        slc = reference_attention(query, key, value, raw & selected[:, None], call.scaling, **kw)[0]
        win = reference_attention(query, key, value, self._raw_allowed(call), call.scaling, **kw)[0]
        return self._mix(query, [cmp, slc, win])

    def blocks(self, query, key, value, ck, cv, entries: Entries, call: _Call, index_keys=None) -> torch.Tensor:
        chunks = self._entry_chunks(query, ck, entries, call, index_keys)
        run = {"scaling": call.scaling, "softcap": call.softcap}
        cmp = (
            block_attention(query, ck, cv, self._entry_layout(query, chunks, entries.count), **run)
            if entries.count
            else query.new_zeros(query.shape).transpose(1, 2)
        )
        block_q = self._block_q(call)
        selections = self._selections(query, ck, entries, torch.cat(chunks, dim=1), call)
        blocks, keep = concat_blocks([blocks_from_selection(s, block_q, self.block_size) for s in selections])
        slc_layout = layout_from_blocks(
            blocks[:, None],
            call.mask,
            None,
            call.q_pos,
            call.kv_pos,
            block_q=block_q,
            block_k=self.block_size,
            token_keep=keep[:, None],
        )
        slc = block_attention(query, key, value, slc_layout, **run)
        win = block_attention(query, key, value, self._raw_layout(call), **run)
        return self._mix(query, [cmp, slc, win])

    def _mix(self, query, branches: list[torch.Tensor]) -> torch.Tensor:
        gates = self.gates(query)
        return sum(gates[..., i, None] * out for i, out in enumerate(branches))

    def _selections(self, query, ck, entries: Entries, visible: torch.Tensor, call: _Call) -> Iterator[torch.Tensor]:
        """Per chunk of queries, the raw tokens the slc branch reads (B, Lc, Lkv).

        Block importance: the cmp branch's attention probabilities (summed over heads, detached) of the
        entries starting in each selection block. Only blocks up to the query's own count, so a query's
        choice never depends on later tokens (prefill and decode agree); ties go to the most recent block.
        """
        lq, lkv = query.shape[2], call.kv_pos.shape[1]
        rows = self._rows(call, max(lkv, entries.count), query.shape[1])
        kv_block = call.kv_pos.clamp(min=0) // self.select_block  # (B, Lkv)
        entry_block = entries.start // self.select_block  # (B, Nc)
        slots = torch.arange(lkv, device=query.device).expand(call.kv_pos.shape[0], -1)
        for q0 in range(0, lq, rows):
            q1 = min(lq, q0 + rows)
            with torch.no_grad():
                own = call.q_pos[:, q0:q1].clamp(min=0) // self.select_block  # (B, Lc)
                blocks = int(own.max()) + 1
                importance = own.new_zeros(*own.shape, blocks, dtype=torch.float32)
                if entries.count:
                    probs = self._cmp_probs(query[:, :, q0:q1], ck, visible[:, q0:q1], call)  # (B, Lc, Nc)
                    index = entry_block.clamp(max=blocks - 1)[:, None, :].expand_as(probs)
                    importance.scatter_add_(-1, index, torch.where(visible[:, q0:q1], probs, 0.0))
                ids = torch.arange(blocks, device=query.device)
                forced = (ids == 0) | (ids == own[..., None]) | (ids == own[..., None] - 1)
                importance = importance.masked_fill(forced, float("inf")).masked_fill(
                    ids > own[..., None], float("-inf")
                )
                chosen = top_k_mask(importance, self.select_count)  # (B, Lc, NB)
                tokens = chosen.gather(-1, kv_block[:, None, :].clamp(max=blocks - 1).expand(-1, q1 - q0, -1))
                tokens &= (kv_block[:, None, :] < blocks) & call.sees(q0, q1, slots)
            yield tokens

    def _cmp_probs(self, query, ck, visible, call: _Call) -> torch.Tensor:
        """Head-summed cmp-branch attention probabilities (B, Lc, Nc) of a chunk of queries."""
        b, h, lc, d = query.shape
        groups = h // ck.shape[1]
        scores = torch.matmul(query.reshape(b, ck.shape[1], groups, lc, d), ck[:, :, None].transpose(-1, -2))
        scores = scores * call.scaling
        if call.softcap is not None:
            scores = torch.tanh(scores / call.softcap) * call.softcap
        return masked_softmax(scores.float(), visible[:, None, None]).sum((1, 2))

    def kv_access(self) -> LayerAccess:
        """Every raw key, in full (the slc branch may read any block); entries are pooled afresh per call."""
        return LayerAccess()

    def kv_bytes_per_token(self, length: int, dtype_bytes: int = 2) -> float:
        """The slc branch may read any raw block, so NSA keeps every raw token and the entries on top:
        NSA saves compute, not memory."""
        per_raw = 2 * self.kv_heads * self.head_dim * dtype_bytes
        return (length * per_raw + self.entries_kept(length) * per_raw) / length

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, select {self.select_count} blocks of {self.select_block}, gates (cmp, slc, win)"
        )


def _real_queries(mask: Any, query: torch.Tensor) -> torch.Tensor:
    """(B, Lq) True for queries at real (non-padding) tokens."""
    b, lq = query.shape[0], query.shape[2]
    pad = mask.padding() if isinstance(mask, LazyMask) else None
    if pad is None:
        return torch.ones(b, lq, dtype=torch.bool, device=query.device)
    return pad[:, mask.q_offset : mask.q_offset + lq].to(query.device)


# ---- the training loop's interface ----------------------------------------------------------------------


def compressed_layers(model: nn.Module) -> list[CompressedAttention]:
    """The model's compressed attention layers (ksa, csa, hca, nsa), in module order."""
    layers = [m for m in model.modules() if isinstance(m, CompressedAttention)]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no compressed attention layers; patch it with ksa, csa, hca or nsa"
        )
    return layers


def compress_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every compressor's pooling weights: what a retrofit's distillation stage trains (`train: compress`)."""
    return [p for layer in compressed_layers(model) for p in layer.compressor.parameters()]


def enable_distillation(model: nn.Module, enabled: bool = True) -> None:
    """Make every compressed layer also run the model's own attention and record `distill_loss` terms."""
    for layer in compressed_layers(model):
        layer.distill = enabled


def distill_loss(model: nn.Module) -> torch.Tensor:
    """Sum over compressed layers of the last forward's output MSE against the model's own attention."""
    losses = [layer.loss for layer in compressed_layers(model) if layer.loss is not None]
    if not losses:
        raise RuntimeError("no distillation loss recorded: call enable_distillation(model) before the forward pass")
    return sum((loss.to(losses[0].device) for loss in losses[1:]), losses[0])
