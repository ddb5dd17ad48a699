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


class Pattern:
    """Base pattern: every key allowed (the model's own mask still applies)."""

    block_size: int = 64

    def allows(self, q_pos: torch.Tensor, kv_pos: torch.Tensor) -> torch.Tensor:
        return torch.ones(torch.broadcast_shapes(q_pos.shape, kv_pos.shape), dtype=torch.bool, device=q_pos.device)

    def describe(self) -> str:
        return "full"


class SlidingWindowPattern(Pattern):
    """Each query sees the last `window` positions (itself included) plus the first `sinks` positions."""

    def __init__(self, window: int, sinks: int = 0, block_size: int = 64):
        self.window, self.sinks, self.block_size = window, sinks, block_size

    def allows(self, q_pos: torch.Tensor, kv_pos: torch.Tensor) -> torch.Tensor:
        return ((q_pos - kv_pos) < self.window) | (kv_pos < self.sinks)

    def describe(self) -> str:
        return f"sliding window {self.window} + {self.sinks} sinks"
