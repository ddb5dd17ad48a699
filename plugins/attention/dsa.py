"""`dsa`: DeepSeek-V3.2-style sparse attention (lightning indexer + top-k keys), retrofitted to any model.

A retrofit trains in two stages (DeepSeek-V3.2, arXiv:2512.02556), driven by this module's functions:

    lcplug.patch(model, attention="dsa:stage=warmup")       # output: the model's own dense attention
    enable_indexer_loss(model)                               # DSA layers record their loss in each forward
    opt = torch.optim.AdamW(indexer_parameters(model), lr=1e-3)
    model(**batch); indexer_loss(model).backward(); opt.step()            # warm-up: only the indexer learns
    set_stage(model, "sparse")                               # attention now runs on the selection
    opt = torch.optim.AdamW(model.parameters(), lr=7.3e-6)
    (model(**batch).loss + indexer_loss(model)).backward(); opt.step()    # LM loss -> model, KL -> indexer
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lcplug.attention import LazyMask, check_block_size
from lcplug.attention.block_torch import CHUNK_ELEMENTS
from lcplug.attention.blocks import BlockLayout, layout_from_blocks
from lcplug.attention.compact import LayerAccess, compact_layout, compact_of, full_kv
from lcplug.attention.executors import EXECUTORS, RUNNERS, choose
from lcplug.attention.indexer import (
    LightningIndexer,
    blocks_from_selection,
    concat_blocks,
    index_scores,
    select_blocks,
    select_tokens,
)
from lcplug.attention.layer import LayerAttention, dense_allowed
from lcplug.attention.positions import pattern_positions
from lcplug.attention.reference import masked_softmax, reference_attention
from lcplug.errors import ParamError, UnsupportedModelError
from lcplug.hookspecs import hookimpl
from lcplug.params import Params, param
from lcplug.patching import patch, patch_state
from lcplug.plugin import Adapter, AttentionPlugin

Stage = Literal["warmup", "sparse"]


@dataclass(frozen=True)
class DSAParams(Params):
    topk: int = param(
        2048,
        "keys each query attends to, its own included (select=block: topk // block_size whole key blocks); "
        "a topk at or above the visible keys is dense attention",
        check=lambda v: v >= 1,
        valid="an integer >= 1",
    )
    select: Literal["block", "token"] = param(
        "block", "block: each query keeps its best whole key blocks; token: its best single keys (exact DSA)"
    )
    block_size: int = param(
        64,
        "block size of the block-sparse layout (and of the selected blocks when select=block)",
        check=lambda v: v >= 1 and not v & (v - 1),
        valid="a power of two, e.g. 64 or 128",
    )
    heads: int = param(
        64, "indexer heads H_I (at most the model's query heads)", check=lambda v: v >= 1, valid="an integer >= 1"
    )
    dim: int = param(
        128,
        "indexer head dimension d_I (at most the model's head dimension)",
        check=lambda v: v >= 1,
        valid="an integer >= 1",
    )
    stage: Stage = param(
        "warmup",
        "warmup: the model's own dense attention runs and only the indexer learns; sparse: attention runs on the "
        "selection",
    )
    executor: Literal[EXECUTORS] = param("auto", "which executor runs the selection; auto picks per device")

    def validate(self, owner: str | None = None) -> None:
        super().validate(owner)
        if self.select == "block" and self.topk % self.block_size:
            low = max(self.block_size, self.topk // self.block_size * self.block_size)
            raise ParamError(
                f"{owner or self._owner}: parameter 'topk' got {self.topk}; with select='block' it must be a multiple "
                f"of block_size={self.block_size} (e.g. {low} or {low + self.block_size})"
            )


@dataclass
class _Call:
    """What every query chunk of one attention call shares: sizes, visibility, positions, softmax settings."""

    mask: Any  # the LazyMask, or the model's mask as a dense boolean (B, 1, Lq, Lkv)
    batch: int
    lq: int
    lkv: int
    own_offset: int  # key index of query 0's own position
    q_pos: torch.Tensor  # (B, Lq)
    kv_pos: torch.Tensor  # (B, Lkv)
    block_q: int
    block_k: int
    scaling: float
    softcap: float | None

    def visible(self, q0: int, q1: int) -> torch.Tensor:
        """The model's own mask (causal, its window, padding, documents) for queries [q0, q1): (B, Lc, Lkv)."""
        if isinstance(self.mask, LazyMask):
            device = self.q_pos.device
            q_idx = (torch.arange(q0, q1, device=device) + self.mask.q_offset).view(1, 1, -1, 1)
            kv_idx = (torch.arange(self.lkv, device=device) + self.mask.kv_offset).view(1, 1, 1, -1)
            allowed = self.mask.allowed(q_idx, kv_idx)
        else:
            allowed = self.mask[:, :, q0:q1]
        return allowed.expand(self.batch, 1, q1 - q0, self.lkv)[:, 0]


