"""Keep transformers' masks lazy and lossless for lcplug's attention.

lcplug registers one mask function (under the dispatcher's name) with transformers'
`AttentionMaskInterface`. Instead of materialising an N x N mask it returns a `LazyMask` holding the
exact arguments transformers passed: the model's own mask predicate (causal, its own sliding window,
packed-document separation), the 2D padding mask, and the query/key offsets. Nothing is dropped:
- a layer left on the model's own backend gets the very mask that backend would have built (`native`);
- a sparse layer evaluates the predicate only where its pattern keeps blocks (`allowed`), or densely
  for the reference executor (`dense`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask


class LazyMask:
    """The arguments of one mask-interface call, evaluated on demand."""

    def __init__(self, **kwargs: Any):
        self.kwargs = kwargs
        self.batch_size: int = kwargs["batch_size"]
        self.q_length: int = kwargs["q_length"]
        self.kv_length: int = kwargs["kv_length"]
        q_offset = kwargs.get("q_offset", 0)
        self.q_offset: int = int(q_offset) if isinstance(q_offset, torch.Tensor) else q_offset
        self.kv_offset: int = kwargs.get("kv_offset", 0)
        self.mask_function: Callable = kwargs["mask_function"]
        self.padding_mask: torch.Tensor | None = kwargs.get("attention_mask")
        self.device = kwargs.get("device", "cpu")
        self._native: dict[str, Any] = {}
        self._dense: torch.Tensor | None = None
        self.cache: dict[Any, Any] = {}  # per-call memo shared by all layers (e.g. block layouts per pattern)

    # transformers' decoder code occasionally inspects a mask's shape
    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.batch_size, 1, self.q_length, self.kv_length)

    def native(self, impl: str) -> Any:
        """The mask transformers' own `impl` backend would have received (cached per backend)."""
        if impl not in self._native:
            fn = ALL_MASK_ATTENTION_FUNCTIONS.get(impl, sdpa_mask)
            self._native[impl] = fn(**self.kwargs)
        return self._native[impl]

    def padding(self) -> torch.Tensor | None:
        """The 2D key padding mask (B, kv_offset + kv_length), True = real token, or None."""
        pad = self.padding_mask
        if pad is None:
            return None
        needed = self.kv_offset + self.kv_length
        if pad.shape[-1] < needed:
            pad = torch.nn.functional.pad(pad, (0, needed - pad.shape[-1]))
        return pad.bool()

    def dense(self) -> torch.Tensor:
        """Boolean (B, 1, Lq, Lkv) mask, True = may attend. O(N^2): the reference executor's path."""
        if self._dense is None:
            kwargs = {**self.kwargs, "allow_is_causal_skip": False, "allow_is_bidirectional_skip": False}
            kwargs.pop("dtype", None)
            mask = sdpa_mask(**kwargs)
            self._dense = mask.expand(self.batch_size, 1, self.q_length, self.kv_length)
        return self._dense

    def allowed(self, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        """Evaluate the model's predicate and padding at absolute indices (broadcast; batch on dim 0).

        `q_idx` and `kv_idx` are index tensors broadcastable to (B, 1, Lq', Lkv') in the cache's index
        space (queries start at `q_offset`, keys at `kv_offset`). transformers' built-in predicates are
        index based, so this costs only the entries asked for.
        """
        b = torch.arange(self.batch_size, device=q_idx.device).view(-1, *([1] * (q_idx.dim() - 1)))
        h = torch.zeros((), dtype=torch.long, device=q_idx.device)
        out = self.mask_function(b, h, q_idx, kv_idx)
        pad = self.padding()
        if pad is not None:
            out = out & pad[b, kv_idx]
        return out


def lazy_mask_interface(**kwargs: Any) -> LazyMask:
    """The function registered with `AttentionMaskInterface` for lcplug's dispatcher."""
    kwargs.pop("config", None)
    return LazyMask(**kwargs)


def register_mask_interface(name: str) -> None:
    AttentionMaskInterface.register(name, lazy_mask_interface)
