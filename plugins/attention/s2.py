"""`s2`: LongLoRA shifted sparse attention (S2-Attn) for training; full attention at inference."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from lcplug.attention import Pattern, PatternAttention
from lcplug.attention.executors import EXECUTORS
from lcplug.attention.pattern import Interval
from lcplug.hookspecs import hookimpl
from lcplug.params import Params, param
from lcplug.plugin import Adapter, AttentionPlugin


class ShiftedGroupsPattern(Pattern):
    """Tokens attend within groups of `group` positions; the second half of the heads uses groups shifted
    by half a group, so information flows between neighbouring groups across layers.

    Unlike LongLoRA's reference code, the shifted groups do not wrap around the sequence end (a wrapped
    group would let the first tokens see the last ones, a future leak under a causal mask).
    """

    head_groups = 2

    def __init__(self, group: int, block_size: int):
        self.group, self.block_size = group, block_size

    def _group_id(self, pos: torch.Tensor, shifted: torch.Tensor | int) -> torch.Tensor:
        return torch.div(pos + shifted * (self.group // 2), self.group, rounding_mode="floor")

    def allows(self, q_pos: torch.Tensor, kv_pos: torch.Tensor, head_group: torch.Tensor | None = None) -> torch.Tensor:
        shifted = 0 if head_group is None else head_group
        return self._group_id(q_pos, shifted) == self._group_id(kv_pos, shifted)

    def key_intervals(self, q_lo: torch.Tensor, q_hi: torch.Tensor, head_group: int = 0) -> list[Interval]:
        shift = head_group * (self.group // 2)
        start = self._group_id(q_lo, head_group) * self.group - shift
        return [(start.clamp(min=0), q_hi + 1)]

    def describe(self) -> str:
        return f"shifted groups of {self.group}"


class S2Layer(PatternAttention):
    """Shifted-group attention while the model trains; the model's own full attention in eval mode.

    `pattern` is the pattern of the current mode (all keys in eval mode), so tools that read a layer's
    pattern (the conformance kit, KV tiers, CP) see what the layer computes now.
    """

    @property
    def pattern(self) -> Pattern:
        return self._shifted if self.training else Pattern()

    @pattern.setter
    def pattern(self, value: Pattern) -> None:
        self._shifted = value

    def forward(self, module: nn.Module, query, key, value, mask, **kwargs: Any):
        if not self.training:
            return self.run_native(module, query, key, value, mask, **kwargs)
        return super().forward(module, query, key, value, mask, **kwargs)


@dataclass(frozen=True)
class S2Params(Params):
    group: int = param(
        2048,
        "group size in tokens (LongLoRA: a quarter of the training length)",
        check=lambda v: v >= 2 and v % 2 == 0,
        valid="an even integer >= 2",
    )
    block_size: int = param(
        64, "block size of the block-sparse pattern", check=lambda v: v >= 1 and not v & (v - 1), valid="a power of two"
    )
    executor: Literal[EXECUTORS] = param("auto", "which executor runs the pattern; auto picks per device")


class S2Attention(AttentionPlugin):
    """LongLoRA S2-Attn: train long contexts with attention inside token groups, half the heads shifted.

    Training cost grows linearly with length (each token sees at most one group); at inference the model
    uses its own full attention, so a model fine-tuned with `s2` serves as a plain dense model. Pair it
    with LoRA on the attention projections plus trainable embeddings and norms (LongLoRA's recipe).
    """

    name = "s2"
    Params = S2Params

    def check(self, model: Any, adapter: Adapter) -> None:
        heads = {adapter.num_heads(m) for m in adapter.attention_modules(model).values()}
        odd = [h for h in heads if h % 2]
        if odd:
            from lcplug.errors import UnsupportedModelError

            raise UnsupportedModelError(f"{self.qualname()}: needs an even number of heads to shift half, got {odd[0]}")

    def layer_attention(
        self, layer_idx: int, attn_module: nn.Module, adapter: Adapter, *, native_fn: Any, native_impl: str
    ) -> S2Layer:
        p = self.params
        pattern = ShiftedGroupsPattern(p.group, p.block_size)
        return S2Layer(native_fn, native_impl, pattern, num_heads=adapter.num_heads(attn_module), executor=p.executor)


@hookimpl
def lcplug_register(register):
    register(S2Attention)
