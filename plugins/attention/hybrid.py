"""`hybrid`: a layer schedule mixing a sparse attention variant with the model's own full attention."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from lcplug.attention import LayerAttention, NativeAttention
from lcplug.errors import ConflictError
from lcplug.hookspecs import hookimpl
from lcplug.layers import select_layers
from lcplug.params import Params, param
from lcplug.plugin import Adapter, AttentionPlugin
from lcplug.spec import parse_plugin_spec


@dataclass(frozen=True)
class HybridParams(Params):
    sparse: str | dict = param(
        "sliding-window", "the sparse variant, as a spec: a name or a mapping {'name': ..., <params>}"
    )
    ratio: str = param(
        "5:1",
        "sparse:full layers per group, e.g. '5:1' (MiMo-V2: five SWA layers, then one global); ignored when "
        "full_layers is given",
    )
    full_layers: list[int] | None = param(None, "explicit layers that stay full (overrides ratio)")


class HybridAttention(AttentionPlugin):
    """Interleave a sparse variant with full-attention layers by ratio or explicit layer list.

    `hybrid:ratio=5:1` keeps every sixth layer on the model's own attention and runs `sparse` on the
    others (MiMo-V2-Flash's 5:1 SWA:global schedule with its window of 128 is
    `{"name": "hybrid", "sparse": {"name": "sliding-window", "window": 128}, "ratio": "5:1"}`).
    Any installed attention plugin can be the sparse part; the spec's `layers` narrows where it may go.
    """

    name = "hybrid"
    Params = HybridParams

    def __init__(self, params=None):
        super().__init__(params)
        from lcplug.registry import get_registry

        inner = parse_plugin_spec("attention", self.params.sparse)
        if inner.name in ("hybrid", "full"):
            raise ConflictError(f"{self.qualname()}: sparse={inner.name!r} is not a sparse variant")
        self.inner = get_registry().get("attention", inner.name).build(inner.params)
        if self.params.full_layers is None:
            select_layers(self.params.ratio, 1)  # validates the ratio's form early

    def full_layer_set(self, num_layers: int) -> set[int]:
        if self.params.full_layers is not None:
            return set(select_layers(self.params.full_layers, num_layers))
        return set(range(num_layers)) - set(select_layers(self.params.ratio, num_layers))

    def check(self, model: Any, adapter: Adapter) -> None:
        num_layers = len(adapter.attention_modules(model))
        self.full_layer_set(num_layers)  # a bad ratio or layer list raises SpecError naming it
        self.inner.check(model, adapter)
        self._num_layers = num_layers

    def layer_attention(
        self, layer_idx: int, attn_module: nn.Module, adapter: Adapter, *, native_fn: Any, native_impl: str
    ) -> LayerAttention:
        if layer_idx in self.full_layer_set(self._num_layers):
            return NativeAttention(native_fn, native_impl)
        return self.inner.layer_attention(layer_idx, attn_module, adapter, native_fn=native_fn, native_impl=native_impl)

    def manifest_state(self) -> dict[str, Any]:
        return {"full_layers": sorted(self.full_layer_set(self._num_layers))}

    # training: the sparse layers are the inner variant's, so are their parameter groups and losses
    def trainable_groups(self, model: nn.Module) -> dict[str, list[nn.Parameter]]:
        return self.inner.trainable_groups(model)

    def aux_losses(self) -> dict[str, Any]:
        return self.inner.aux_losses()

    def prepare_training(self, model: nn.Module, losses: set[str]) -> None:
        self.inner.prepare_training(model, losses)


@hookimpl
def lcplug_register(register):
    register(HybridAttention)