class DSAAttention(LayerAttention):
    """One layer's DSA: a `LightningIndexer` that picks keys, and attention over the picked keys.

    The indexer reads the query and key states this attention call receives (post-RoPE, what the
    AttentionInterface gets), not the hidden states: its keys are projections of the model's own KV
    cache, so decode needs no extra cache (each step re-projects the cached keys, O(Lkv * d_I) work next
    to the O(Lkv * H * D) the attention reads anyway). It always sees them detached: the selection is
    discrete, so the LM loss never reaches the indexer, and the indexer loss never reaches the model.

    One indexer score per (query, key) serves all heads (layout group G = 1): the selection is shared by
    every head, hence trivially within each KV group, as DSA shares it across MLA heads.

    Post-RoPE states mixed by linear maps carry absolute position (DSA's own indexer applies RoPE to its
    q^I, k^I and stays relative): a row's selection depends on its position ids, so pass the same ones
    (generate counts them from each row's first real token) wherever two runs must agree.
    """

    def __init__(
        self,
        native_fn: Any,
        native_impl: str,
        indexer: LightningIndexer,
        *,
        topk: int,
        select: str,
        block_size: int,
        stage: str,
        executor: str,
    ):
        super().__init__(native_fn, native_impl)
        self.indexer = indexer
        self.topk, self.select, self.block_size = topk, select, block_size
        self.stage, self.executor = stage, executor
        self.compute_loss = False
        self.loss: torch.Tensor | None = None

    def forward(self, module: nn.Module, query, key, value, mask, *, scaling: float | None = None, dropout=0.0, **kw):
        self.loss = None
        sparse = self.stage == "sparse"
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
        executor = choose(self.executor, query.device, needs_grad)
        lazy = isinstance(mask, LazyMask)
        compact = compact_of(key, mask.kv_length if lazy else None)
        if compact is not None and not (sparse and lazy and executor != "reference" and not self.compute_loss):
            key, value = full_kv(key, value, compact)  # dense, reference and loss paths read every key
            compact = None
        if not sparse and not self.compute_loss:
            return self.run_native(module, query, key, value, mask, scaling=scaling, dropout=dropout, **kw)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        call = self._call(module, query, key, mask, scale, kw)
        index_keys = compact.index_keys if compact is not None else None
        blocks, keep, self.loss = self._select(query, key, call, select=sparse, index_keys=index_keys)
        if not sparse:  # warm-up: the model's own attention, bit for bit
            return self.run_native(module, query, key, value, mask, scaling=scaling, dropout=dropout, **kw)
        if compact is not None:  # read only the selected blocks from the cache
            layout = self._layout(call, blocks, keep)
            key, value = compact.fetch(layout.kv_blocks[layout.kv_blocks >= 0].unique().tolist())
            layout = compact_layout(layout, compact_of(key, None))
            return RUNNERS[executor](query, key, value, layout, scale, softcap=kw.get("softcap")), None
        if executor == "reference" or not lazy or (dropout and module.training):
            chosen = BlockLayout(call.block_q, call.block_k, call.lq, call.lkv, blocks[:, None], keep[:, None])
            allowed = dense_allowed(mask, query, key, module) & chosen.to_dense()
            return reference_attention(
                query, key, value, allowed, scale, softcap=kw.get("softcap"), dropout=dropout, training=module.training
            )
        layout = self._layout(call, blocks, keep)
        return RUNNERS[executor](query, key, value, layout, scale, softcap=kw.get("softcap")), None

    def layout(
        self, query: torch.Tensor, key: torch.Tensor, mask: LazyMask, position_ids: torch.Tensor | None = None
    ) -> BlockLayout:
        """The block layout the sparse stage runs for these states: the model's mask AND the selection."""
        call = self._call(None, query, key, mask, query.shape[-1] ** -0.5, {"position_ids": position_ids})
        with torch.no_grad():
            blocks, keep, _ = self._select(query, key, call, select=True, want_loss=False)
        return self._layout(call, blocks, keep)

    def _layout(self, call: _Call, blocks: torch.Tensor, keep: torch.Tensor) -> BlockLayout:
        return layout_from_blocks(
            blocks[:, None],
            call.mask,
            None,
            call.q_pos,
            call.kv_pos,
            block_q=call.block_q,
            block_k=call.block_k,
            token_keep=keep[:, None],
        )

    def kv_access(self) -> LayerAccess:
        """A cache keeps this layer's indexer keys and hands it only the blocks it selects (sparse stage)."""
        return LayerAccess(index=self.indexer.keys, block_size=self.block_size, compact=True)

    def _call(self, module, query: torch.Tensor, key: torch.Tensor, mask: Any, scaling: float, kw: dict) -> _Call:
        b, lq = query.shape[0], query.shape[2]
        lkv = mask.kv_length if isinstance(mask, LazyMask) else key.shape[2]
        if isinstance(mask, LazyMask):
            q_pos, kv_pos = pattern_positions(mask, kw.get("position_ids"), query.device)
            own_offset = mask.q_offset - mask.kv_offset
        else:
            mask = dense_allowed(mask, query, key, module)
            kv_pos = torch.arange(lkv, device=query.device)[None].expand(b, -1)
            q_pos, own_offset = kv_pos[:, lkv - lq :], lkv - lq
        block_q = max(1, min(self.block_size, lq))  # decode: one query per block, as the core's layouts do
        return _Call(mask, b, lq, lkv, own_offset, q_pos, kv_pos, block_q, self.block_size, scaling, kw.get("softcap"))

    def _select(self, query, key, call: _Call, *, select: bool, want_loss: bool | None = None, index_keys=None):
        """Selection as (kv_blocks (B, NQ, K), keep (B, NQ, K, BQ, BK)) when `select`, and the indexer loss.

        Chunked over query blocks so no (Lq, Lkv) tensor exists beyond one chunk; under autograd each chunk
        is recomputed in backward, so the indexer loss keeps O(N) activations, not O(N^2). `index_keys`: the
        indexer keys of every key, kept by a KV cache (then `key` holds only some blocks and is not read).
        """
        want_loss = self.compute_loss if want_loss is None else want_loss
        track = want_loss and torch.is_grad_enabled()
        with torch.set_grad_enabled(track):
            q_i, w = self.indexer.queries(query.detach())
            k_i = index_keys if index_keys is not None else self.indexer.keys(key.detach())
        per_row = call.batch * call.lkv * (self.indexer.heads + (query.shape[1] if want_loss else 0) + 8)
        rows = max(call.block_q, CHUNK_ELEMENTS // per_row // call.block_q * call.block_q)
        parts, loss_sum, count = [], None, 0
        for q0 in range(0, call.lq, rows):
            q1 = min(call.lq, q0 + rows)
            args = (q_i[:, q0:q1], w[:, q0:q1], k_i, query[:, :, q0:q1].detach(), key.detach(), q0, call, select)
            if track:
                out = checkpoint(self._chunk, *args, want_loss, use_reentrant=False)
            else:
                with torch.no_grad():
                    out = self._chunk(*args, want_loss)
            chunk_loss, chunk_count, blocks, keep = out
            if select:
                parts.append((blocks, keep))
            if want_loss:
                loss_sum = chunk_loss if loss_sum is None else loss_sum + chunk_loss
                count += int(chunk_count)
        blocks, keep = concat_blocks(parts) if select else (None, None)
        loss = loss_sum / max(count, 1) if want_loss else None
        return blocks, keep, loss

    def _chunk(self, q_i, w, k_i, query, key, q0: int, call: _Call, select: bool, want_loss: bool):
        scores = index_scores(q_i, k_i, w)  # (B, Lc, Lkv)
        q1 = q0 + q_i.shape[1]
        allowed = call.visible(q0, q1)
        blocks = keep = None
        if select:
            with torch.no_grad():
                allowed = self._selection(scores.detach(), allowed, call, q0, q1)
            blocks, keep = blocks_from_selection(allowed, call.block_q, call.block_k)
        if not want_loss:
            return None, None, blocks, keep
        loss_sum, count = attention_kl(scores, query, key, allowed, call.scaling, call.softcap)
        return loss_sum, count, blocks, keep

    def _selection(self, scores, visible, call: _Call, q0: int, q1: int) -> torch.Tensor:
        """The keys each query of [q0, q1) attends to: its top-k (tokens or blocks) among the visible ones."""
        if self.select == "token":
            own = (torch.arange(q0, q1, device=scores.device) + call.own_offset).clamp(0, call.lkv - 1)
            return select_tokens(scores, visible, own.expand(call.batch, -1), self.topk)
        bs = self.block_size
        kv_block = call.kv_pos.clamp(min=0) // bs
        num_blocks = int(kv_block.max()) + 1
        own_block = (call.q_pos[:, q0:q1].clamp(min=0) // bs).clamp(max=num_blocks - 1)
        return select_blocks(scores, visible, own_block, kv_block, num_blocks, self.topk // bs)

    def extra_repr(self) -> str:
        return (
            f"select={self.select}, topk={self.topk}, block_size={self.block_size}, stage={self.stage}, "
            f"executor={self.executor}"
        )


def attention_kl(
    index_scores: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    allowed: torch.Tensor,
    scaling: float,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed KL(p_t || softmax(I_t)) over the keys `allowed` (B, Lc, Lkv), and the number of queries counted.

    p_t is the main attention's distribution over the same keys, summed over heads and L1-normalised, from
    detached states: the target the indexer learns to imitate. Queries with no allowed key are skipped.
    """
    b, h, lc, d = query.shape
    hkv = key.shape[1]
    with torch.no_grad():
        scores = torch.matmul(query.reshape(b, hkv, h // hkv, lc, d), key[:, :, None].transpose(-1, -2)) * scaling
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        target = masked_softmax(scores.float(), allowed[:, None, None]).sum((1, 2)) / h
    rows = allowed.any(-1)
    logits = torch.where(rows[..., None], index_scores.masked_fill(~allowed, float("-inf")), 0.0)
    log_q = torch.where(allowed, torch.log_softmax(logits, dim=-1), 0.0)
    terms = torch.where(allowed, torch.xlogy(target, target) - target * log_q, 0.0)
    return terms.sum(), rows.sum()


class DSA(AttentionPlugin):
    """DeepSeek-V3.2 sparse attention (DSA): a lightning indexer picks the top-k keys of each query.

    A per-layer indexer scores every visible key, I_ts = sum_j w_tj * ReLU(q^I_tj . k^I_s), from the
    attention's own post-RoPE query and key states: q^I = W_q(q) in `heads` x `dim`, k^I = LayerNorm(W_k(k))
    from the KV heads concatenated (shared by the indexer heads), w = W_w(q) / sqrt(heads * dim). Each
    query then attends to its `topk` best keys (select=token, exact DSA) or to its topk // block_size best
    key blocks, a block scored by its best visible key (select=block). A query's own position (token) or
    own block (block) is always kept, so no query is left without a key, and a query's selection never
    depends on later tokens: prefill and decode select the same keys. All heads share the selection.
    Block executors run each query block over the union of its queries' key blocks, the token mask
    trimming each query to its own selection, so their work falls as neighbouring queries agree. The
    indexer itself is O(N^2), as in DSA, computed in chunks of query blocks so memory stays O(N).

    Stage `warmup` keeps the model's dense attention (bit-identical output) while the indexer learns to
    imitate it; stage `sparse` runs attention on the selection. `enable_indexer_loss`, `indexer_loss`,
    `indexer_parameters` and `set_stage` in this module drive the two stages. `heads` and `dim` are capped
    at the model's query heads and head dimension, so the indexer never costs more per (query, key) pair
    than the attention it steers. Indexer weights are model parameters, drawn reproducibly per layer.
    """

    name = "dsa"
    Params = DSAParams

    def check(self, model: nn.Module, adapter: Adapter) -> None:
        for module in adapter.attention_modules(model).values():
            attention_shape(module, adapter)

    def trainable_groups(self, model: nn.Module) -> dict[str, list[nn.Parameter]]:
        return {"indexer": indexer_parameters(model)}

    def aux_losses(self) -> dict[str, Callable[[nn.Module], torch.Tensor]]:
        return {"indexer_kl": indexer_loss}

    def prepare_training(self, model: nn.Module, losses: set[str]) -> None:
        enable_indexer_loss(model, "indexer_kl" in losses)

    def restage(self, model: nn.Module, spec: dict[str, Any]) -> bool:
        """A change of `stage` alone keeps the trained indexers (`set_stage`); anything else re-patches."""
        if spec.get("name") != self.name:
            return False
        params = {k: v for k, v in spec.items() if k != "name"}
        new = self.Params.from_dict(params, owner=self.qualname()).to_dict()
        old = self.params.to_dict()
        if {k: v for k, v in new.items() if k != "stage"} != {k: v for k, v in old.items() if k != "stage"}:
            return False
        set_stage(model, new["stage"])
        return True

    def layer_attention(
        self, layer_idx: int, attn_module: nn.Module, adapter: Adapter, *, native_fn: Any, native_impl: str
    ) -> DSAAttention:
        p = self.params
        check_block_size(p.block_size, self.qualname())
        heads, kv_heads, head_dim = attention_shape(attn_module, adapter)
        dtype = next(attn_module.parameters()).dtype
        indexer = LightningIndexer.for_layer(
            layer_idx, heads, kv_heads, head_dim, index_heads=p.heads, index_dim=p.dim, dtype=dtype
        )
        return DSAAttention(
            native_fn,
            native_impl,
            indexer,
            topk=p.topk,
            select=p.select,
            block_size=p.block_size,
            stage=p.stage,
            executor=p.executor,
        )


def attention_shape(attn_module: nn.Module, adapter: Adapter) -> tuple[int, int, int]:
    """(query heads, KV heads, head dimension) of one attention module: the indexer's input widths."""
    heads = adapter.num_heads(attn_module)
    config = getattr(attn_module, "config", None)
    head_dim = next(
        (v for v in (getattr(attn_module, n, None) for n in ("head_dim", "head_size")) if isinstance(v, int)),
        getattr(config, "head_dim", None),
    )
    if not isinstance(head_dim, int):
        raise UnsupportedModelError(
            f"attention:dsa needs the head dimension of {type(attn_module).__qualname__} "
            "(an integer `head_dim` or `head_size` on the module or `head_dim` on its config)"
        )
    groups = getattr(attn_module, "num_key_value_groups", None)
    kv_heads = heads // groups if isinstance(groups, int) else getattr(config, "num_key_value_heads", None) or heads
    return heads, kv_heads, head_dim


# ---- the training loop's interface ----------------------------------------------------------------------


def dsa_layers(model: nn.Module) -> list[DSAAttention]:
    """The model's DSA layer modules; a clear error if it is not patched with `dsa`."""
    layers = [m for m in model.modules() if isinstance(m, DSAAttention)]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no DSA layers; patch it with lcplug.patch(model, attention='dsa')"
        )
    return layers


def enable_indexer_loss(model: nn.Module, enabled: bool = True) -> None:
    """Make every DSA layer compute its indexer loss in the forward (stored on the layer; read it with
    `indexer_loss`). Off by default: the loss costs a dense pass over the visible (warm-up) or selected
    (sparse) keys, as DSA's indexer itself is O(N^2)."""
    for layer in dsa_layers(model):
        layer.compute_loss = enabled


def indexer_loss(model: nn.Module) -> torch.Tensor:
    """Sum over DSA layers of the last forward's indexer loss: the mean over queries of KL(p_t || softmax(I_t)).

    Warm-up: over every key the query sees, p_t the dense attention. Sparse: over the selected keys S_t,
    p_t the sparse attention. Its gradient reaches only the indexer weights (the indexer's inputs are
    detached), so add it to the LM loss in the sparse stage, use it alone in the warm-up.
    """
    losses = [layer.loss for layer in dsa_layers(model) if layer.loss is not None]
    if not losses:
        raise RuntimeError("no indexer loss recorded: call enable_indexer_loss(model) before the forward pass")
    device = losses[0].device
    return sum((loss.to(device) for loss in losses[1:]), losses[0])


def indexer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The indexer weights of every DSA layer: what the warm-up stage trains."""
    return [p for layer in dsa_layers(model) for p in layer.indexer.parameters()]


def set_stage(model: nn.Module, stage: Stage) -> nn.Module:
    """Re-patch a DSA model with another `stage`, keeping its indexer weights and loss switch.

    Re-patching with `lcplug.patch` alone would install freshly initialised indexers. Build the optimizer
    after this call: the indexer parameters are new objects.
    """
    state = patch_state(model)
    plugin = None if state is None else state.plugins.get("attention")
    if not isinstance(plugin, DSA):
        raise ValueError(f"{type(model).__name__} is not patched with attention 'dsa'")
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if ".lcplug_attention.indexer." in n}
    compute_loss = dsa_layers(model)[0].compute_loss
    spec = copy.deepcopy(state.manifest["spec"])
    spec["attention"]["stage"] = stage
    patch(model, spec)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in trained:
                p.copy_(trained[name])
    enable_indexer_loss(model, compute_loss)
    return model


@hookimpl
def lcplug_register(register):
    register(DSA)
