"""`hysparse`: full layers choose key blocks for the sparse layers after them, which read the full layer's KV."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from lcplug.attention import SUBMODULE, NativeAttention, PatternAttention, SlidingWindowPattern
from lcplug.attention.crosslayer import OracleAttention, ReaderAttention, SharedKV
from lcplug.attention.executors import EXECUTORS
from lcplug.errors import ConflictError, UnsupportedModelError
from lcplug.hookspecs import hookimpl
from lcplug.params import Params, param
from lcplug.patching import PatchContext, patch_state
from lcplug.plugin import Adapter, AttentionPlugin, Plugin
from lcplug.plugins.attention.dsa import attention_shape


@dataclass(frozen=True)
class HySparseParams(Params):
    period: int = param(
        4,
        "layers per group: one full layer, then period - 1 sparse layers reading its KV",
        check=lambda v: v >= 2,
        valid="an integer >= 2 (one full layer and at least one sparse layer per group)",
    )
    topk: int = param(
        16,
        "key blocks of the full layer each query of a sparse layer reads, its own block included",
        check=lambda v: v >= 1,
        valid="an integer >= 1",
    )
    block_size: int = param(
        64,
        "positions per key block (the unit the full layer chooses)",
        check=lambda v: v >= 1 and not v & (v - 1),
        valid="a power of two, e.g. 64 or 128",
    )
    window: int = param(
        128, "own keys each sparse-layer query sees, itself included", check=lambda v: v >= 1, valid="an integer >= 1"
    )
    sinks: int = param(
        4, "leading own keys each sparse-layer query also sees", check=lambda v: v >= 0, valid="an integer >= 0"
    )
    gate_init: float = param(
        0.0,
        "initial weight of the shared branch (per KV head); 0: patching alone is sliding-window attention on "
        "the sparse layers",
        check=lambda v: 0.0 <= v <= 1.0,
        valid="a number from 0 to 1",
    )
    executor: Literal[EXECUTORS] = param("auto", "which executor runs the sparse layers; auto picks per device")


class HySparse(AttentionPlugin):
    """HySparse (arXiv:2602.03560) as a retrofit: full layers act as oracles for the sparse layers after them.

    The selected layers form groups of `period`: the first of each group keeps the model's own attention
    (bit for bit) and chooses, per query, the `topk` key blocks holding most of its attention mass; the
    other layers of the group mix two branches with a per-KV-head gate: their queries over the *full
    layer's* K/V on those blocks (cross-layer KV sharing) and their own K/V over a sliding `window` plus
    `sinks`. A cache keeps the full layer's K/V once and only the window for each sparse layer (the `device`,
    `host` and `disk` KV tiers drop the rest; a plain DynamicCache keeps everything), so KV memory falls to
    about 1/period of dense at long lengths (`kv_bytes_per_token`).

    Gates start at `gate_init` (0: exactly sliding-window attention on the sparse layers, since a retrofitted
    layer's queries were never trained against another layer's keys and values); a `train: gates` stage
    calibrates them, and `lora`/`all` stages teach the sparse layers to read the shared KV. Not combinable
    with context parallelism; models whose layers differ in type (Gemma's sliding/full mix) are refused.
    """

    name = "hysparse"
    Params = HySparseParams

    def __init__(self, params: HySparseParams | None = None):
        super().__init__(params)
        self._roles: dict[int, int] = {}  # selected layer -> its group's full layer
        self._shared: dict[int, SharedKV] = {}  # full layer -> its group's hand-off

    def check_compatible(self, plugins: dict[str, Plugin]) -> None:
        cp = plugins.get("cp")
        if cp is not None:
            raise ConflictError(
                f"{self.qualname()} hands each full layer's K/V to the layers after it within one process, so it "
                f"cannot run under {cp.qualname()}; drop one of them"
            )

    def check(self, model: nn.Module, adapter: Adapter) -> None:
        types = getattr(adapter.text_config(model), "layer_types", None)
        if types and len(set(types)) > 1:
            raise UnsupportedModelError(
                f"{self.qualname()}: {type(model).__name__} mixes layer types ({', '.join(sorted(set(types)))}); "
                "sparse layers read their full layer's keys, so every layer must see the same keys"
            )
        for module in adapter.attention_modules(model).values():
            attention_shape(module, adapter)

    def install(self, ctx: PatchContext) -> None:
        groups = [ctx.layers[i : i + self.params.period] for i in range(0, len(ctx.layers), self.params.period)]
        self._roles = {idx: group[0] for group in groups for idx in group}
        self._shared = {group[0]: SharedKV(len(group) - 1) for group in groups}
        super().install(ctx)

    def layer_attention(
        self, layer_idx: int, attn_module: nn.Module, adapter: Adapter, *, native_fn: Any, native_impl: str
    ) -> NativeAttention | OracleAttention | ReaderAttention:
        p = self.params
        full = self._roles[layer_idx]
        shared = self._shared[full]
        if layer_idx == full:
            if not shared.readers:  # a trailing group of one: nothing to choose for
                return NativeAttention(native_fn, native_impl)
            return OracleAttention(native_fn, native_impl, shared, topk=p.topk, block_size=p.block_size)
        heads, kv_heads, _ = attention_shape(attn_module, adapter)
        window = PatternAttention(
            native_fn,
            native_impl,
            SlidingWindowPattern(p.window, p.sinks, p.block_size),
            num_heads=heads,
            executor=p.executor,
        )
        gate = torch.full((kv_heads,), float(p.gate_init))
        return ReaderAttention(native_fn, native_impl, shared, window, gate, layer_idx=layer_idx, executor=p.executor)

    def manifest_state(self) -> dict[str, Any]:
        groups: dict[str, list[int]] = {}
        for idx, full in sorted(self._roles.items()):
            if idx != full:
                groups.setdefault(str(full), []).append(idx)
        return {"groups": groups}

    def trainable_groups(self, model: nn.Module) -> dict[str, list[nn.Parameter]]:
        """`gates`: the per-KV-head gates alone (calibration, the model frozen); `shared`: the gates plus the
        sparse layers' query and output projections (`q_proj`, `o_proj` where the family names them so),
        the weights that meet the full layer's keys and values, to teach the sparse layers to read them."""
        readers = reader_modules(model)
        gates = [layer.gate for layer in readers.values()]
        projections = [
            p
            for module in readers
            for name in ("q_proj", "o_proj")
            if isinstance(getattr(module, name, None), nn.Linear)
            for p in getattr(module, name).parameters()
        ]
        return {"gates": gates, "shared": gates + projections}


def reader_modules(model: nn.Module) -> dict[nn.Module, ReaderAttention]:
    """The attention modules of a model patched with `hysparse` whose layer is sparse, with that layer, in
    layer order."""
    state = patch_state(model)
    if state is None:
        raise UnsupportedModelError(f"{type(model).__name__} is not patched by lcplug")
    modules = state.adapter.attention_modules(model)
    found = {modules[i]: modules[i]._modules.get(SUBMODULE) for i in sorted(modules)}
    return {module: layer for module, layer in found.items() if isinstance(layer, ReaderAttention)}


def kv_bytes_per_token(model: nn.Module, length: int, dtype: torch.dtype = torch.bfloat16) -> tuple[float, float]:
    """(hysparse, dense) bytes per token a cache must keep at `length` tokens, summed over attention layers.

    Dense: 2 * Hkv * D per layer. HySparse: the same for full (and unpatched) layers, whose K/V the sparse
    layers share; min(length, window + sinks) tokens per sparse layer. Token-exact; a block cache keeps
    whole blocks (the window rounded up to blocks, plus the open tail), a little more.
    """
    state = patch_state(model)
    if state is None:
        raise UnsupportedModelError(f"{type(model).__name__} is not patched by lcplug")
    size = torch.empty((), dtype=dtype).element_size()
    sparse, dense = 0.0, 0.0
    for module in state.adapter.attention_modules(model).values():
        _, kv_heads, head_dim = attention_shape(module, state.adapter)
        per_token = 2 * kv_heads * head_dim * size
        layer = module._modules.get(SUBMODULE)
        if isinstance(layer, ReaderAttention):
            pattern = layer.window.pattern
            sparse += per_token * min(length, pattern.window + pattern.sinks) / length
        else:
            sparse += per_token
        dense += per_token
    return sparse, dense


@hookimpl
def lcplug_register(register):
    register(HySparse)
