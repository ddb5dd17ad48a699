"""`mla`: multi-head latent attention as a retrofit; the cache keeps a low-rank latent instead of K and V."""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lcplug.attention.latent import LatentAttention, LatentKV
from lcplug.errors import ConflictError, ParamError, UnsupportedModelError
from lcplug.hookspecs import hookimpl
from lcplug.params import Params, param
from lcplug.patching import PatchContext
from lcplug.plugin import Adapter, AttentionPlugin
from lcplug.spec import parse_plugin_spec


@dataclass(frozen=True)
class MLAParams(Params):
    rank: int | None = param(
        None,
        "latent numbers cached per token and layer (default: half of dense K/V, Hkv * head_dim); at most the "
        "hidden size and the latent rows Hkv * (2 * head_dim - rope_dims)",
        check=lambda v: v >= 1,
        valid="an integer >= 1",
    )
    rope_dims: int | None = param(
        None,
        "key dims per KV head that keep RoPE, projected directly (MLA's decoupled key); default an eighth of the "
        "rotary dims (at least 2); all rotary dims with full rank reproduce the model exactly",
        check=lambda v: v >= 0 and v % 2 == 0,
        valid="an even integer >= 0",
    )
    attention: str | dict = param(
        "full", "the variant attending over the up-projected keys and values, as a spec (a name or a mapping)"
    )


class MLAttention(AttentionPlugin):
    """Latent K/V compression (MLA) retrofitted from a GQA/MHA checkpoint, as in MHA2MLA / TransMLA.

    On each selected layer, `rope_dims` key dims per KV head keep RoPE and are projected directly from the
    hidden states; the other key dims lose their rotation and, with the values, are factored through a
    shared latent of size `rank`, initialised by the truncated SVD of the stacked projections. The cache
    holds the latent and the rotated rope keys (rank + Hkv * rope_dims numbers per token instead of
    2 * Hkv * head_dim); keys and values are up-projected in the attention call, where `attention` (any
    variant; default the model's own full attention) runs over them. Heal the conversion with a stage that
    trains `latent` (the new projections). See docs/retrofit_mla_engram.md.
    """

    name = "mla"
    Params = MLAParams

    def __init__(self, params=None):
        super().__init__(params)
        from lcplug.registry import get_registry

        inner = parse_plugin_spec("attention", self.params.attention)
        if inner.name == self.name:
            raise ConflictError(f"{self.qualname()}: attention={inner.name!r} cannot nest a latent layer in another")
        self.inner = get_registry().get("attention", inner.name).build(inner.params)
        self.init_errors: dict[str, float] = {}

    def check(self, model: nn.Module, adapter: Adapter) -> None:
        modules = adapter.attention_modules(model)
        for idx, module in sorted(modules.items()):
            missing = (
                adapter.latent_missing(module)
                if hasattr(adapter, "latent_missing")
                else [f"an adapter with latent_missing/latent_forward ({adapter.name} has none)"]
            )
            if missing:
                raise UnsupportedModelError(
                    f"{self.qualname()}: {type(module).__name__} (layer {idx}) needs {'; '.join(missing)}"
                )
        rotary = adapter.rotary_modules(model)
        if not rotary:
            raise UnsupportedModelError(f"{self.qualname()}: {type(model).__name__} has no rotary embedding module")
        self._rotary_dim = 2 * next(b for n, b in rotary[0].named_buffers() if n.endswith("inv_freq")).numel()
        self._sizes(modules[min(modules)], adapter)  # bad rank / rope_dims fail before any change
        self.inner.check(model, adapter)

    def _sizes(self, module: nn.Module, adapter: Adapter) -> tuple[int, int]:
        """(rank, rope_dims) for `module`, defaults filled in, checked against its dimensions."""
        head_dim, kv_heads = module.head_dim, adapter.num_kv_heads(module)
        rope_dims = self.params.rope_dims
        if rope_dims is None:
            rope_dims = max(2, self._rotary_dim // 8 // 2 * 2)
        if rope_dims > self._rotary_dim:
            raise ParamError(
                f"{self.qualname()}: rope_dims={rope_dims} exceeds the {self._rotary_dim} rotary dims per head; "
                f"valid: an even integer from 0 to {self._rotary_dim}"
            )
        limit = min(kv_heads * (2 * head_dim - rope_dims), module.k_proj.in_features)
        rank = self.params.rank if self.params.rank is not None else min(kv_heads * head_dim, limit)
        if rank > limit:
            raise ParamError(
                f"{self.qualname()}: rank={rank} exceeds what the latent can hold here; valid: 1 to {limit} (the "
                f"hidden size and the Hkv * (2 * head_dim - rope_dims) latent rows)"
            )
        return rank, rope_dims

    def layer_attention(
        self, layer_idx: int, attn_module: nn.Module, adapter: Adapter, *, native_fn: Any, native_impl: str
    ) -> LatentAttention:
        rank, rope_dims = self._sizes(attn_module, adapter)
        latent = LatentKV(
            attn_module.q_proj,
            attn_module.k_proj,
            attn_module.v_proj,
            head_dim=attn_module.head_dim,
            rotary_dim=self._rotary_dim,
            rank=rank,
            rope_dims=rope_dims,
        )
        self.init_errors[str(layer_idx)] = round(latent.init_error, 6)
        inner = self.inner.layer_attention(
            layer_idx, attn_module, adapter, native_fn=native_fn, native_impl=native_impl
        )
        return LatentAttention(inner, latent)

    def install(self, ctx: PatchContext) -> None:
        super().install(ctx)
        modules = ctx.adapter.attention_modules(ctx.model)
        for idx in ctx.layers:
            module = modules[idx]
            ctx.txn.setattr(module, "forward", types.MethodType(ctx.adapter.latent_forward(module), module))

    def manifest_state(self) -> dict[str, Any]:
        """The relative SVD error of each layer's initial factorisation ([W_k_nope; W_v], Frobenius)."""
        return {"svd_error": dict(self.init_errors), **self.inner.manifest_state()}

    # training: `latent` heals the conversion; the inner variant keeps its own groups and losses
    def trainable_groups(self, model: nn.Module) -> dict[str, list[nn.Parameter]]:
        return {**self.inner.trainable_groups(model), "latent": latent_parameters(model)}

    def aux_losses(self) -> dict[str, Any]:
        return self.inner.aux_losses()

    def prepare_training(self, model: nn.Module, losses: set[str]) -> None:
        self.inner.prepare_training(model, losses)


def latent_layers(model: nn.Module) -> list[LatentKV]:
    """The `LatentKV` of every latent layer of a model patched with `mla`, in layer order."""
    return [m for m in model.modules() if isinstance(m, LatentKV)]


def latent_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the conversion added (down/up projections and rope keys): what `train: latent` trains."""
    return [p for layer in latent_layers(model) for p in layer.parameters()]


def kv_bytes_per_token(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> tuple[int, int]:
    """(latent, dense) bytes a cache holds per token over the latent layers, at `dtype`."""
    size = torch.empty((), dtype=dtype).element_size()
    layers = latent_layers(model)
    latent = sum(layer.kv_elements_per_token() for layer in layers)
    dense = sum(2 * layer.kv_heads * layer.head_dim for layer in layers)
    return latent * size, dense * size


@hookimpl
def lcplug_register(register):
    register(MLAttention)
