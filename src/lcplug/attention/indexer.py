"""The lightning indexer of DeepSeek-V3.2's sparse attention (DSA) and the selections it drives.

A small scorer runs on the attention call's own query and key states and says, per query, which keys
matter: I_ts = sum_j w_tj * ReLU(q^I_tj . k^I_s). Each query then keeps its top-k keys (`select_tokens`)
or top-k key blocks (`select_blocks`), and `blocks_from_selection` turns a chunk of per-query selections
into block lists plus a token mask, the form `layout_from_blocks` completes into a `BlockLayout`.

Selections are made per query, never pooled over a query block: a query's keys then depend only on
itself and the keys it may see, so a prefill selects exactly what decode selects one token at a time,
and no query's pattern depends on later tokens. Ties are broken towards the most recent key, the same
way whatever the row length, for the same reason.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

INIT_SEED = 0xD5A
"""Base of the per-layer init seed: two patches of the same model get the same indexer weights."""


class LightningIndexer(nn.Module):
    """Indexer weights of one layer: W_q -> (heads, dim), W_k -> dim (then LayerNorm), W_w -> heads.

    Inputs are the attention's query (B, H, Lq, D) and key (B, Hkv, Lkv, D) states, heads concatenated.
    Weights are drawn from a generator seeded with `seed`, so construction never consumes the global
    random stream and is reproducible.
    """

    def __init__(self, q_width: int, k_width: int, heads: int, dim: int, *, seed: int, dtype: torch.dtype):
        super().__init__()
        self.heads, self.dim = heads, dim
        g = torch.Generator().manual_seed(seed)

        def weight(rows: int, cols: int) -> nn.Parameter:
            w = torch.randn(rows, cols, generator=g) * cols**-0.5
            return nn.Parameter(w.to(dtype))

        self.wq = weight(heads * dim, q_width)
        self.wk = weight(dim, k_width)
        self.weights_proj = weight(heads, q_width)
        self.k_norm = nn.LayerNorm(dim, dtype=dtype)
        self.scale = (heads * dim) ** -0.5

    @classmethod
    def for_layer(
        cls, layer_idx: int, heads: int, kv_heads: int, head_dim: int, *, index_heads: int, index_dim: int, dtype
    ) -> LightningIndexer:
        """The indexer of attention layer `layer_idx` (H query and Hkv KV heads of `head_dim`): `index_heads`
        and `index_dim` capped at the layer's heads and head dimension, weights seeded per layer."""
        return cls(
            heads * head_dim,
            kv_heads * head_dim,
            min(index_heads, heads),
            min(index_dim, head_dim),
            seed=INIT_SEED + layer_idx,
            dtype=dtype,
        )

    def forward(self, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Indexer queries (B, Lq, heads, dim), keys (B, Lkv, dim) and head weights (B, Lq, heads)."""
        q_i, w = self.queries(query)
        return q_i, self.keys(key), w

    def queries(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Indexer queries (B, Lq, heads, dim) and head weights (B, Lq, heads) of query states (B, H, Lq, D)."""
        b, _, lq, _ = query.shape
        x_q = query.transpose(1, 2).reshape(b, lq, -1)
        q_i = F.linear(x_q, self.wq).view(b, lq, self.heads, self.dim)
        return q_i, F.linear(x_q, self.weights_proj) * self.scale

    def keys(self, key: torch.Tensor) -> torch.Tensor:
        """Indexer keys (B, Lkv, dim) of key states (B, Hkv, Lkv, D): one per token, so a KV cache can keep them."""
        x_k = key.transpose(1, 2).reshape(key.shape[0], key.shape[2], -1)
        return self.k_norm(F.linear(x_k, self.wk))

    def extra_repr(self) -> str:
        return f"heads={self.heads}, dim={self.dim}"


def index_scores(q_i: torch.Tensor, k_i: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """I (B, Lc, Lkv) in fp32 for a chunk of queries: q_i (B, Lc, heads, dim), k_i (B, Lkv, dim), w (B, Lc, heads)."""
    b, lc, heads, _ = q_i.shape
    r = torch.matmul(q_i.flatten(1, 2), k_i.transpose(1, 2)).view(b, lc, heads, -1).relu()
    return torch.matmul(w[:, :, None, :], r).squeeze(2).float()


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest finite-or-+inf entries of each row of `scores` (-inf = not selectable).

    Among equal scores the rightmost (most recent) entries win, independently of how many entries follow
    (trailing -inf entries change nothing), which keeps prefill and decode selections identical.
    """
    k = min(k, scores.shape[-1])
    threshold = scores.topk(k, dim=-1).values[..., -1:]
    above = scores > threshold
    tied = scores == threshold
    need = k - above.sum(-1, keepdim=True)
    from_right = tied.flip(-1).cumsum(-1).flip(-1)
    return (above | (tied & (from_right <= need))) & (scores > float("-inf"))


def select_tokens(scores: torch.Tensor, visible: torch.Tensor, own: torch.Tensor, k: int) -> torch.Tensor:
    """Each query's top-k visible keys, its own key (index `own`, (B, Lc)) always among them."""
    masked = scores.masked_fill(~visible, float("-inf"))
    masked.scatter_(-1, own[..., None], float("inf"))
    return top_k_mask(masked, k) & visible


def select_blocks(
    scores: torch.Tensor,
    visible: torch.Tensor,
    own_block: torch.Tensor,
    kv_block: torch.Tensor,
    num_blocks: int,
    k: int,
    reduce: Literal["amax", "sum"] = "amax",
) -> torch.Tensor:
    """Each query's top-k key blocks by the largest visible score inside the block (`reduce="amax"`) or the
    sum of its visible scores (`"sum"`: for attention probabilities, the mass a block receives), its own block
    always kept.

    `kv_block` (B, Lkv) is the block of each key and `own_block` (B, Lc) the block of each query's own
    position; blocks are counted on positions, so padding and cache offsets do not move their edges.
    Returns the visible keys of the kept blocks (B, Lc, Lkv).
    """
    masked = scores.masked_fill(~visible, float("-inf"))
    index = kv_block[:, None, :].expand_as(masked)
    per_block = masked.new_full((*masked.shape[:2], num_blocks), float("-inf"))
    per_block = per_block.scatter_reduce(-1, index, masked, "amax")
    if reduce == "sum":
        total = torch.zeros_like(per_block).scatter_add(-1, index, scores.masked_fill(~visible, 0.0))
        per_block = torch.where(per_block > float("-inf"), total, per_block)
    per_block.scatter_(-1, own_block[..., None], float("inf"))
    return top_k_mask(per_block, k).gather(-1, index) & visible


def blocks_from_selection(selected: torch.Tensor, block_q: int, block_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block lists and token mask of a chunk of per-query selections.

    `selected` (B, Lc, Lkv) with Lc a multiple of `block_q` except for the last chunk. Returns
    `kv_blocks` (B, NQc, K) — the key blocks holding any selected key of any query in the query block,
    sorted, -1 padded — and `keep` (B, NQc, K, BQ, BK), the selection inside them.
    """
    b, lc, lkv = selected.shape
    nq, nkb = math.ceil(lc / block_q), math.ceil(lkv / block_k)
    sel = F.pad(selected, (0, nkb * block_k - lkv, 0, nq * block_q - lc))
    sel = sel.view(b, nq, block_q, nkb, block_k).transpose(2, 3)  # (B, NQc, NKB, BQ, BK)
    present = sel.any(-1).any(-1)
    k = max(int(present.sum(-1).max()), 1)
    order = torch.where(present, torch.arange(nkb, device=sel.device), nkb).sort(dim=-1).values[..., :k]
    kv_blocks = torch.where(order < nkb, order, -1)
    keep = sel.gather(2, order.clamp(max=nkb - 1)[..., None, None].expand(-1, -1, -1, block_q, block_k))
    return kv_blocks, keep & (kv_blocks >= 0)[..., None, None]


def concat_blocks(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Join per-chunk (kv_blocks, keep) along query blocks, padding each to the widest K."""
    k = max(blocks.shape[-1] for blocks, _ in parts)
    blocks = [F.pad(bl, (0, k - bl.shape[-1]), value=-1) for bl, _ in parts]
    keeps = [F.pad(kp, (0, 0, 0, 0, 0, k - kp.shape[2])) for _, kp in parts]
    return torch.cat(blocks, dim=1), torch.cat(keeps, dim=1)
