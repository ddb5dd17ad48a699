"""RoPE mechanism: write extended rope parameters to the config and recompute one instance's buffers.

A rope plugin only maps base parameters to extended ones. This module does the rest for every
rotary module the adapter finds: per-layer-type parameters (Gemma-3 keeps one dict per layer type)
and partial rotary (Phi-3, GPT-NeoX) included, by calling transformers' own `ROPE_INIT_FUNCTIONS`, so a
patched instance computes exactly what a model built by transformers with the same parameters would.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from .errors import ConflictError, UnsupportedModelError

if TYPE_CHECKING:
    from .patching import PatchContext
    from .plugin import RopePlugin

STANDARD_TYPES = ("default", *ROPE_INIT_FUNCTIONS)


def rope_parameters_of(config: Any) -> dict[str, Any]:
    """The config's rope parameters, standardised by transformers (deep copy)."""
    params = getattr(config, "rope_parameters", None)
    if not params:
        raise UnsupportedModelError(
            f"{type(config).__name__} has no rope_parameters: the model has no rotary embedding to extend"
        )
    return copy.deepcopy(dict(params))


def per_layer_type(params: dict[str, Any]) -> bool:
    """True when `params` maps layer types to parameter dicts (Gemma-3 style)."""
    return bool(params) and all(isinstance(v, dict) or v is None for v in params.values()) and "rope_type" not in params


def install_rope(plugin: RopePlugin, ctx: PatchContext) -> None:
    config = ctx.config
    base = rope_parameters_of(config)
    base_max = int(config.max_position_embeddings)
    if per_layer_type(base):
        new = {lt: (None if p is None else plugin.rope_parameters(p, config)) for lt, p in base.items()}
    else:
        new = plugin.rope_parameters(base, config)
    rotaries = ctx.adapter.rotary_modules(ctx.model)
    if not rotaries:
        raise UnsupportedModelError(f"{type(ctx.model).__name__} has no rotary embedding module to extend")
    ctx.txn.setattr(config, "rope_parameters", new)
    ctx.txn.setattr(config, "max_position_embeddings", plugin.max_position_embeddings(base_max))
    for rotary in rotaries:
        recompute_rotary(rotary, config, ctx.txn)


def _slots(rotary: Any) -> list[tuple[str | None, str]]:
    """(layer_type, buffer prefix) pairs of a rotary module: one slot, or one per layer type."""
    if isinstance(getattr(rotary, "rope_type", None), dict):
        return [(lt, f"{lt}_") for lt in rotary.rope_type]
    return [(None, "")]


def recompute_rotary(rotary: Any, config: Any, txn: Any) -> None:
    """Recompute `inv_freq`, `original_inv_freq` and `attention_scaling` of one rotary module from `config`."""
    device = next((b.device for b in rotary.buffers()), torch.device("cpu"))
    for layer_type, prefix in _slots(rotary):
        params = config.rope_parameters[layer_type] if layer_type is not None else config.rope_parameters
        rope_type = params.get("rope_type", "default")
        if rope_type == "default":
            init = rotary.compute_default_rope_parameters
        elif rope_type in ROPE_INIT_FUNCTIONS:
            init = ROPE_INIT_FUNCTIONS[rope_type]
        else:
            raise UnsupportedModelError(
                f"rope_type {rope_type!r} is not one transformers computes; valid: {STANDARD_TYPES}"
            )
        kwargs = {"layer_type": layer_type} if layer_type is not None else {}
        inv_freq, scaling = init(config, device=device, **kwargs)
        inv_freq = inv_freq.to(device)
        txn.setattr(rotary, f"{prefix}inv_freq", inv_freq)
        txn.setattr(rotary, f"{prefix}original_inv_freq", inv_freq.clone())
        txn.setattr(rotary, f"{prefix}attention_scaling", scaling)
        if layer_type is None:
            txn.setattr(rotary, "rope_type", rope_type)
        else:
            txn.setattr(rotary, "rope_type", {**rotary.rope_type, layer_type: rope_type})
    for name in ("max_seq_len_cached", "original_max_seq_len"):
        if hasattr(rotary, name):
            txn.setattr(rotary, name, config.max_position_embeddings)


def extend_parameters(base: dict[str, Any], rope_type: str, *, owner: str, **values: Any) -> dict[str, Any]:
    """Standard rope parameters of `rope_type` on top of a model's base (theta, partial rotary kept).

    Values that are None are left out, so transformers applies its own defaults for them.
    """
    base_type = base.get("rope_type", "default")
    if base_type != "default":
        raise ConflictError(
            f"{owner}: the model's rotary embedding is already {base_type!r}; extending an extended rope is "
            "not supported: start from a checkpoint with rope_type 'default' or unpatch first"
        )
    keep = {k: base[k] for k in ("rope_theta", "partial_rotary_factor") if k in base}
    return {**keep, "rope_type": rope_type, **{k: v for k, v in values.items() if v is not None}}
