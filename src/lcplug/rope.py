"""RoPE mechanism: write extended rope parameters to the config and recompute one instance's buffers.

A rope plugin only maps base parameters to extended ones. This module does the rest for every
rotary module the adapter finds: per-layer-type parameters (Gemma-3 keeps one dict per layer type)
and partial rotary (Phi-3, GPT-NeoX) included, by calling transformers' own `ROPE_INIT_FUNCTIONS`, so a
patched instance computes exactly what a model built by transformers with the same parameters would.

Composition (a plugin applied to a model whose rope is already extended, e.g. a Llama-3.1 checkpoint,
or a checkpoint saved by lcplug and loaded by plain transformers) follows explicit rules, so a second
extension either means exactly one thing or fails naming both types:

| base rope_type | extension           | result                                                         |
|----------------|---------------------|----------------------------------------------------------------|
| default        | any                 | the extension on the base theta / partial rotary               |
| linear         | linear              | linear, factors multiplied (PI of PI)                          |
| default/linear | ntk (theta scaling) | the same type, rope_theta scaled (NTK under PI is exact)       |
| fixed (see FIXED_FREQUENCY_TYPES) | selfextend | unchanged: positions are remapped in attention    |
| anything else  | anything            | ConflictError naming both types                                |

It also holds the small rotary helpers attention-side plugins need (`layer_inv_freq`, `rotate`), so
there is one place that knows how transformers lays out a rotary embedding.
"""

from __future__ import annotations

import copy
import warnings
from typing import TYPE_CHECKING, Any

import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from .errors import ConflictError, ParamError, UnsupportedModelError

if TYPE_CHECKING:
    from torch import nn

    from .patching import PatchContext
    from .plugin import Adapter, RopePlugin

STANDARD_TYPES = ("default", *ROPE_INIT_FUNCTIONS)

FIXED_FREQUENCY_TYPES = ("default", "linear", "yarn", "llama3")
"""Types whose frequencies do not depend on the sequence at run time ('dynamic' and 'longrope' swap
`inv_freq` by the current length), so a rotation can be undone and redone from one `inv_freq`."""

COMPOSABLE = "any type on 'default', 'linear' on 'linear', 'ntk' on 'default' or 'linear'"


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


def rope_types(params: dict[str, Any]) -> list[str]:
    """The rope_type of each slot (one, or one per layer type)."""
    slots = [p for p in params.values() if p is not None] if per_layer_type(params) else [params]
    return [p.get("rope_type", "default") for p in slots]


