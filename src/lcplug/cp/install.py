"""Installing a cp strategy on one model instance, and the per-layer callable the dispatcher defers to.

The seam: lcplug's attention dispatcher calls a module's `lcplug_attention` submodule, unless the module
carries an instance attribute `lcplug_cp` (`CP_ATTR`): then it calls that, with the submodule. Installing
a cp plugin sets that attribute on every attention module (through the patch transaction, so a failed
patch leaves nothing and `unpatch` removes it) to a `CPAttention` holding the mesh and strategy; the
submodule stays where it is, with its parameters (sinks, gates, indexers), and says *what* to attend
(`lcplug.cp.rules.plan_for`) while the strategy decides *how* across ranks. A model no attention plugin
patched is first put on the dispatcher with its own attention on every layer, which cp runs as dense
causal attention. Parameter names never change, so checkpoints load with or without cp.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..attention.dispatch import CP_ATTR, SUBMODULE
from ..attention.layer import LayerAttention, NativeAttention
from ..attention.mask import LazyMask
from ..plugin import AttentionPlugin
from .errors import CPConfigError
from .mesh import CPMesh, cp_mesh
from .rules import Mix, plan_for, rules_of
from .shard import ShardContext
from .strategies import Strategy

if TYPE_CHECKING:
    from ..patching import PatchContext
    from ..plugin import CPPlugin

_CONTEXT = "lcplug_cp"


@dataclass
class CPRuntime:
    """What a cp-patched model runs with: its mesh, strategy and the shard layout batches must use."""

    mesh: CPMesh
    strategy: Strategy
    suspended: bool = False  # True: layers run single-process (one rank alone, e.g. evaluation on rank 0)

    @property
    def layout(self) -> str:
        return self.strategy.layout


class CPAttention:
    """Runs one attention module's layer context-parallel (called by the dispatcher instead of the layer)."""

    def __init__(self, runtime: CPRuntime):
        self.runtime = runtime

    def __call__(self, layer: LayerAttention, module: nn.Module, query, key, value, mask, **kwargs: Any):
        if self.runtime.suspended:
            return layer(module, query, key, value, mask, **kwargs)
        scaling = kwargs.pop("scaling", None)
        scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
        if kwargs.pop("dropout", 0.0) and module.training:
            raise CPConfigError("cp runs attention without dropout; valid: attention_dropout 0 in the model config")
        ctx = self.context(mask, kwargs.get("position_ids"), query, key)
        plan = plan_for(layer, kwargs.get("sliding_window"))
        softcap = kwargs.get("softcap")
        strategy, mesh = self.runtime.strategy, self.runtime.mesh
        all_queries = strategy.ulysses > 1

        def run(rule) -> torch.Tensor:
            rule.prepare(ctx, query, key, all_queries)
            return strategy.attend(mesh, ctx, rule, query, key, value, scaling, softcap)

        if isinstance(plan, Mix):
            out = plan.layer.mix(lambda: run(plan.full), lambda: run(plan.sparse), query.shape[1], key.shape[1])
        else:
            out = run(plan)
        return out, None

    def context(self, mask: Any, position_ids: torch.Tensor | None, query, key) -> ShardContext:
        """This forward pass's shard context (built by the first layer, shared through the mask's cache)."""
        if isinstance(mask, LazyMask) and _CONTEXT in mask.cache:
            return mask.cache[_CONTEXT]
        lq, lkv = query.shape[2], key.shape[2]
        cached = isinstance(mask, LazyMask) and (mask.q_offset or mask.kv_offset)
        if lq != lkv or cached:
            raise CPConfigError(
                "cp shards whole sequences (training, scoring); this call uses a KV cache; valid: use_cache=False, "
                "or generate without a cp patch"
            )
        pad = mask.padding() if isinstance(mask, LazyMask) else None
        if pad is not None and not bool(pad.all()):
            raise CPConfigError(
                "cp needs unpadded rows (packed documents, position ids restarting per document); got an "
                "attention_mask with padding; valid: attention_mask=None"
            )
        if position_ids is None:
            raise CPConfigError(
                "cp needs the shard's global position_ids (lcplug.cp.shard_batch / context_parallel_slice give them)"
            )
        mesh = self.runtime.mesh
        b, h, _, d = query.shape
        shapes = [b, lq, h, key.shape[1], d]
        ctx = ShardContext.gather(mesh.cp, self.runtime.layout, position_ids.expand(b, -1), shapes)
        if isinstance(mask, LazyMask):
            mask.cache[_CONTEXT] = ctx
        return ctx


class _OwnAttention(AttentionPlugin):
    """The model's own attention on every layer: how cp puts a model no attention plugin patched on the
    dispatcher."""

    name = "own"

    def layer_attention(self, layer_idx, attn_module, adapter, *, native_fn, native_impl) -> NativeAttention:
        return NativeAttention(native_fn, native_impl)


def check_cp(plugin: CPPlugin, model: nn.Module, adapter: Any) -> None:
    """Everything a cp patch would refuse that the model alone decides: head counts the strategy must split."""
    strategy = plugin.strategy()
    for module in adapter.attention_modules(model).values():
        strategy.check_heads(adapter.num_heads(module), adapter.num_kv_heads(module))


def install_cp(plugin: CPPlugin, ctx: PatchContext) -> None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        warnings.warn(
            f"{plugin.qualname()} degree {plugin.params.degree} is inactive: torch.distributed is not initialised, "
            "so the model runs in one process (launch with accelerate launch or torchrun to shard sequences)",
            stacklevel=4,
        )
        return
    strategy = plugin.strategy()
    runtime = CPRuntime(cp_mesh(plugin.params.degree, strategy.ulysses, plugin.params.timeout), strategy)
    if ctx.model.config._attn_implementation != "lcplug":
        from ..attention.install import install_attention

        install_attention(_OwnAttention(), ctx)
    for idx, module in sorted(ctx.adapter.attention_modules(ctx.model).items()):
        layer = module._modules[SUBMODULE]
        for rule in rules_of(plan_for(layer, getattr(module, "sliding_window", None))):
            try:
                strategy.check_heads(ctx.adapter.num_heads(module), ctx.adapter.num_kv_heads(module), rule.head_groups)
            except CPConfigError as exc:
                raise CPConfigError(f"layer {idx}: {exc}") from None
        ctx.txn.setattr(module, CP_ATTR, CPAttention(runtime))
    plugin.runtime = runtime


@contextmanager
def suspended(model: nn.Module) -> Iterator[None]:
    """Run `model` single-process inside the block (one rank evaluating alone must not wait for the others)."""
    runtime = cp_runtime(model)
    if runtime is None:
        yield
        return
    runtime.suspended = True
    try:
        yield
    finally:
        runtime.suspended = False


def cp_runtime(model: nn.Module) -> CPRuntime | None:
    """The cp runtime a model is patched with (None: no cp, or cp inactive outside torch.distributed)."""
    from ..patching import patch_state

    state = patch_state(model)
    plugin = None if state is None else state.plugins.get("cp")
    return getattr(plugin, "runtime", None)
