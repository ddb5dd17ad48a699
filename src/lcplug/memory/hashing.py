"""Multi-head hashing of token n-grams into table rows (Engram's O(1) lookup).

For every n-gram order and hash head, a row index is a multiplicative-XOR hash of the last n token ids:
XOR_j ((id_{t-j} + 1) * m_j) mod size, with odd multipliers m drawn once from a seed and saved as a
buffer. Several heads per order make collisions of one head unlikely to repeat in another. Id 0 after the
shift marks "before the sequence", so the first tokens of a sequence hash their short n-grams consistently
in prefill and decode alike.
"""

from __future__ import annotations

import torch
from torch import nn


class NgramHash(nn.Module):
    """Row indices (B, L, orders * heads) into a flat table of `orders * heads * size` rows."""

    def __init__(self, orders: list[int], heads: int, size: int, seed: int):
        super().__init__()
        self.orders, self.heads, self.size = list(orders), heads, size
        generator = torch.Generator().manual_seed(seed)
        multipliers = torch.randint(1, 2**30, (len(orders), heads, max(orders)), generator=generator) * 2 + 1
        self.register_buffer("multipliers", multipliers)

    @property
    def context(self) -> int:
        """Ids a position needs before itself: max order - 1 (the decode history a cache keeps)."""
        return max(self.orders) - 1

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        """`window` (B, context + L) ids, the first `context` of them the ids before this step (-1: none) ->
        flat row indices (B, L, orders * heads)."""
        length = window.shape[1] - self.context
        shifted = window + 1
        out = []
        for o, n in enumerate(self.orders):
            code = torch.zeros(window.shape[0], length, self.heads, dtype=torch.long, device=window.device)
            for j in range(n):  # token t - j
                tokens = shifted[:, self.context - j : self.context - j + length, None]
                code = code ^ (tokens * self.multipliers[o, :, j])
            out.append(code % self.size)
        rows = torch.cat(out, dim=-1)
        return rows + self.size * torch.arange(rows.shape[-1], device=rows.device)