def rotary_dim(params: dict[str, Any], config: Any) -> int:
    """Rotated dimensions per head, as transformers computes them: head_dim * partial_rotary_factor."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return int(head_dim * params.get("partial_rotary_factor", 1.0))


def original_length(config: Any, requested: int | None, owner: str) -> int:
    """The pre-extension context length L: `requested`, else the model's current max_position_embeddings.

    L above the current length would claim the model was trained on more context than it says it has.
    """
    current = int(config.max_position_embeddings)
    orig = requested or current
    if orig > current:
        raise ParamError(
            f"{owner}: original_max_position_embeddings={orig} is above the model's current "
            f"max_position_embeddings={current}; valid: an integer <= {current}"
        )
    return orig


def extend_parameters(base: dict[str, Any], rope_type: str, *, owner: str, **values: Any) -> dict[str, Any]:
    """Standard rope parameters of `rope_type` on top of a model's base (theta, partial rotary kept).

    Values that are None are left out, so transformers applies its own defaults for them. A base that is
    already extended composes only where the result is one standard type (see the module's table).
    """
    base_type = base.get("rope_type", "default")
    keep = {k: base[k] for k in ("rope_theta", "partial_rotary_factor") if k in base}
    values = {k: v for k, v in values.items() if v is not None}
    if base_type == "default":
        return {**keep, "rope_type": rope_type, **values}
    if base_type == rope_type == "linear":
        return {**keep, "rope_type": "linear", "factor": float(base["factor"]) * float(values["factor"])}
    raise _conflict(owner, rope_type, base_type)


def scale_theta(base: dict[str, Any], factor: float, config: Any, *, owner: str) -> dict[str, Any]:
    """Static NTK-aware scaling: rope_theta * s^(d / (d - 2)), d the rotary dim, every other key kept.

    On 'default' this is standard rope_type 'default' with a new theta; on 'linear' it is exact too
    (both divide the same frequencies), so it composes; other types use theta in nonlinear ways.
    """
    base_type = base.get("rope_type", "default")
    if base_type not in ("default", "linear"):
        raise _conflict(owner, "default (NTK-scaled theta)", base_type)
    d = rotary_dim(base, config)
    if d <= 2:
        raise UnsupportedModelError(f"{owner}: NTK scaling needs a rotary dim > 2, the model rotates {d} dims")
    return {**base, "rope_theta": float(base["rope_theta"]) * factor ** (d / (d - 2))}


def require_fixed_frequencies(config: Any, owner: str) -> None:
    """Refuse a base rope whose frequencies change with the sequence length at run time."""
    for rope_type in rope_types(rope_parameters_of(config)):
        if rope_type not in FIXED_FREQUENCY_TYPES:
            raise ConflictError(
                f"{owner} re-rotates queries and keys with one fixed set of frequencies, but the model's rope_type "
                f"{rope_type!r} changes them with the sequence length; valid base types: {FIXED_FREQUENCY_TYPES}"
            )


def _conflict(owner: str, rope_type: str, base_type: str) -> ConflictError:
    return ConflictError(
        f"{owner}: cannot apply {rope_type!r} on top of the model's rope_type {base_type!r}: the composition "
        f"is not defined (composable: {COMPOSABLE}); start from the un-extended checkpoint or unpatch first"
    )


def plan_rope(plugin: RopePlugin, config: Any) -> tuple[dict[str, Any], int]:
    """The rope parameters and max_position_embeddings `plugin` would write, without writing them."""
    base = rope_parameters_of(config)
    if per_layer_type(base):
        new: dict[str, Any] = {lt: (None if p is None else plugin.rope_parameters(p, config)) for lt, p in base.items()}
    else:
        new = plugin.rope_parameters(base, config)
    return new, plugin.max_position_embeddings(int(config.max_position_embeddings))


def base_config(model: nn.Module, adapter: Adapter) -> Any:
    """The text config a new patch will start from: the current one, or, on a patched model (which
    `patch` unpatches first), a copy holding the base values its manifest recorded."""
    from .patching import patch_state

    config = adapter.text_config(model)
    state = patch_state(model)
    if state is None:
        return config
    config = copy.deepcopy(config)
    for name, value in state.manifest["base"].items():
        if value is not None:
            setattr(config, name, copy.deepcopy(value))
    return config


def check_rope(plugin: RopePlugin, model: nn.Module, adapter: Adapter) -> None:
    """Everything `install_rope` would refuse, found before any change: no rope, bad params, conflicts.

    A config class that would refuse the new parameters when saving or loading (Phi-3 accepts only
    'default' and 'longrope') is reported with a warning: the patched instance runs correctly, but
    `save_pretrained` of transformers will refuse it.
    """
    config = base_config(model, adapter)
    new, new_max = plan_rope(plugin, config)
    if not adapter.rotary_modules(model):
        raise UnsupportedModelError(f"{type(model).__name__} has no rotary embedding module to extend")
    trial = copy.deepcopy(config)
    for name, value in _config_values(config, new, new_max).items():
        setattr(trial, name, value)
    try:
        trial.validate_rope()
    except Exception as exc:  # transformers raises ValueError or its own validation errors
        reason = str(exc).strip().splitlines()[-1].strip()
        warnings.warn(
            f"{plugin.qualname()}: {type(config).__name__} refuses these rope parameters ({reason}); the patched "
            "model runs, but transformers will not save or load it as a checkpoint",
            stacklevel=2,
        )


def _config_values(config: Any, new: dict[str, Any], new_max: int) -> dict[str, Any]:
    """The config attributes a rope patch writes, kept consistent with each other.

    Some configs (Phi-3) keep the pre-extension length as an attribute too, and transformers' rope code
    gives that attribute priority over rope_parameters' own, so it is written with the same value.
    """
    values: dict[str, Any] = {"rope_parameters": new, "max_position_embeddings": new_max}
    slots = [p for p in new.values() if p is not None] if per_layer_type(new) else [new]
    originals = {p["original_max_position_embeddings"] for p in slots if "original_max_position_embeddings" in p}
    if originals and hasattr(config, "original_max_position_embeddings"):
        values["original_max_position_embeddings"] = max(originals)
    return values


def install_rope(plugin: RopePlugin, ctx: PatchContext) -> None:
    config = ctx.config
    new, new_max = plan_rope(plugin, config)
    rotaries = ctx.adapter.rotary_modules(ctx.model)
    if not rotaries:
        raise UnsupportedModelError(f"{type(ctx.model).__name__} has no rotary embedding module to extend")
    for name, value in _config_values(config, new, new_max).items():
        ctx.txn.setattr(config, name, value)
    for rotary in rotaries:
        recompute_rotary(rotary, config, ctx.txn)


def _slots(rotary: Any) -> list[tuple[str | None, str]]:
    """(layer_type, buffer prefix) pairs of a rotary module: one slot, or one per layer type."""
    if isinstance(getattr(rotary, "rope_type", None), dict):
        return [(lt, f"{lt}_") for lt in rotary.rope_type]
    return [(None, "")]


def recompute_rotary(rotary: Any, config: Any, txn: Any) -> None:
    """Recompute `inv_freq`, `original_inv_freq` and `attention_scaling` of one rotary module from `config`.

    transformers' 'dynamic' and 'longrope' forwards add attributes at run time (a grown `inv_freq`, a
    cached `long_inv_freq`, per-layer-type `max_seq_len_cached`); the first undo step recorded here
    removes whatever the module did not have before, so unpatch leaves no stale cache behind.
    """
    before = set(vars(rotary)) | set(rotary._buffers)
    txn.call(lambda: None, lambda: _drop_new_attributes(rotary, before))
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


def _drop_new_attributes(module: Any, keep: set[str]) -> None:
    for name in [n for n in module._buffers if n not in keep]:
        del module._buffers[name]
    for name in [n for n in vars(module) if n not in keep]:
        delattr(module, name)


# ---- rotary helpers for attention-side plugins -------------------------------------------------------


def layer_inv_freq(model: nn.Module, adapter: Adapter, layer_idx: int) -> torch.Tensor:
    """The `inv_freq` (rotary_dim / 2,) that layer `layer_idx`'s RoPE uses.

    One rotary module per model (transformers' layout); with per-layer-type rope (Gemma-3) the layer's
    type picks the slot.
    """
    rotaries = adapter.rotary_modules(model)
    if len(rotaries) != 1:
        raise UnsupportedModelError(
            f"{type(model).__name__} has {len(rotaries)} rotary embedding modules; expected one to read the "
            "frequencies each layer uses"
        )
    (rotary,) = rotaries
    prefix = ""
    if isinstance(getattr(rotary, "rope_type", None), dict):
        layer_types = getattr(adapter.text_config(model), "layer_types", None) or []
        if layer_idx >= len(layer_types) or layer_types[layer_idx] not in rotary.rope_type:
            raise UnsupportedModelError(f"cannot tell which rope layer type layer {layer_idx} of the model uses")
        prefix = f"{layer_types[layer_idx]}_"
    return getattr(rotary, f"{prefix}inv_freq")


def rotate(x: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Turn rotary vectors x (B, H, L, D) by `delta` (B, L) more positions: R(delta) R(p) x = R(p + delta) x.

    transformers' layout: the first 2 * len(inv_freq) dims rotate in two halves (`rotate_half`), the rest
    pass through (partial rotary). cos/sin are unscaled, so a scaling the model applied stays as it was.
    """
    half = inv_freq.shape[-1]
    angles = delta.to(torch.float32)[:, None, :, None] * inv_freq.to(x.device, torch.float32)
    cos, sin = angles.cos(), angles.sin()
    x1, x2, rest = x[..., :half].float(), x[..., half : 2 * half].float(), x[..., 2 * half :]
    turned = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
    return torch.cat((turned, rest), dim=-1) if rest.shape[-1] else turned
