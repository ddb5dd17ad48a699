"""`sliding-window`: local attention over the last `window` tokens plus `sinks` attention-sink tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from lcplug.attention import PatternAttention, SlidingWindowPattern, check_block_size
from lcplug.attention.executors import EXECUTORS
from lcplug.hookspecs import hookimpl
from lcplug.params import Params, param
from lcplug.plugin import Adapter, AttentionPlugin


@dataclass(frozen=True)
class SlidingWindowParams(Params):
    window: int = param(1024, "keys each query sees, itself included", check=lambda v: v >= 1, valid="an integer >= 1")
    sinks: int = param(
        4, "leading tokens every query also sees (StreamingLLM)", check=lambda v: v >= 0, valid="an integer >= 0"
    )
    learnable_sink: bool = param(False, "add a trainable per-head sink logit (extra softmax mass on no value)")
    sink_init: float = param(
        -20.0,
        "initial sink logit; -20 puts its mass below fp32 resolution, so patching "
        "alone changes nothing measurable while Adam can still move it",
    )
    block_size: int = param(
        64,
        "block size of the block-sparse pattern",
        check=lambda v: v >= 1 and not v & (v - 1),
        valid="a power of two, e.g. 64 or 128",
    )
    executor: Literal[EXECUTORS] = param("auto", "which executor runs the pattern; auto picks per device")


class SlidingWindowAttention(AttentionPlugin):
    """Sliding-window attention with attention sinks (StreamingLLM; MiMo-V2's SWA layers).

    Each query attends to the `window` most recent positions (itself included) and to the first `sinks`
    positions of its sequence. Positions are the model's position ids, so left padding, packed documents
    and decode see the same pattern. With `learnable_sink`, a per-head sink logit adds softmax mass that
    belongs to no value (MiMo-V2, gpt-oss).
    """

    name = "sliding-window"
    Params = SlidingWindowParams

    def trainable_groups(self, model: nn.Module) -> dict[str, list[nn.Parameter]]:
        return {"sinks": sink_parameters(model)} if self.params.learnable_sink else {}

    def layer_attention(
        self, layer_idx: int, attn_module: nn.Module, adapter: Adapter, *, native_fn: Any, native_impl: str
    ) -> PatternAttention:
        p = self.params
        check_block_size(p.block_size, self.qualname())
        num_heads = adapter.num_heads(attn_module)
        return PatternAttention(
            native_fn,
            native_impl,
            SlidingWindowPattern(p.window, p.sinks, p.block_size),
            num_heads=num_heads,
            learnable_sink=p.learnable_sink,
            sink_init=p.sink_init,
            executor=p.executor,
        )


def sink_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The learnable per-head sink logits of a model patched with `sliding-window:learnable_sink=true`, by layer."""
    return [m.sink_logit for m in model.modules() if isinstance(m, PatternAttention) and m.sink_logit is not None]


@hookimpl
def lcplug_register(register):
    register(SlidingWindowAttention)
