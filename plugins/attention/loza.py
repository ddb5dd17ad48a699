"""`loza`: LoZA streaming sparse attention (SSA) on the layers a gate calibration finds need full attention least.

Two stages, two modes of one plugin:
- `mode=calibrate`: every selected layer runs o = a * full + (1 - a) * SSA with a per-layer gate `a`
  (initialised to 1, so patching alone changes nothing). Freeze the model, train only the gates
  (`calibration_parameters(model, freeze_rest=True)`) on the LM loss, then call `finalize(model)`.
- `mode=sparse`: `sparse_layers` run SSA, the other selected layers the model's own attention. The
  calibration result (`calibration`, per-layer alphas) stays in the manifest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from lcplug.attention import NativeAttention, Pattern, PatternAttention
from lcplug.attention.executors import EXECUTORS
from lcplug.attention.gated import (
    GatedAttention,
    attention_plugin,
    gated_layers,
    is_layer_key,
    repatch_attention,
    trainable_gates,
)
from lcplug.attention.pattern import Interval
from lcplug.errors import ParamError
from lcplug.hookspecs import hookimpl
from lcplug.params import Params, param
from lcplug.patching import PatchContext
from lcplug.plugin import Adapter, AttentionPlugin


class StreamingBlocksPattern(Pattern):
    """LoZA's SSA mask: the first `sink_blocks` blocks plus the query's own block and the `local_blocks - 1`
    blocks before it, blocks counted on positions (1 sink + 7 local blocks of 128 = 1024 keys per query).

    allows(q, k) = k // block < sink_blocks  or  0 <= q // block - k // block < local_blocks.
    Causality inside the diagonal block comes from the model's own mask, ANDed by every executor.
    """

    def __init__(self, sink_blocks: int = 1, local_blocks: int = 7, block: int = 128):
        self.sink_blocks, self.local_blocks, self.block_size = sink_blocks, local_blocks, block

    def allows(self, q_pos: torch.Tensor, kv_pos: torch.Tensor, head_group: torch.Tensor | None = None) -> torch.Tensor:
        q_block, kv_block = q_pos // self.block_size, kv_pos // self.block_size
        behind = q_block - kv_block
        return (kv_block < self.sink_blocks) | ((behind >= 0) & (behind < self.local_blocks))

    def key_intervals(self, q_lo: torch.Tensor, q_hi: torch.Tensor, head_group: int = 0) -> list[Interval]:
        block = self.block_size
        local_lo = ((q_lo // block - (self.local_blocks - 1)) * block).clamp(min=0)
        local = (local_lo, (q_hi // block + 1) * block)
        if self.sink_blocks == 0:
            return [local]
        return [(torch.zeros_like(q_lo), torch.full_like(q_lo, self.sink_blocks * block)), local]

    def describe(self) -> str:
        return f"streaming blocks: {self.sink_blocks} sink + {self.local_blocks} local of {self.block_size}"


def _is_calibration(value: dict) -> bool:
    return all(is_layer_key(k) and isinstance(v, (int, float)) and not isinstance(v, bool) for k, v in value.items())


@dataclass(frozen=True)
class LozaParams(Params):
    block: int = param(
        128, "SSA block size in tokens", check=lambda v: v >= 1 and not v & (v - 1), valid="a power of two, e.g. 128"
    )
    sink_blocks: int = param(1, "leading blocks every query sees", check=lambda v: v >= 0, valid="an integer >= 0")
    local_blocks: int = param(
        7, "blocks each query sees ending at its own block", check=lambda v: v >= 1, valid="an integer >= 1"
    )
    mode: Literal["calibrate", "sparse"] = param(
        "sparse", "calibrate: learn a per-layer gate full vs SSA; sparse: SSA on `sparse_layers`"
    )
    sparse_fraction: float = param(
        0.5,
        "share of the selected layers `finalize` turns into SSA (the lowest gates)",
        check=lambda v: 0 < v <= 1,
        valid="0 < fraction <= 1",
    )
    calibration: dict[str, float] = param(
        {},
        "per-layer gates recorded by `finalize` (layer index -> alpha)",
        check=_is_calibration,
        valid="a mapping of layer index -> number",
    )
    sparse_layers: list[int] | None = param(
        None,
        "layers that run SSA in sparse mode (None: every selected layer)",
        check=lambda v: all(i >= 0 for i in v),
        valid="layer indices >= 0",
    )
    executor: Literal[EXECUTORS] = param("auto", "which executor runs the pattern; auto picks per device")

    def validate(self, owner: str | None = None) -> None:
        super().validate(owner)
        if self.mode == "calibrate" and self.sparse_layers is not None:
            raise ParamError(
                f"{owner or self._owner}: parameter 'sparse_layers' applies to mode 'sparse' only "
                "(calibrate gates every selected layer)"
            )


class LozaAttention(AttentionPlugin):
    """LoZA: streaming sparse attention (sink block + local blocks) on the layers calibration picks.

    SSA keeps `sink_blocks` leading blocks and the `local_blocks` most recent blocks (block 128: 1 + 7
    blocks, 1024 keys per query), so an SSA layer's cost and KV cache stop growing with the context.
    `calibrate` learns, per layer, alpha in o = alpha * full + (1 - alpha) * SSA with everything else
    frozen; `finalize(model)` turns the `sparse_fraction` of layers with the lowest alpha into SSA
    layers (mode `sparse`) and keeps the rest full, recording the alphas in the manifest.
    """

    name = "loza"
    Params = LozaParams

    def check(self, model: nn.Module, adapter: Adapter) -> None:
        num_layers = len(adapter.attention_modules(model))
        for name, layers in (
            ("sparse_layers", self.params.sparse_layers or []),
            ("calibration", [int(k) for k in self.params.calibration]),
        ):
            outside = [i for i in layers if i >= num_layers]
            if outside:
                raise ParamError(
                    f"{self.qualname()}: parameter {name!r} names layer {outside[0]}, out of range for a model "
                    f"with {num_layers} layers"
                )

    def install(self, ctx: PatchContext) -> None:
        sparse = self.params.sparse_layers
        if sparse is not None:
            outside = sorted(set(sparse) - set(ctx.layers))
            if outside:
                raise ParamError(
                    f"{self.qualname()}: parameter 'sparse_layers' names layer {outside[0]}, which the layer "
                    f"selection {ctx.layers} leaves out"
                )
        super().install(ctx)

    def trainable_groups(self, model: nn.Module) -> dict[str, list[nn.Parameter]]:
        return {"gates": calibration_parameters(model)} if self.params.mode == "calibrate" else {}

    def finalize(self, model: nn.Module) -> dict[str, Any] | None:
        return finalize(model) if self.params.mode == "calibrate" else None

    def layer_attention(
        self, layer_idx: int, attn_module: nn.Module, adapter: Adapter, *, native_fn: Any, native_impl: str
    ) -> GatedAttention | PatternAttention | NativeAttention:
        p = self.params
        if p.mode == "sparse" and p.sparse_layers is not None and layer_idx not in p.sparse_layers:
            return NativeAttention(native_fn, native_impl)
        ssa = PatternAttention(
            native_fn,
            native_impl,
            StreamingBlocksPattern(p.sink_blocks, p.local_blocks, p.block),
            num_heads=adapter.num_heads(attn_module),
            executor=p.executor,
        )
        if p.mode == "calibrate":
            return GatedAttention(native_fn, native_impl, ssa, torch.ones(1))
        return ssa


def calibration_parameters(model: nn.Module, *, freeze_rest: bool = False) -> list[nn.Parameter]:
    """The per-layer gates of a model patched with `loza:mode=calibrate`, in layer order.

    With `freeze_rest`, every other parameter stops requiring gradients: LoZA calibrates the gates alone.
    """
    _calibrating(model)
    return trainable_gates(model, freeze_rest=freeze_rest)


def finalize(model: nn.Module, fraction: float | None = None) -> dict[str, Any]:
    """Turn a calibrated model into a LoZA hybrid and return the spec it is now patched with.

    Reads each gated layer's alpha, picks the round(fraction * n) layers (at least one) with the lowest
    alpha (ties: the lower layer index) to become SSA, and re-patches the model with
    `loza:mode=sparse` on those layers, full attention on the others, keeping the layer selection and
    every other kind of the current spec (rope, kv, ...). `fraction` defaults to the `sparse_fraction`
    the model was patched with. The alphas are recorded as `calibration` in the manifest, so the
    checkpoint documents (and `lcplug.from_pretrained` reproduces) the choice.
    """
    plugin = _calibrating(model)
    fraction = plugin.params.sparse_fraction if fraction is None else fraction
    if not 0 < fraction <= 1:
        raise ParamError(f"{plugin.qualname()}: parameter 'sparse_fraction' got {fraction!r}; valid: 0 < fraction <= 1")
    alphas = {idx: float(layer.gate.detach().float().item()) for idx, layer in gated_layers(model).items()}
    count = max(1, math.floor(fraction * len(alphas) + 0.5))
    sparse = sorted(sorted(alphas, key=lambda i: (alphas[i], i))[:count])
    calibration = {str(i): a for i, a in alphas.items()}
    return repatch_attention(
        model, plugin, mode="sparse", sparse_fraction=fraction, sparse_layers=sparse, calibration=calibration
    )


def _calibrating(model: nn.Module) -> LozaAttention:
    return attention_plugin(model, LozaAttention, mode="calibrate")


@hookimpl
def lcplug_register(register):
    register(LozaAttention)
