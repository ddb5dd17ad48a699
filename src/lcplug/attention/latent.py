"""Latent K/V: one attention layer's keys and values factored through a shared low-rank latent (MLA).

A retrofit of multi-head latent attention onto a GQA/MHA checkpoint, in the MHA2MLA manner (partial RoPE,
then a joint SVD of keys and values):

- Per KV head, `rope_dims` of the key's rotary dims stay positional. Which ones: the rotary frequency pairs
  (dim i with i + rotary_dim/2, the rotate-half layout) whose query and key weight rows have the largest
  norm product, a data-free stand-in for MHA2MLA's 2-norm criterion. Those dims are projected straight from
  the hidden states (`rope_key`, MLA's decoupled key) and rotated as before.
- Every other key dim loses its rotation ("nope") and, with the values, goes through the latent:
  c = W_down x (rank r), [k_nope; v] = W_up c + b. W_down and W_up are the balanced truncated SVD of the
  stacked rows [W_k_nope; W_v] (sqrt of the singular values on each side, so the heal stage sees factors
  of equal scale), the best rank-r approximation (Eckart-Young).
- Queries keep their projection; each head's dims are permuted to [rope dims, nope dims] so q.k is the
  same sum with the nope dims unrotated.

With every rotary dim kept (`rope_dims` = rotary_dim) and full rank the layer computes exactly what the
model did; below that, dropping rotation from some dims and truncating approximate it, and a training stage
(`train: latent`) heals the conversion. A cache stores, per token, the rotated rope key (Hkv x rope_dims)
in its key slot and the latent (1 x r) in its value slot; `expand` up-projects them in the attention call.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UnsupportedModelError
from .compact import LayerAccess
from .layer import LayerAttention


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The rotate-half RoPE layout transformers' llama-style families use: (x1, x2) -> (-x2, x1)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def select_rope_dims(q_weight: torch.Tensor, k_weight: torch.Tensor, *, head_dim: int, rotary_dim: int, keep: int):
    """(Hkv, head_dim) long: per KV head, its dims reordered as [kept rope dims, every other dim].

    The `keep` // 2 frequency pairs kept are those with the largest ||W_q pair|| * ||W_k pair|| (query norms
    summed over the heads sharing the KV head); kept dims are ordered [pair lows..., pair highs...] so
    `rotate_half` on them pairs the same dims the model's rotation does.
    """
    kv_heads = k_weight.shape[0] // head_dim
    half = rotary_dim // 2
    if k_weight.is_meta:  # a shapes-only rehearsal (lcplug plan, a run's pre-flight): any valid split will do
        score = torch.zeros(kv_heads, half, device="cpu")  # even under a torch.device('meta') context
    else:
        k_pairs = k_weight.float().view(kv_heads, head_dim, -1).pow(2).sum(-1)
        q_pairs = q_weight.float().view(kv_heads, -1, head_dim, q_weight.shape[-1]).pow(2).sum((1, 3))
        score = (
            (k_pairs[:, :half] + k_pairs[:, half:rotary_dim]) * (q_pairs[:, :half] + q_pairs[:, half:rotary_dim])
        ).sqrt()
    freqs = score.topk(keep // 2, dim=-1).indices.sort(dim=-1).values
    kept = torch.cat((freqs, freqs + half), dim=-1)
    others = torch.ones(kv_heads, head_dim, dtype=torch.bool, device=kept.device).scatter(1, kept, False)
    rest = torch.arange(head_dim, device=kept.device).expand(kv_heads, -1)[others].view(kv_heads, -1)
    return torch.cat((kept, rest), dim=-1)


def svd_factors(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Balanced rank-`rank` factors (down (r, in), up (out, r)) of `matrix` (out, in), computed in float64,
    and the relative Frobenius error of up @ down (NaN for a shapes-only meta matrix)."""
    if matrix.is_meta:
        out, inp = matrix.shape
        return matrix.new_empty(rank, inp), matrix.new_empty(out, rank), float("nan")
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    root = s[:rank].sqrt()
    down, up = root[:, None] * vh[:rank], u[:, :rank] * root
    error = float(s[rank:].norm() / s.norm()) if s.norm() > 0 else 0.0
    return down, up, error


