"""Gated attention: a learned (or fixed) mix of the model's own attention and a sparse pattern.

Retrofits such as LoZA (one gate per layer) and DuoAttention (one gate per KV head) first learn, with
the model frozen, how much each layer or head needs full attention, then turn the gates into a
sparse/full assignment. Both need the same mechanism: run the model's own attention and a
`PatternAttention` on the same query/key/value, and mix the two (B, Lq, H, D) outputs with a gate
clamped to [0, 1]. The gate is an ordinary parameter of the `lcplug_attention` submodule, so it trains,
saves and reloads with the model; a fixed gate (an exact per-head split) is a buffer instead.

The helpers below find the gates of a patched model and re-patch it with a finalised attention spec
while keeping the rest of its manifest, the step both retrofits end with.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn

from ..errors import UnsupportedModelError
from .dispatch import SUBMODULE
from .layer import LayerAttention

if TYPE_CHECKING:
    from ..plugin import AttentionPlugin

P = TypeVar("P", bound="AttentionPlugin")


class GatedAttention(LayerAttention):
    """output = gate * full + (1 - gate) * sparse, with `full` the model's own attention.

    `sparse` is the other branch, a `PatternAttention` (so every executor serves it), held as a
    submodule so its own parameters (sink logits) train and save too.

    `gate` has shape (1,) (one per layer) or (Hkv,) (one per KV head, shared by that head's query
    heads, the grouping transformers' `repeat_kv` uses). It is clamped to [0, 1] in the forward, so an
    optimiser may push it past the ends without the mix leaving the convex hull. With `trainable=False`
    the gate is a buffer: a fixed split that saves with the model but never trains; when it is all ones
    or all zeros, the branch no head needs is never run (decided once, at construction, without a
    device sync per call).
    """

    def __init__(
        self,
        native_fn: Callable[..., Any],
        native_impl: str,
        sparse: LayerAttention,
        gate: torch.Tensor,
        *,
        trainable: bool = True,
    ):
        super().__init__(native_fn, native_impl)
        if gate.dim() != 1 or gate.numel() < 1:
            raise ValueError(f"gate must have shape (1,) or (num_kv_heads,), got {tuple(gate.shape)}")
        self.sparse = sparse
        gate = gate.detach().clone().float()
        self.only: str | None = None  # the one branch a fixed gate of all ones or all zeros needs
        if trainable:
            self.gate = nn.Parameter(gate)
        else:
            self.register_buffer("gate", gate)
            clamped = gate.clamp(0.0, 1.0)
            self.only = "full" if bool((clamped == 1).all()) else "sparse" if bool((clamped == 0).all()) else None

    @property
    def trainable(self) -> bool:
        return isinstance(self.gate, nn.Parameter)

    def forward(self, module: nn.Module, query, key, value, mask, **kwargs: Any):
        return self.mix(
            lambda: self.run_native(module, query, key, value, mask, **kwargs)[0],
            lambda: self.sparse(module, query, key, value, mask, **kwargs)[0],
            query.shape[1],
            key.shape[1],
        ), None

    def mix(
        self, full: Callable[[], torch.Tensor], sparse: Callable[[], torch.Tensor], heads: int, kv_heads: int
    ) -> torch.Tensor:
        """gate * full() + (1 - gate) * sparse() over (B, Lq, H, D) outputs, running only the branches the gate
        needs (context parallelism passes its own branch runners)."""
        size = self.gate.numel()
        if size not in (1, kv_heads):
            raise RuntimeError(f"gate of size {size} does not fit {kv_heads} KV heads")
        if self.only == "full":
            return full()
        if self.only == "sparse":
            return sparse()
        return convex_mix(self.gate, full(), sparse())

    def extra_repr(self) -> str:
        kind = "trainable" if self.trainable else "fixed"
        return f"{kind} gate of size {self.gate.numel()}, native={self.native_impl}"


def convex_mix(gate: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """gate * first + (1 - gate) * second over (B, Lq, H, D) outputs, `gate` clamped to [0, 1].

    `gate` has one entry (the whole layer) or one per KV head, shared by that head's query heads (the
    grouping transformers' `repeat_kv` uses). Clamping keeps the mix convex however far an optimiser pushes
    the gate, and still passes gradients at the ends, so a gate that starts at 0 or 1 can move.
    """
    gate = gate.clamp(0.0, 1.0).repeat_interleave(first.shape[2] // gate.numel())
    gate = gate.to(first.dtype).view(1, 1, -1, 1)
    return gate * first + (1 - gate) * second


def attention_plugin(model: nn.Module, plugin_cls: type[P], mode: str | None = None) -> P:
    """The attention plugin `model` is patched with, which must be a `plugin_cls` running in `mode` if one is
    given (else a clear error)."""
    from ..patching import patch_state

    state = patch_state(model)
    plugin = None if state is None else state.plugins.get("attention")
    if not isinstance(plugin, plugin_cls):
        if state is None:
            found = "is not patched by lcplug"
        elif plugin is None:
            found = "has no attention plugin"
        else:
            found = f"runs attention plugin {plugin.name!r}"
        raise UnsupportedModelError(
            f"expected a model patched with attention plugin {plugin_cls.name!r}; this model {found}"
        )
    if mode is not None and plugin.params.mode != mode:
        raise UnsupportedModelError(
            f"model runs {plugin.name} in mode {plugin.params.mode!r}; this needs mode {mode!r}"
        )
    return plugin


def is_layer_key(key: Any) -> bool:
    """Whether `key` names a layer in a per-layer mapping of gate results.

    Such mappings live in the manifest, whose JSON keys are strings ("3"); ints are accepted from
    Python callers.
    """
    if isinstance(key, bool):
        return False
    return (isinstance(key, int) and key >= 0) or (isinstance(key, str) and key.isdigit())


def gated_layers(model: nn.Module) -> dict[int, GatedAttention]:
    """The `GatedAttention` modules of a patched model, by layer index."""
    from ..patching import patch_state

    state = patch_state(model)
    if state is None:
        raise UnsupportedModelError(f"{type(model).__name__} is not patched by lcplug")
    out = {}
    for idx, module in sorted(state.adapter.attention_modules(model).items()):
        layer = module._modules.get(SUBMODULE)
        if isinstance(layer, GatedAttention):
            out[idx] = layer
    return out


def trainable_gates(model: nn.Module, *, freeze_rest: bool = False) -> list[nn.Parameter]:
    """The trainable gates of a patched model, in layer order.

    With `freeze_rest`, every other parameter of the model stops requiring gradients, as gate
    calibration wants (the model frozen, only the gates learn).
    """
    gates = [layer.gate for layer in gated_layers(model).values() if layer.trainable]
    if freeze_rest:
        keep = {id(g) for g in gates}
        for p in model.parameters():
            p.requires_grad_(id(p) in keep)
    return gates


def repatch_attention(model: nn.Module, plugin: Any, **overrides: Any) -> dict[str, Any]:
    """Re-patch `model` with `plugin`'s params changed by `overrides`, keeping every other kind and the
    layer selection.

    Returns the whole new spec. The old patch is undone first (its gates disappear with it), so read
    whatever the new spec needs from the model before calling this.
    """
    attention = {"name": plugin.name, **plugin.params.to_dict(), **overrides}
    from ..patching import patch, patch_state

    state = patch_state(model)
    if state is None:
        raise UnsupportedModelError(f"{type(model).__name__} is not patched by lcplug")
    spec = {kind: value for kind, value in state.manifest["spec"].items() if kind != "attention"}
    spec["attention"] = attention
    patch(model, spec)
    return spec
