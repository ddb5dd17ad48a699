"""Attention patterns: which keys each query may see, as a function of token positions.

A pattern is policy (owned by an attention plugin); executors are mechanism. `allows(q_pos, kv_pos)`
is the token-level predicate, evaluated by broadcasting position tensors; the model's own mask
(causality, its own sliding window, padding, document separation) is always ANDed on top by the
executor, so a pattern never has to restate causality.
"""

from __future__ import annotations

import torch

from ..errors import ParamError


def check_block_size(block_size: int, owner: str) -> int:
    if block_size < 1 or block_size & (block_size - 1):
        raise ParamError(f"{owner}: block_size={block_size} must be a power of two (e.g. 64 or 128)")
    return block_size


Interval = tuple[torch.Tensor, torch.Tensor]
"""A half-open range [lo, hi) of key positions, one bound per query block (tensors of equal shape)."""


class Pattern:
    """Base pattern: every key allowed (the model's own mask still applies).

    Two views of one rule, which must agree:
    - `allows(q_pos, kv_pos[, head_group])`: the token-level predicate (broadcasting tensors);
    - `key_intervals(q_lo, q_hi)`: for query blocks whose positions span [q_lo, q_hi], position ranges
      that contain every key `allows` may accept. It may over-cover (the predicate trims), never under.
    `head_groups` > 1 makes the rule depend on the head: heads are split into that many equal groups.
    """

    block_size: int = 64
    head_groups: int = 1

    def __init__(self, block_size: int = 64):
        self.block_size = block_size

    def allows(self, q_pos: torch.Tensor, kv_pos: torch.Tensor, head_group: torch.Tensor | None = None) -> torch.Tensor:
        return torch.ones(torch.broadcast_shapes(q_pos.shape, kv_pos.shape), dtype=torch.bool, device=q_pos.device)

    def key_intervals(self, q_lo: torch.Tensor, q_hi: torch.Tensor, head_group: int = 0) -> list[Interval]:
        return [(torch.zeros_like(q_lo), q_hi + 1)]

    def key(self) -> tuple:
        """Identity for caching a layout across the layers of one forward pass."""
        return (type(self).__name__, *sorted(vars(self).items()))

    def describe(self) -> str:
        return "full"


class SlidingWindowPattern(Pattern):
    """Each query sees the last `window` positions (itself included) plus the first `sinks` positions."""

    def __init__(self, window: int, sinks: int = 0, block_size: int = 64):
        self.window, self.sinks, self.block_size = window, sinks, block_size

    def allows(self, q_pos: torch.Tensor, kv_pos: torch.Tensor, head_group: torch.Tensor | None = None) -> torch.Tensor:
        return ((q_pos - kv_pos) < self.window) | (kv_pos < self.sinks)

    def key_intervals(self, q_lo: torch.Tensor, q_hi: torch.Tensor, head_group: int = 0) -> list[Interval]:
        local = (q_lo - self.window + 1, q_hi + 1)
        if self.sinks == 0:
            return [local]
        return [(torch.zeros_like(q_lo), torch.full_like(q_lo, self.sinks)), local]

    def describe(self) -> str:
        return f"sliding window {self.window} + {self.sinks} sinks"