class LatentKV(nn.Module):
    """One layer's latent K/V factorisation: `compress` at the projections, `expand` in the attention call."""

    def __init__(
        self,
        q_proj: nn.Linear,
        k_proj: nn.Linear,
        v_proj: nn.Linear,
        *,
        head_dim: int,
        rotary_dim: int,
        rank: int,
        rope_dims: int,
    ):
        super().__init__()
        kv_heads = k_proj.out_features // head_dim
        self.head_dim, self.kv_heads, self.rank, self.rope_dims = head_dim, kv_heads, rank, rope_dims
        order = select_rope_dims(q_proj.weight, k_proj.weight, head_dim=head_dim, rotary_dim=rotary_dim, keep=rope_dims)
        self.register_buffer("order", order)  # (Hkv, D), saved with the weights: a reload uses the same split
        rows = order + head_dim * torch.arange(kv_heads, device=order.device)[:, None]
        rope_rows, nope_rows = rows[:, :rope_dims].flatten(), rows[:, rope_dims:].flatten()
        k_weight, dtype = k_proj.weight.detach(), k_proj.weight.dtype
        down, up, self.init_error = svd_factors(torch.cat((k_weight[nope_rows], v_proj.weight.detach())), rank)
        self.rope_key = _linear(k_weight[rope_rows], _rows(k_proj.bias, rope_rows), dtype)
        self.down = _linear(down, None, dtype)
        up_bias = None
        if k_proj.bias is not None or v_proj.bias is not None:
            k_bias = _rows(k_proj.bias, nope_rows)
            up_bias = torch.cat(
                (_or_zeros(k_bias, len(nope_rows), up), _or_zeros(v_proj.bias, v_proj.out_features, up))
            )
        self.up = _linear(up, up_bias, dtype)

    def kv_elements_per_token(self) -> int:
        """Numbers cached per token: the latent plus the rope keys (dense K/V caches 2 * Hkv * head_dim)."""
        return self.rank + self.kv_heads * self.rope_dims

    def queries(self, query: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Unrotated queries (B, H, L, D) -> each head's dims as [rope dims (rotated), nope dims]."""
        heads = query.shape[1]
        order = self.order.repeat_interleave(heads // self.kv_heads, dim=0)  # (H, D)
        query = query.gather(-1, order[None, :, None, :].expand_as(query))
        rope = self._rotate(query[..., : self.rope_dims], cos, sin, order)
        return torch.cat((rope, query[..., self.rope_dims :]), dim=-1)

    def compress(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states (B, L, hidden) -> what a cache keeps: rotated rope keys (B, Hkv, L, rope_dims) and
        the latent (B, 1, L, rank)."""
        batch, length = hidden.shape[:2]
        rope = self.rope_key(hidden).view(batch, length, self.kv_heads, self.rope_dims).transpose(1, 2)
        return self._rotate(rope, cos, sin, self.order), self.down(hidden)[:, None]

    def expand(self, rope_key: torch.Tensor, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached rope keys and latent -> keys (B, Hkv, L, D) in `queries`' dim order and values (B, Hkv, L, D)."""
        batch, _, length, _ = latent.shape
        up = self.up(latent[:, 0])  # (B, L, Hkv * nope + Hkv * D): every head's nope key dims, then the values
        nope = self.kv_heads * (self.head_dim - self.rope_dims)
        key = up[..., :nope].reshape(batch, length, self.kv_heads, -1).transpose(1, 2)
        value = up[..., nope:].reshape(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
        return torch.cat((rope_key, key), dim=-1), value

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """RoPE on x (B, heads, L, rope_dims) at each head's kept dims; cos/sin are the model's (B, L, rotary_dim)."""
        idx = order[:, : self.rope_dims]  # (heads, rope_dims)
        cos, sin = cos[..., idx].transpose(1, 2), sin[..., idx].transpose(1, 2)  # (B, heads, L, rope_dims)
        return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, rope_dims={self.rope_dims}, kv_heads={self.kv_heads}, head_dim={self.head_dim}"


class LatentAttention(LayerAttention):
    """The attention of a latent layer: its `LatentKV` plus the variant (`inner`) that attends over the
    up-projected keys and values. The layer's own forward (see `lcplug.adapters.latent`) calls `latent`
    around the cache; the dispatcher then lands here, and `inner` runs the pattern on an executor."""

    def __init__(self, inner: LayerAttention, latent: LatentKV):
        super().__init__(inner.native_fn, inner.native_impl)
        self.inner, self.latent = inner, latent

    def forward(self, module: nn.Module, query, key, value, mask, **kwargs):
        if "forward" not in module.__dict__:  # installed by a plugin nesting mla (hybrid), without the surgery
            raise UnsupportedModelError(
                f"layer {getattr(module, 'layer_idx', '?')} has a latent K/V module but runs its own forward: give mla "
                "as the attention plugin (or inside engram), not nested in another variant"
            )
        return self.inner(module, query, key, value, mask, **kwargs)

    def kv_access(self) -> LayerAccess:
        """Every latent, in full: compact K/V tags would not survive the up-projection."""
        return LayerAccess()


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=dtype, device=weight.device)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def _rows(bias: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor | None:
    return None if bias is None else bias.detach()[rows]


def _or_zeros(bias: torch.Tensor | None, size: int, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros(size, dtype=like.dtype, device=like.device) if bias is None else bias.detach().to(like.dtype)
