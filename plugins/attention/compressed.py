"""What the compressed-attention plugins (ksa, csa, hca, nsa) share: common params, layer construction and
the training interface. Not a plugin itself: each variant is a thin subclass naming its geometry.

Training interface, the same for all four: `train: compress` trains the pooling weights (plus `sinks`,
`indexer` for csa and `gates` for nsa); the loss `distill` is each layer's output MSE against the model's
own attention on the same inputs (`lcplug.attention.compressed.distill_loss`), computed in the same
forward, so the teacher needs no second model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from lcplug.attention import check_block_size
from lcplug.attention.compress import Compressor, Geometry
from lcplug.attention.compressed import (
    CompressedAttention,
    compress_parameters,
    compressed_layers,
    distill_loss,
    enable_distillation,
)
from lcplug.errors import ParamError
from lcplug.params import Params, param
from lcplug.plugin import Adapter, AttentionPlugin
from lcplug.plugins.attention.dsa import attention_shape

EXECUTORS = ("auto", "reference", "torch")
"""Branches are merged through their log-sum-exps, which the torch block executor returns; auto picks it."""


def positive(default: int, help: str) -> Any:
    return param(default, help, check=lambda v: v >= 1, valid="an integer >= 1")


@dataclass(frozen=True)
class CompressedParams(Params):
    """Params every compressed variant has; subclasses add their geometry's."""

    block_size: int = param(
        64,
        "block size of the block-sparse layouts (raw window and compressed entries)",
        check=lambda v: v >= 1 and not v & (v - 1),
        valid="a power of two, e.g. 64 or 128",
    )
    learnable_sink: bool = param(False, "add a trainable per-head sink logit (DeepSeek-V4's attention sink)")
    sink_init: float = param(
        -20.0, "initial sink logit; -20 puts its mass below fp32 resolution (patching changes nothing)"
    )
    executor: Literal[EXECUTORS] = param("auto", "reference: the dense oracle; torch/auto: block-gather executor")

    def geometry(self) -> Geometry:
        raise NotImplementedError  # each variant says where its entries sit

    def validate(self, owner: str | None = None) -> None:
        super().validate(owner)
        try:
            self.geometry()
        except ParamError as exc:
            raise ParamError(f"{owner or self._owner}: {exc}") from None


class CompressedPlugin(AttentionPlugin):
    """Base of ksa/csa/hca/nsa: builds one `CompressedAttention` per selected layer from `Params.geometry()`."""

    layer_class: ClassVar[type[CompressedAttention]] = CompressedAttention

    def check(self, model: nn.Module, adapter: Adapter) -> None:
        for module in adapter.attention_modules(model).values():
            attention_shape(module, adapter)

    def layer_attention(
        self, layer_idx: int, attn_module: nn.Module, adapter: Adapter, *, native_fn: Any, native_impl: str
    ) -> CompressedAttention:
        p = self.params
        check_block_size(p.block_size, self.qualname())
        heads, kv_heads, head_dim = attention_shape(attn_module, adapter)
        geometry = p.geometry()
        dtype = next(attn_module.parameters()).dtype
        return self.layer_class(
            native_fn,
            native_impl,
            geometry=geometry,
            compressor=Compressor(kv_heads, head_dim, geometry.size, dtype),
            kv_heads=kv_heads,
            head_dim=head_dim,
            num_heads=heads,
            block_size=p.block_size,
            executor=p.executor,
            learnable_sink=p.learnable_sink,
            sink_init=p.sink_init,
            **self.layer_extras(layer_idx, heads, kv_heads, head_dim, dtype),
        )

    def layer_extras(self, layer_idx: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> dict:
        """Variant-specific constructor arguments (an indexer, selection sizes)."""
        return {}

    # ---- training ------------------------------------------------------------------------------------------

    def trainable_groups(self, model: nn.Module) -> dict[str, list[nn.Parameter]]:
        groups = {"compress": compress_parameters(model)}
        sinks = [layer.sink_logit for layer in compressed_layers(model) if layer.sink_logit is not None]
        return {**groups, "sinks": sinks} if sinks else groups

    def aux_losses(self) -> dict[str, Callable[[nn.Module], torch.Tensor]]:
        return {"distill": distill_loss}

    def prepare_training(self, model: nn.Module, losses: set[str]) -> None:
        enable_distillation(model, "distill" in losses)
