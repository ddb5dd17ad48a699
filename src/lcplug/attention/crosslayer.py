"""Cross-layer KV sharing (HySparse): a full layer's keys, values and block choice, read by the layers after it.

A group is one full layer (the *oracle*) followed by sparse layers (its *readers*). In each forward pass
the oracle runs the model's own attention unchanged and also picks, per query, the top-k key blocks by its
own attention mass; it hands its K/V and that choice to the group's `SharedKV`. Each reader then mixes two
branches with a per-KV-head gate: its own queries over the oracle's K/V on the chosen blocks, and its own
K/V over a sliding window (+ sinks).

Why the K/V of the oracle's attention call and not its cache slot: decoder layers run in order, so within
one forward pass the oracle's call precedes its readers'. The tensors that call receives are exactly the
cached sequence (any cache, after the update) or the batch's K/V (training, no cache), post-RoPE, so one
path serves prefill, decode and training, needs no model-specific plumbing, and lets autograd carry the
readers' gradients into the oracle's K/V projections. A cache keeps the oracle's K/V once (it is a dense
layer) and, per reader, only the window (`kv_access`), which lcplug's KV tiers honour by dropping the rest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .block_torch import CHUNK_ELEMENTS
from .blocks import BlockLayout, layout_from_blocks
from .compact import LayerAccess
from .executors import RUNNERS, choose
from .gated import convex_mix
from .indexer import blocks_from_selection, concat_blocks, select_blocks
from .layer import LayerAttention, PatternAttention, dense_allowed
from .mask import LazyMask
from .positions import pattern_positions
from .reference import masked_softmax, reference_attention


@dataclass
class Shared:
    """What an oracle hands its readers for one forward pass: its K/V and, per query, the chosen key blocks.

    `blocks` (B, NQ, K) and `keep` (B, NQ, K, BQ, BK) are the per-query choice in block form (already ANDed
    with the oracle's mask); `mask` is the oracle's mask (a `LazyMask`, or a dense boolean (B, 1, Lq, Lkv)):
    the readers read the oracle's keys, so they see them as the oracle may.
    """

    key: torch.Tensor
    value: torch.Tensor
    blocks: torch.Tensor
    keep: torch.Tensor
    mask: Any
    q_pos: torch.Tensor
    kv_pos: torch.Tensor
    block_q: int
    block_k: int
    _memo: dict = field(default_factory=dict, repr=False)

    @property
    def lazy(self) -> bool:
        return isinstance(self.mask, LazyMask)

    def layout(self) -> BlockLayout:
        """The block layout of the choice (built once, shared by the group's readers)."""
        if "layout" not in self._memo:
            self._memo["layout"] = layout_from_blocks(
                self.blocks[:, None],
                self.mask,
                None,
                self.q_pos,
                self.kv_pos,
                block_q=self.block_q,
                block_k=self.block_k,
                token_keep=self.keep[:, None],
            )
        return self._memo["layout"]

    def allowed(self) -> torch.Tensor:
        """The choice as a dense (B, 1, Lq, Lkv) boolean: the reference path's mask, O(N^2)."""
        lq, lkv = self.q_pos.shape[1], self.kv_pos.shape[1]
        chosen = BlockLayout(self.block_q, self.block_k, lq, lkv, self.blocks[:, None], self.keep[:, None])
        return chosen.to_dense()


class SharedKV:
    """One group's hand-off from its oracle to its readers, valid for one forward pass.

    The oracle `put`s; each reader `take`s; the last reader of the pass drops the reference, so the oracle's
    K/V live no longer than the forward pass needs them.
    """

    def __init__(self, readers: int):
        self.readers = readers
        self._current: Shared | None = None
        self._left = 0

    def put(self, shared: Shared) -> None:
        self._current, self._left = shared, self.readers

    def take(self, query: torch.Tensor, layer_idx: int) -> Shared:
        current = self._current
        if current is None or current.q_pos.shape != (query.shape[0], query.shape[2]):
            raise RuntimeError(
                f"hysparse layer {layer_idx} found no K/V from its group's full layer for this call: the full "
                "layer must run before it in the same forward pass (layer skipping, per-layer recomputation "
                "and context parallelism are not supported)"
            )
        self._left -= 1
        if self._left <= 0:
            self._current = None
        return current


def attention_mass(
    query: torch.Tensor, key: torch.Tensor, visible: torch.Tensor, scaling: float, softcap: float | None
) -> torch.Tensor:
    """Head-summed attention probabilities (B, Lc, Lkv) of queries (B, H, Lc, D) over the `visible` (B, Lc, Lkv)
    keys (B, Hkv, Lkv, D), in fp32: how much of a full layer's attention each key receives."""
    b, h, lc, d = query.shape
    hkv = key.shape[1]
    scores = torch.matmul(query.reshape(b, hkv, h // hkv, lc, d), key[:, :, None].transpose(-1, -2)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    return masked_softmax(scores.float(), visible[:, None, None]).sum((1, 2))


class OracleAttention(LayerAttention):
    """A group's full layer: the model's own attention, unchanged, plus the block choice for its readers.

    Per query, the `topk` key blocks (of `block_size` positions) holding most of this layer's attention mass
    (head-summed probabilities), its own block always among them. Chosen per query from that query and the
    keys it may see only, so prefill and decode choose alike. The scores are recomputed from the call's
    query and key states (detached: the choice is discrete), in chunks of queries, so memory stays O(N);
    the cost is one more pass of q . k, as a fused kernel emitting block maxima would avoid.
    """

    def __init__(
        self, native_fn: Callable[..., Any], native_impl: str, shared: SharedKV, *, topk: int, block_size: int
    ):
        super().__init__(native_fn, native_impl)
        self.shared, self.topk, self.block_size = shared, topk, block_size

    def forward(self, module: nn.Module, query, key, value, mask, *, scaling: float | None = None, **kwargs: Any):
        out = self.run_native(module, query, key, value, mask, scaling=scaling, **kwargs)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        self.shared.put(self.choose(module, query, key, value, mask, scale, kwargs))
        return out

    def choose(self, module: nn.Module, query, key, value, mask: Any, scaling: float, kwargs: dict) -> Shared:
        """This call's K/V and per-query block choice, as the readers take them."""
        b, _, lq, _ = query.shape
        lkv = key.shape[2]
        if isinstance(mask, LazyMask):
            q_pos, kv_pos = pattern_positions(mask, kwargs.get("position_ids"), query.device)
        else:
            mask = dense_allowed(mask, query, key, module).expand(b, 1, lq, lkv)
            kv_pos = torch.arange(lkv, device=query.device)[None].expand(b, -1)
            q_pos = kv_pos[:, lkv - lq :]
        bs = self.block_size
        block_q = max(1, min(bs, lq))
        kv_block = kv_pos.clamp(min=0) // bs
        num_blocks = int(kv_block.max()) + 1
        rows = max(block_q, CHUNK_ELEMENTS // (b * lkv * (query.shape[1] + 4)) // block_q * block_q)
        parts = []
        with torch.no_grad():
            for q0 in range(0, lq, rows):
                q1 = min(lq, q0 + rows)
                visible = _visible(mask, q0, q1, b, lkv, query.device)
                queries = query[:, :, q0:q1].detach()
                mass = attention_mass(queries, key.detach(), visible, scaling, kwargs.get("softcap"))
                own = (q_pos[:, q0:q1].clamp(min=0) // bs).clamp(max=num_blocks - 1)
                chosen = select_blocks(mass, visible, own, kv_block, num_blocks, self.topk, reduce="sum")
                parts.append(blocks_from_selection(chosen, block_q, bs))
        blocks, keep = concat_blocks(parts)
        return Shared(key, value, blocks, keep, mask, q_pos, kv_pos, block_q, bs)

    def extra_repr(self) -> str:
        readers = self.shared.readers
        return f"full ({self.native_impl}) + top-{self.topk} blocks of {self.block_size} for {readers} layers"


def _visible(mask: Any, q0: int, q1: int, batch: int, lkv: int, device: torch.device) -> torch.Tensor:
    """The model's own mask for queries [q0, q1) over every key: (B, q1 - q0, Lkv)."""
    if isinstance(mask, LazyMask):
        q_idx = (torch.arange(q0, q1, device=device) + mask.q_offset).view(1, 1, -1, 1)
        kv_idx = (torch.arange(lkv, device=device) + mask.kv_offset).view(1, 1, 1, -1)
        allowed = mask.allowed(q_idx, kv_idx)
    else:
        allowed = mask[:, :, q0:q1]
    return allowed.expand(batch, 1, q1 - q0, lkv)[:, 0]


class ReaderAttention(LayerAttention):
    """A group's sparse layer: gate * (own queries over the oracle's K/V on its chosen blocks)
    + (1 - gate) * (own queries over own K/V in a sliding window, + sinks).

    `gate` has one entry per KV head, clamped to [0, 1] (`convex_mix`); at 0 the layer is exactly its window
    branch. The window branch is a `PatternAttention`, so every executor and KV tier serves it as they serve
    `sliding-window`, and a cache keeps only its window (`kv_access`): this layer never reads its own keys
    beyond it. `executor` runs the shared branch (`reference`: densely).
    """

    def __init__(
        self,
        native_fn: Callable[..., Any],
        native_impl: str,
        shared: SharedKV,
        window: PatternAttention,
        gate: torch.Tensor,
        *,
        layer_idx: int,
        executor: str,
    ):
        super().__init__(native_fn, native_impl)
        self.shared, self.window, self.executor, self.layer_idx = shared, window, executor, layer_idx
        self.gate = nn.Parameter(gate.detach().clone().float())

    def forward(self, module: nn.Module, query, key, value, mask, *, scaling: float | None = None, **kwargs: Any):
        source = self.shared.take(query, self.layer_idx)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        shared = self.read_shared(module, query, source, scale, kwargs)
        local = self.window(module, query, key, value, mask, scaling=scale, **kwargs)[0]
        return convex_mix(self.gate, shared, local), None

    def read_shared(self, module: nn.Module, query, source: Shared, scaling: float, kwargs: dict) -> torch.Tensor:
        """This layer's queries over the oracle's K/V, restricted to the chosen blocks: (B, Lq, H, D)."""
        key, value = source.key, source.value
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
        executor = choose(self.executor, query.device, needs_grad)
        dropout = kwargs.get("dropout", 0.0)
        if executor == "reference" or not source.lazy or (dropout and module.training):
            out, _ = reference_attention(
                query,
                key,
                value,
                source.allowed(),
                scaling,
                softcap=kwargs.get("softcap"),
                dropout=dropout,
                training=module.training,
            )
            return out
        return RUNNERS[executor](query, key, value, source.layout(), scaling, softcap=kwargs.get("softcap"))

    def kv_access(self) -> LayerAccess:
        """Only the window branch reads this layer's own keys: a cache keeps its window and sinks."""
        return self.window.kv_access()

    def extra_repr(self) -> str:
        return f"gate of size {self.gate.numel()} over shared top-k blocks | {self.window.pattern.describe()}"
