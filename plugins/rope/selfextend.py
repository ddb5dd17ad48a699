"""`selfextend`: training-free context extension by grouped positions (Jin et al. 2024, "LLM Maybe LongLM")."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lcplug.attention.install import install_attention
from lcplug.attention.layer import LayerAttention, dense_allowed
from lcplug.attention.mask import LazyMask
from lcplug.attention.reference import masked_softmax
from lcplug.errors import ConflictError, ParamError
from lcplug.hookspecs import hookimpl
from lcplug.params import Params, param
from lcplug.plugin import Adapter, Plugin, RopePlugin
from lcplug.positions import rope_positions
from lcplug.rope import base_config, install_rope, layer_inv_freq, require_fixed_frequencies, rotate


@dataclass(frozen=True)
class SelfExtendParams(Params):
    group: int = param(
        8,
        "group size G: keys beyond the window are seen at position floor(p / G)",
        check=lambda v: v >= 1,
        valid="an integer >= 1",
    )
    window: int = param(
        1024,
        "neighbour window W: keys fewer than W positions back keep their exact relative position",
        check=lambda v: v >= 1,
        valid="an integer >= 1, below the model's max_position_embeddings",
    )
    query_chunk: int = param(
        1024,
        "queries per step of the exact two-part attention (memory ~ chunk x keys per head)",
        check=lambda v: v >= 1,
        valid="an integer >= 1",
    )


class SelfExtendAttention(LayerAttention):
    """Attention with SelfExtend's two position maps, merged in one exact softmax.

    For a query at position p and a key at k (the positions the model's RoPE used): if p - k < W the
    score is the model's own (post-RoPE q . k); otherwise it is computed at grouped positions,
    floor(p / G) + W - floor(W / G) for the query and floor(k / G) for the key, so relative distances
    past the window shrink by G and continue where the window ends (the shift is LongLM's). The grouped
    q and k are the post-RoPE ones turned by R(grouped - p) (R(a)^-1 R(b) = R(b - a) per rotary pair),
    so no pre-RoPE state is needed and a KV cache of post-RoPE keys serves decode unchanged. Both
    score sets cover disjoint keys of one row and share one masked softmax: exact, not an
    approximation of two softmaxes. Queries run in chunks, so memory is O(chunk x keys) per head.
    """

    def __init__(
        self,
        native_fn: Callable[..., Any],
        native_impl: str,
        inv_freq: torch.Tensor,
        *,
        group: int,
        window: int,
        query_chunk: int,
    ):
        super().__init__(native_fn, native_impl)
        self.group, self.window, self.query_chunk = group, window, query_chunk
        self.register_buffer("inv_freq", inv_freq.detach().clone().float(), persistent=False)

    def forward(
        self,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: Any,
        *,
        scaling: float | None = None,
        dropout: float = 0.0,
        softcap: float | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
        lq, lkv = query.shape[-2], key.shape[-2]
        q_pos, k_pos = rope_positions(mask, kwargs.get("position_ids"), lq, lkv, query.device)
        g, w = self.group, self.window
        far_query = rotate(query, q_pos // g + (w - w // g) - q_pos, self.inv_freq)
        far_key = rotate(key, k_pos // g - k_pos, self.inv_freq)
        groups = query.shape[1] // key.shape[1]
        if groups > 1:
            key, far_key, value = (t.repeat_interleave(groups, dim=1) for t in (key, far_key, value))
        dense = None if isinstance(mask, LazyMask) else dense_allowed(mask, query, key, module)
        dropout = dropout if module.training else 0.0
        outs = []
        for start in range(0, lq, self.query_chunk):
            stop = min(start + self.query_chunk, lq)
            allowed = dense[..., start:stop, :] if dense is not None else self._allowed(mask, start, stop)
            near = (k_pos[:, None, :] > q_pos[:, start:stop, None] - w)[:, None]  # p - k < W
            near_ok, far_ok = allowed & near, allowed > near
            (n0, n1), (f0, f1) = _span(near_ok), _span(far_ok)
            parts = [
                (query[:, :, start:stop], key[:, :, n0:n1], near_ok[..., n0:n1]),
                (far_query[:, :, start:stop], far_key[:, :, f0:f1], far_ok[..., f0:f1]),
            ]
            values = torch.cat([value[:, :, n0:n1], value[:, :, f0:f1]], dim=2)
            outs.append(_two_part_attention(parts, values, scaling, softcap, dropout))
        return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None

    @staticmethod
    def _allowed(mask: LazyMask, start: int, stop: int) -> torch.Tensor:
        """The model's own mask for queries [start, stop): (B, 1, chunk, Lkv), never the full N x N."""
        device = mask.padding_mask.device if mask.padding_mask is not None else torch.device(mask.device)
        q_idx = torch.arange(start, stop, device=device).view(1, 1, -1, 1) + mask.q_offset
        kv_idx = torch.arange(mask.kv_length, device=device).view(1, 1, 1, -1) + mask.kv_offset
        return mask.allowed(q_idx, kv_idx)

    def extra_repr(self) -> str:
        return f"group={self.group}, window={self.window}, rotary_dim={2 * self.inv_freq.shape[-1]}"


def _span(allowed: torch.Tensor) -> tuple[int, int]:
    """[first, last + 1) of the key columns any query of the chunk may see, (0, 0) if none: keys outside are
    skipped (the causal future of a chunk, a sliding window's past, far keys for early queries)."""
    cols = allowed.reshape(-1, allowed.shape[-1]).any(0).nonzero()
    return (int(cols[0]), int(cols[-1]) + 1) if cols.numel() else (0, 0)


def _two_part_attention(
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    values: torch.Tensor,
    scaling: float,
    softcap: float | None,
    dropout: float,
) -> torch.Tensor:
    """One softmax over two key sets that each have their own queries: (q_i, k_i, allowed_i) per part.

    The keys of both parts are the columns of one row, so softmax(concat(q_1 k_1^T, q_2 k_2^T)) is exact.
    Without soft-capping it is one fused `scaled_dot_product_attention` call: queries [q_1 | q_2] and keys
    [k_1 | 0] and [0 | k_2] side by side give exactly those two score blocks (values are zero-padded to the
    same width, which fused kernels need). A query row that sees no key returns zeros (as `masked_softmax`
    does).
    """
    allowed = torch.cat([a for _, _, a in parts], dim=-1)
    if softcap is not None:
        scores = torch.cat([torch.matmul(q, k.transpose(-1, -2)) for q, k, _ in parts], dim=-1) * scaling
        scores = torch.tanh(scores / softcap) * softcap
        probs = masked_softmax(scores.float(), allowed).to(values.dtype)
        if dropout:
            probs = nn.functional.dropout(probs, p=dropout, training=True)
        return torch.matmul(probs, values)
    (q1, k1, _), (q2, k2, _) = parts
    query = torch.cat([q1, q2], dim=-1)
    key = torch.cat([nn.functional.pad(k1, (0, k2.shape[-1])), nn.functional.pad(k2, (k1.shape[-1], 0))], dim=2)
    d = values.shape[-1]
    empty = ~allowed.any(-1, keepdim=True)
    out = nn.functional.scaled_dot_product_attention(  # values padded too: fused kernels need one head dim
        query,
        key,
        nn.functional.pad(values, (0, query.shape[-1] - d)),
        attn_mask=allowed | empty,
        dropout_p=dropout,
        scale=scaling,
    )
    return out[..., :d].masked_fill(empty, 0.0)


@dataclass
class _Layers:
    """What `install_attention` asks of a plugin, one `SelfExtendAttention` per selected layer."""

    params: SelfExtendParams
    inv_freq: dict[int, torch.Tensor]

    def layer_attention(
        self, layer_idx: int, attn_module: nn.Module, adapter: Adapter, *, native_fn: Any, native_impl: str
    ) -> SelfExtendAttention:
        p = self.params
        return SelfExtendAttention(
            native_fn,
            native_impl,
            self.inv_freq[layer_idx],
            group=p.group,
            window=p.window,
            query_chunk=p.query_chunk,
        )


class SelfExtendRope(RopePlugin):
    """SelfExtend: far keys at grouped positions, near keys exact, no training (Jin et al. 2024).

    Keys within `window` positions keep their exact relative position; farther ones are seen at
    floor(p / group) (the query at floor(p / group) + window - floor(window / group)), so a model trained
    on L tokens reads about (L - window) * group + window, which becomes max_position_embeddings. The
    rope parameters are left as they are (transformers has no such type): the remap runs inside
    attention, through lcplug's attention dispatcher on this instance only, so a saved checkpoint needs
    `lcplug.from_pretrained` to get it back. It owns each layer's attention, so it cannot be combined
    with an attention plugin, and it needs a rope whose frequencies do not change with the length
    (not 'dynamic' or 'longrope').
    """

    name = "selfextend"
    Params = SelfExtendParams

    def check_compatible(self, plugins: dict[str, Plugin]) -> None:
        other = plugins.get("attention")
        if other is not None:
            raise ConflictError(
                f"{self.qualname()} runs its own attention on every layer it extends (exact keys near, grouped "
                f"keys far), so it cannot be combined with {other.qualname()}; use one of them"
            )

    def check(self, model: nn.Module, adapter: Adapter) -> None:
        super().check(model, adapter)
        config = base_config(model, adapter)
        require_fixed_frequencies(config, self.qualname())
        if self.params.window >= config.max_position_embeddings:
            raise ParamError(
                f"{self.qualname()}: window={self.params.window} must be below the model's "
                f"max_position_embeddings={config.max_position_embeddings}"
            )
        for idx in adapter.attention_modules(model):
            layer_inv_freq(model, adapter, idx)

    def rope_parameters(self, base: dict[str, Any], config: Any) -> dict[str, Any]:
        return dict(base)

    def max_position_embeddings(self, base_max: int) -> int:
        return (base_max - self.params.window) * self.params.group + self.params.window

    def install(self, ctx: Any) -> None:
        install_rope(self, ctx)
        inv_freq = {idx: layer_inv_freq(ctx.model, ctx.adapter, idx) for idx in ctx.layers}
        install_attention(_Layers(self.params, inv_freq), ctx)


@hookimpl
def lcplug_register(register):
    register(SelfExtendRope)
