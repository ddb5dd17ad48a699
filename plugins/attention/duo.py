"""`duo`: DuoAttention, full attention on retrieval heads and streaming attention on the others.

Two stages, two modes of one plugin:
- `mode=train`: every KV head of the selected layers runs attn = a * full + (1 - a) * streaming with
  its own gate `a` (initialised to 1, so patching alone changes nothing). Freeze the model, train the
  gates (`gate_parameters(model, freeze_rest=True)`) on a distillation loss plus `l1_loss(model)`,
  then call `finalize(model)`.
- `mode=final`: `heads` says, per layer, which KV heads keep full attention (1: retrieval heads) and
  which stream (0: the `sink` leading tokens + the `recent` last tokens). The split is a fixed 0/1
  gate, so it is exact, and it is recorded in the manifest, so `lcplug.from_pretrained` reproduces it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from lcplug.attention import PatternAttention, SlidingWindowPattern
from lcplug.attention.executors import EXECUTORS
from lcplug.attention.gated import (
    GatedAttention,
    attention_plugin,
    gated_layers,
    is_layer_key,
    repatch_attention,
    trainable_gates,
)
from lcplug.errors import ParamError
from lcplug.hookspecs import hookimpl
from lcplug.params import Params, param
from lcplug.patching import PatchContext
from lcplug.plugin import Adapter, AttentionPlugin


def _per_head(ok: Any) -> Any:
    """A check for a mapping of layer index -> one value per KV head, each passing `ok`."""

    def check(value: dict) -> bool:
        return all(is_layer_key(k) and isinstance(v, (list, tuple)) and all(map(ok, v)) for k, v in value.items())

    return check


def _is_bit(x: Any) -> bool:
    return not isinstance(x, bool) and x in (0, 1)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass(frozen=True)
class DuoParams(Params):
    sink: int = param(128, "leading tokens a streaming head sees", check=lambda v: v >= 0, valid="an integer >= 0")
    recent: int = param(
        256, "last tokens a streaming head sees, itself included", check=lambda v: v >= 1, valid="an integer >= 1"
    )
    mode: Literal["train", "final"] = param(
        "train", "train: learn a per-KV-head gate full vs streaming; final: fixed split from `heads`"
    )
    l1: float = param(
        0.05, "weight lambda of the L1 penalty on the gates (`l1_loss`)", check=lambda v: v >= 0, valid="a number >= 0"
    )
    threshold: float = param(
        0.5,
        "`finalize` keeps full attention on heads whose gate is >= this",
        check=lambda v: 0 <= v <= 1,
        valid="0 <= threshold <= 1",
    )
    heads: dict[str, list[int]] = param(
        {},
        "final mode: per layer, 1 (full, retrieval head) or 0 (streaming) for each KV head",
        check=_per_head(_is_bit),
        valid="a mapping of layer index -> list of 0/1, one per KV head",
    )
    calibration: dict[str, list[float]] = param(
        {},
        "trained gates recorded by `finalize` (layer index -> one alpha per KV head)",
        check=_per_head(_is_number),
        valid="a mapping of layer index -> list of numbers, one per KV head",
    )
    block_size: int = param(
        64,
        "block size of the streaming pattern's block-sparse layout",
        check=lambda v: v >= 1 and not v & (v - 1),
        valid="a power of two, e.g. 64 or 128",
    )
    executor: Literal[EXECUTORS] = param("auto", "which executor runs the streaming pattern; auto picks per device")

    def validate(self, owner: str | None = None) -> None:
        super().validate(owner)
        if self.mode == "train" and self.heads:
            raise ParamError(
                f"{owner or self._owner}: parameter 'heads' applies to mode 'final' only (train learns the gates)"
            )


class DuoAttention(AttentionPlugin):
    """DuoAttention: per-KV-head gates split heads into full (retrieval) and streaming heads.

    A streaming head sees the first `sink` tokens and the `recent` last ones (128 + 256 by default), so
    its KV cache stops growing; retrieval heads keep full attention. `train` learns, per KV head, alpha
    in attn = alpha * full + (1 - alpha) * streaming with the model frozen (loss: distillation +
    `l1` * sum |alpha|); `finalize(model)` thresholds the gates (`threshold`, 0.5) into the fixed
    split of mode `final`, recorded per layer as `heads`.
    """

    name = "duo"
    Params = DuoParams

    def check(self, model: nn.Module, adapter: Adapter) -> None:
        modules = adapter.attention_modules(model)
        for name in ("heads", "calibration"):
            for key, values in getattr(self.params, name).items():
                idx = int(key)
                if idx not in modules:
                    raise ParamError(
                        f"{self.qualname()}: parameter {name!r} names layer {idx}, out of range for a model with "
                        f"{len(modules)} layers"
                    )
                kv_heads = adapter.num_kv_heads(modules[idx])
                if len(values) != kv_heads:
                    raise ParamError(
                        f"{self.qualname()}: parameter {name!r} gives {len(values)} values for layer {idx}, which "
                        f"has {kv_heads} KV heads"
                    )

    def install(self, ctx: PatchContext) -> None:
        if self.params.mode == "final":
            given = {int(k) for k in self.params.heads}
            missing, extra = sorted(set(ctx.layers) - given), sorted(given - set(ctx.layers))
            if missing or extra:
                problem = f"lacks layer {missing[0]}" if missing else f"names layer {extra[0]}, not selected"
                raise ParamError(
                    f"{self.qualname()}: parameter 'heads' {problem}; mode 'final' needs exactly one entry per "
                    f"selected layer ({ctx.layers})"
                )
        super().install(ctx)

    def trainable_groups(self, model: nn.Module) -> dict[str, list[nn.Parameter]]:
        return {"gates": gate_parameters(model)} if self.params.mode == "train" else {}

    def aux_losses(self) -> dict[str, Callable[[nn.Module], torch.Tensor]]:
        return {"duo_l1": l1_loss} if self.params.mode == "train" else {}

    def finalize(self, model: nn.Module) -> dict[str, Any] | None:
        return finalize(model) if self.params.mode == "train" else None

    def layer_attention(
        self, layer_idx: int, attn_module: nn.Module, adapter: Adapter, *, native_fn: Any, native_impl: str
    ) -> GatedAttention:
        p = self.params
        streaming = PatternAttention(
            native_fn,
            native_impl,
            SlidingWindowPattern(window=p.recent, sinks=p.sink, block_size=p.block_size),
            num_heads=adapter.num_heads(attn_module),
            executor=p.executor,
        )
        if p.mode == "train":
            gate = torch.ones(adapter.num_kv_heads(attn_module))
            return GatedAttention(native_fn, native_impl, streaming, gate)
        heads = {int(k): v for k, v in p.heads.items()}[layer_idx]
        return GatedAttention(
            native_fn, native_impl, streaming, torch.tensor(heads, dtype=torch.float32), trainable=False
        )


def gate_parameters(model: nn.Module, *, freeze_rest: bool = False) -> list[nn.Parameter]:
    """The per-KV-head gates of a model patched with `duo:mode=train`, one (Hkv,) tensor per layer.

    With `freeze_rest`, every other parameter stops requiring gradients: DuoAttention trains the gates alone.
    """
    _training(model)
    return trainable_gates(model, freeze_rest=freeze_rest)


def l1_penalty(model: nn.Module) -> torch.Tensor:
    """sum |alpha| over every gate of the model: DuoAttention's sparsity regulariser, unweighted."""
    gates = gate_parameters(model)
    if not gates:
        return torch.zeros(())
    return torch.stack([g.abs().sum() for g in gates]).sum()


