"""`engram`: a hashed n-gram memory (Engram) added to chosen layers' residual stream.

It is registered as an *attention*-kind plugin because a patch spec names one plugin per kind and the
kinds are fixed (attention, rope, kv, cp, data); a memory is no attention variant, so, like `hybrid`, it
takes the variant the layers run as its `attention` parameter and installs that too. A memory kind of its
own would let `engram` stand beside any attention plugin without nesting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from lcplug.errors import ConflictError, ParamError
from lcplug.hookspecs import hookimpl
from lcplug.memory import PLACEMENTS, EngramMemory, EngramRuntime
from lcplug.params import Params, param
from lcplug.patching import PatchContext, Transaction
from lcplug.plugin import Adapter, AttentionPlugin
from lcplug.spec import parse_plugin_spec

SUBMODULE = "lcplug_engram"


@dataclass(frozen=True)
class EngramParams(Params):
    memory_layers: list[int] = param(
        [1], "decoder layers whose input gets the memory (Engram: early layers)", check=bool, valid="a non-empty list"
    )
    orders: list[int] = param(
        [2, 3], "n-gram orders hashed", check=lambda v: bool(v) and min(v) >= 1, valid="a list of integers >= 1"
    )
    heads: int = param(4, "hash heads per order (independent tables)", check=lambda v: v >= 1, valid="an integer >= 1")
    table_size: int = param(
        65521, "rows per (order, head) table; a prime spreads hashes", check=lambda v: v >= 2, valid="an integer >= 2"
    )
    dim: int = param(16, "embedding size of one table row", check=lambda v: v >= 1, valid="an integer >= 1")
    kernel: int = param(4, "width of the causal depthwise convolution", check=lambda v: v >= 1, valid="an integer >= 1")
    placement: Literal[PLACEMENTS] = param(
        "device", "where the tables live: device, host (CPU memory, trainable) or disk (memory-mapped, serving)"
    )
    seed: int = param(0, "seed of the hash multipliers and the tables' initialisation")
    attention: str | dict = param("full", "the attention variant the layers run, as a spec (a name or a mapping)")


class Engram(AttentionPlugin):
    """Engram: O(1) hashed n-gram lookups gated into the residual stream of `memory_layers`.

    Each memory layer hashes the last n token ids (for every order in `orders`, with `heads` hash functions)
    into tables of `table_size` rows, gates the projected rows with the hidden state (a sigmoid of their
    normalised dot product), adds a short causal depthwise convolution, and adds the result to the hidden
    states entering the layer. The output projection starts at zero, so patching changes nothing until the
    `memory` group is trained. Tables can live on the device, in host memory or memory-mapped on disk
    (`placement`). See docs/retrofit_mla_engram.md.
    """

    name = "engram"
    Params = EngramParams

    def __init__(self, params=None):
        super().__init__(params)
        from lcplug.registry import get_registry

        inner = parse_plugin_spec("attention", self.params.attention)
        if inner.name == self.name:
            raise ConflictError(f"{self.qualname()}: attention={inner.name!r} would add a second memory")
        self.inner = get_registry().get("attention", inner.name).build(inner.params)

    def check(self, model: nn.Module, adapter: Adapter) -> None:
        count = len(adapter.attention_modules(model))
        bad = [i for i in self.params.memory_layers if not 0 <= i < count]
        if bad:
            raise ParamError(
                f"{self.qualname()}: memory_layers names layer {bad[0]}; valid: 0 to {count - 1} for this model"
            )
        self.inner.check(model, adapter)

    def layer_attention(self, layer_idx: int, attn_module: nn.Module, adapter: Adapter, **kwargs: Any):
        """Only a plugin nesting engram (hybrid) calls this, and its install would never add the memory."""
        raise ConflictError(
            f"{self.qualname()} cannot be nested in another attention variant; give engram as the attention plugin "
            "and the variant as its `attention` parameter"
        )

    def install(self, ctx: PatchContext) -> None:
        self.inner.install(ctx)
        p = self.params
        runtime = EngramRuntime(context=max(p.orders) - 1)
        _hook(ctx.txn, lambda: ctx.model.register_forward_pre_hook(runtime.model_pre_hook, with_kwargs=True))
        layers = decoder_layers(ctx.model, ctx.adapter)
        hidden = ctx.config.hidden_size
        for idx in sorted(set(p.memory_layers)):
            memory = EngramMemory(
                hidden,
                orders=p.orders,
                heads=p.heads,
                size=p.table_size,
                dim=p.dim,
                kernel=p.kernel,
                placement=p.placement,
                seed=p.seed + 1000 * idx,
            )
            layer = layers[idx]
            memory.to(device=next(layer.parameters()).device).train(layer.training)
            ctx.txn.add_module(layer, SUBMODULE, memory)
            hook = runtime.layer_pre_hook(idx, memory)
            _hook(ctx.txn, lambda layer=layer, hook=hook: layer.register_forward_pre_hook(hook, with_kwargs=True))

    # training: `memory` trains the tables (device/host placement), projections, norms and convolution
    def trainable_groups(self, model: nn.Module) -> dict[str, list[nn.Parameter]]:
        return {**self.inner.trainable_groups(model), "memory": memory_parameters(model)}

    def aux_losses(self) -> dict[str, Any]:
        return self.inner.aux_losses()

    def prepare_training(self, model: nn.Module, losses: set[str]) -> None:
        self.inner.prepare_training(model, losses)


def decoder_layers(model: nn.Module, adapter: Adapter) -> dict[int, nn.Module]:
    """Each layer's decoder block: the module whose child is that layer's attention module."""
    parents = {id(child): module for module in model.modules() for child in module.children()}
    return {idx: parents[id(attn)] for idx, attn in adapter.attention_modules(model).items()}


def memory_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of every memory layer (disk-placed tables are buffers, so they are not among them)."""
    return [p for m in model.modules() if isinstance(m, EngramMemory) for p in m.parameters()]


def _hook(txn: Transaction, register: Any) -> None:
    """Register a hook now and remove it on rollback (unpatch)."""
    handle = txn.call(register, lambda: handle.remove())


@hookimpl
def lcplug_register(register):
    register(Engram)
