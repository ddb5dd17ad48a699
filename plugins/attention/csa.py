"""`csa`: DeepSeek-V4's compressed sparse attention: an indexer picks top-k overlapping compressed entries."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lcplug.attention.compress import Geometry
from lcplug.attention.compressed import compressed_layers
from lcplug.attention.indexer import LightningIndexer
from lcplug.hookspecs import hookimpl
from lcplug.plugins.attention.compressed import CompressedParams, CompressedPlugin, positive
from lcplug.plugins.attention.dsa import attention_kl


@dataclass(frozen=True)
class CSAParams(CompressedParams):
    stride: int = positive(4, "positions between compressed entries (m)")
    size: int = positive(8, "tokens pooled into each entry; 2m: neighbouring windows overlap by half")
    window: int = positive(128, "raw tokens each query sees, itself included (the sliding-window branch)")
    topk: int = positive(512, "compressed entries each query reads, chosen by the indexer (V4-Flash: 512)")
    heads: int = positive(64, "indexer heads (at most the model's query heads)")
    dim: int = positive(128, "indexer head dimension (at most the model's head dimension)")

    def geometry(self) -> Geometry:
        return Geometry(self.size, self.stride, self.window)


class CSA(CompressedPlugin):
    """CSA (DeepSeek-V4): overlapping windows pooled into entries, a lightning indexer picks top-k of them.

    Every `stride` positions a window of `size` tokens is pooled (softmax(Z + B) weights, starting as the
    mean) into one entry; a lightning indexer (DSA's, over the compressed keys) scores the visible entries
    and each query attends, in one softmax, to its `topk` best plus its last `window` raw tokens. A cache
    keeps the raw window, the entries and their indexer keys. While the visible entries number at most
    `topk` the selection is all of them, so the random initial indexer matters only beyond
    topk * stride tokens: warm it up first (`train: indexer`, `losses: {indexer_kl: 1.0}`: KL of the
    attention's distribution over visible entries to the indexer's), then `train: compress`, `distill`.
    """

    name = "csa"
    Params = CSAParams

    def layer_extras(self, layer_idx: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> dict:
        p = self.params
        indexer = LightningIndexer.for_layer(
            layer_idx, heads, kv_heads, head_dim, index_heads=p.heads, index_dim=p.dim, dtype=dtype
        )
        return {"indexer": indexer, "topk": p.topk, "selection_loss": attention_kl}

    def trainable_groups(self, model: nn.Module) -> dict[str, list[nn.Parameter]]:
        # only layers that select (a schedule may hand this plugin hca's layers too, which have no indexer)
        layers = [layer for layer in compressed_layers(model) if layer.indexer is not None]
        indexer = [p for layer in layers for p in layer.indexer.parameters()]
        return {**super().trainable_groups(model), "indexer": indexer}

    def aux_losses(self) -> dict[str, Callable[[nn.Module], torch.Tensor]]:
        return {**super().aux_losses(), "indexer_kl": indexer_loss}

    def prepare_training(self, model: nn.Module, losses: set[str]) -> None:
        super().prepare_training(model, losses)
        for layer in compressed_layers(model):
            layer.compute_indexer_loss = "indexer_kl" in losses


def indexer_loss(model: nn.Module) -> torch.Tensor:
    """Sum over CSA layers of the last forward's indexer KL (mean over queries)."""
    losses = [layer.indexer_loss for layer in compressed_layers(model) if layer.indexer_loss is not None]
    if not losses:
        raise RuntimeError("no indexer loss recorded: prepare a stage with losses {indexer_kl: ...} first")
    return sum((loss.to(losses[0].device) for loss in losses[1:]), losses[0])


@hookimpl
def lcplug_register(register):
    register(CSA)