def l1_loss(model: nn.Module) -> torch.Tensor:
    """`l1` * sum |alpha|: the term DuoAttention adds to its distillation loss (lambda 0.05 by default)."""
    return _training(model).params.l1 * l1_penalty(model)


def finalize(model: nn.Module, threshold: float | None = None) -> dict[str, Any]:
    """Turn trained gates into retrieval and streaming heads and return the spec the model is now patched with.

    A KV head whose gate is >= `threshold` (default: the `threshold` the model was patched with, 0.5)
    keeps full attention; the others stream. The model is re-patched with `duo:mode=final`, keeping the
    layer selection and every other kind of the current spec (rope, kv, ...); the split (`heads`) and
    the trained gates (`calibration`) land in the manifest.
    """
    plugin = _training(model)
    threshold = plugin.params.threshold if threshold is None else threshold
    if not 0 <= threshold <= 1:
        raise ParamError(f"{plugin.qualname()}: parameter 'threshold' got {threshold!r}; valid: 0 <= threshold <= 1")
    gates = {idx: layer.gate.detach().float().tolist() for idx, layer in gated_layers(model).items()}
    heads = {str(i): [int(a >= threshold) for a in g] for i, g in gates.items()}
    calibration = {str(i): g for i, g in gates.items()}
    return repatch_attention(model, plugin, mode="final", threshold=threshold, heads=heads, calibration=calibration)


def _training(model: nn.Module) -> DuoAttention:
    return attention_plugin(model, DuoAttention, mode="train")


@hookimpl
def lcplug_register(register):
    register(DuoAttention)
