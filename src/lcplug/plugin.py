"""Plugin base classes, one per kind, plus the model-family `Adapter`.

A plugin is a small class: a `name`, a `kind`, a docstring (its help text), a typed `Params` dataclass
and the methods of its kind. Instances carry validated params; the registry sets `origin` (the
distribution and version that registered it) when it loads the class.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from .params import Params

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

    from .attention.layer import LayerAttention
    from .patching import PatchContext

KINDS = ("attention", "rope", "cp", "kv", "data")
"""Kinds a spec can name. Adapters register through the same hook but are chosen per model, not named."""


@dataclass(frozen=True)
class Origin:
    """Where a plugin class comes from: the distribution that registered it, its version and entry point."""

    distribution: str
    version: str
    entry_point: str = ""

    def __str__(self) -> str:
        return f"{self.distribution} {self.version}"


class Plugin:
    """Common base: identity, help text, params, and the two steps of a patch (check, install)."""

    name: ClassVar[str]
    kind: ClassVar[str]
    Params: ClassVar[type[Params]] = Params
    origin: ClassVar[Origin] = Origin("unregistered", "0")

    def __init__(self, params: Params | None = None):
        self.params = params if params is not None else self.Params.from_dict({}, owner=self.qualname())

    @classmethod
    def qualname(cls) -> str:
        """`kind:name`, as errors and listings show it."""
        return f"{cls.kind}:{cls.name}"

    @classmethod
    def help(cls) -> str:
        """The docstring, cleaned: its first paragraph is the one-line summary in listings."""
        return inspect.cleandoc(cls.__doc__ or "").strip()

    @classmethod
    def summary(cls) -> str:
        return cls.help().split("\n\n", 1)[0].replace("\n", " ")

    @classmethod
    def build(cls, raw_params: dict[str, Any] | None) -> Plugin:
        """Instantiate with params parsed and validated from user input."""
        return cls(cls.Params.from_dict(raw_params, owner=cls.qualname()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params})"

    def check_compatible(self, plugins: dict[str, Plugin]) -> None:
        """Raise ConflictError if this plugin cannot be combined with the others of the spec."""

    def check(self, model: PreTrainedModel, adapter: Adapter) -> None:
        """Raise UnsupportedModelError/ParamError if this plugin cannot run on `model` (before any change)."""

    def install(self, ctx: PatchContext) -> None:
        """Apply this plugin to `ctx.model` through `ctx.txn` (every change undoable). Default: no change."""

    def manifest_state(self) -> dict[str, Any]:
        """Extra JSON state recorded in the manifest (e.g. calibration results)."""
        return {}

    # ---- training interface: what `lcplug.train` asks of the plugins a model is patched with ----------
    # Every default is "nothing", so a plugin that adds no trainable state needs none of these.

    def trainable_groups(self, model: nn.Module) -> dict[str, list[nn.Parameter]]:
        """Named groups of the parameters this plugin added to `model` that a stage may train alone
        (`train: gates`, `train: indexer`, `train: sinks`)."""
        return {}

    def aux_losses(self) -> dict[str, Callable[[nn.Module], torch.Tensor]]:
        """Auxiliary losses by the name a recipe's `losses:` uses; each reads the last forward's state off
        the model (e.g. `{"indexer_kl": indexer_loss}`)."""
        return {}

    def prepare_training(self, model: nn.Module, losses: set[str]) -> None:
        """Get `model` ready for a stage that optimises `losses` (names), e.g. switch on a loss its
        layers only compute when asked."""

    def finalize(self, model: nn.Module) -> dict[str, Any] | None:
        """End a calibration stage: turn what was learnt into a fixed patch, re-patch `model` with it and
        return the new spec (None: nothing to finalize)."""
        return None

    def restage(self, model: nn.Module, spec: dict[str, Any]) -> bool:
        """Apply a stage's new spec for this plugin's kind (`{"name": ..., **params}`) in place, keeping
        trained state; False (the default) lets the caller re-patch with `lcplug.patch`."""
        return False


class AttentionPlugin(Plugin):
    """Base of attention variants: say which keys each query may see, per layer.

    `layer_attention` returns an `nn.Module` (a `LayerAttention`) installed on the layer's attention
    module as the submodule `lcplug_attention`; its parameters (sink logits, gates, indexers) are real
    model parameters, trained and saved with the model.
    """

    kind = "attention"

    def layer_attention(
        self, layer_idx: int, attn_module: nn.Module, adapter: Adapter, *, native_fn: Any, native_impl: str
    ) -> LayerAttention:
        """The module that runs attention for one selected layer (`native_fn` is the model's own)."""
        raise NotImplementedError  # abstract: each attention plugin defines it

    def install(self, ctx: PatchContext) -> None:
        from .attention.install import install_attention

        install_attention(self, ctx)


class RopePlugin(Plugin):
    """Base of RoPE extensions: map the model's original rope parameters to extended ones.

    The core writes the result to `config.rope_parameters` (standard transformers keys wherever a
    standard `rope_type` exists) and recomputes the instance's rotary buffers from it.
    """

    kind = "rope"

    def rope_parameters(self, base: dict[str, Any], config: PretrainedConfig) -> dict[str, Any]:
        raise NotImplementedError  # abstract: each rope plugin defines it

    def max_position_embeddings(self, base_max: int) -> int:
        """The context length the extended model claims."""
        return base_max

    def check(self, model: PreTrainedModel, adapter: Adapter) -> None:
        """Everything installing would refuse (no rotary embedding, bad params, conflicting rope types)."""
        from .rope import check_rope

        check_rope(self, model, adapter)

    def install(self, ctx: PatchContext) -> None:
        from .rope import install_rope

        install_rope(self, ctx)


class CPPlugin(Plugin):
    """Base of context-parallel strategies: shard each sequence over `degree` ranks (see `lcplug.cp`).

    A cp plugin says *how* keys reach the ranks that need them (`strategy`); the attention plugins keep
    saying *which* keys each query sees. Its params must include `degree` and `timeout` (seconds a
    collective may wait for a rank). Installing builds the process groups and routes every attention
    module through the strategy; outside torch.distributed the patch is inactive (a warning says so), so a
    checkpoint trained with cp reloads in one process.
    """

    kind = "cp"
    runtime: Any = None  # set by install: the `lcplug.cp.install.CPRuntime` this instance runs with

    def strategy(self) -> Any:
        """The `lcplug.cp.strategies.Strategy` this plugin's params describe."""
        raise NotImplementedError  # abstract: each cp plugin defines it

    def check(self, model: PreTrainedModel, adapter: Adapter) -> None:
        from .cp.install import check_cp

        check_cp(self, model, adapter)

    def install(self, ctx: PatchContext) -> None:
        from .cp.install import install_cp

        install_cp(self, ctx)


class KVPlugin(Plugin):
    """Base of KV-cache tiers: `make_cache` builds the `transformers.Cache` a patched model's `generate` uses.

    Installing sets the instance's `generate` to one that calls `make_cache` whenever the caller passes no
    cache, and closes that cache if `generate` raises (see `lcplug.kv.install`).
    """

    kind = "kv"

    def make_cache(self, model: nn.Module) -> Any:
        """A fresh cache for one `generate` call on `model` (a `transformers.Cache`; `close()` if it holds files)."""
        raise NotImplementedError  # abstract: each kv plugin defines it

    def install(self, ctx: PatchContext) -> None:
        from .kv.install import install_kv

        install_kv(ctx)


class PlacementPlugin(Plugin):
    """Base of KV placement policies: which hot blocks a spilling layer sends to the lower tier first.

    The mechanism (`lcplug.kv.placement.Placement`) keeps the pinned sink and recent blocks and the budget;
    a policy only orders the other hot blocks for eviction. A spilling tier names one with its `placement`
    parameter (`kv="disk:placement=lru"`); like adapters, policies are registered, not named in a spec.
    """

    kind = "placement"

    def eviction_order(self, candidates: list[int], last_use: dict[int, int], reads: dict[int, int]) -> list[int]:
        """`candidates` (hot, unpinned blocks) in the order they should leave: `last_use[b]` is the step block b
        was last read, `reads[b]` how many steps read it while hot."""
        raise NotImplementedError  # abstract: each placement policy defines it


class DataPlugin(Plugin):
    """Base of data sources, builders and mixers feeding training."""

    kind = "data"


class Adapter(Plugin):
    """Finds what lcplug patches inside one family of models.

    The generic adapter serves every model whose attention modules call transformers'
    `AttentionInterface` and whose rotary embedding is a standard module; a family adapter subclasses it
    only where a family differs, and wins by a higher `priority`.
    """

    kind = "adapter"
    priority: ClassVar[int] = 0

    def matches(self, model: nn.Module) -> bool:
        raise NotImplementedError  # abstract: each adapter defines it

    def missing(self, model: nn.Module) -> list[str]:
        """What `model` lacks for this adapter (empty when supported)."""
        return []

    def text_config(self, model: nn.Module) -> PretrainedConfig:
        raise NotImplementedError  # abstract: each adapter defines it

    def attention_modules(self, model: nn.Module) -> dict[int, nn.Module]:
        raise NotImplementedError  # abstract: each adapter defines it

    def rotary_modules(self, model: nn.Module) -> list[nn.Module]:
        raise NotImplementedError  # abstract: each adapter defines it

    def num_heads(self, attn_module: nn.Module) -> int:
        raise NotImplementedError  # abstract: each adapter defines it

    def num_kv_heads(self, attn_module: nn.Module) -> int:
        raise NotImplementedError  # abstract: each adapter defines it

    def native_attention(self, attn_module: nn.Module, impl: str) -> Any:
        """The attention function the unpatched model calls for backend `impl`."""
        raise NotImplementedError  # abstract: each adapter defines it


KIND_BASES: dict[str, type[Plugin]] = {
    "attention": AttentionPlugin,
    "rope": RopePlugin,
    "cp": CPPlugin,
    "kv": KVPlugin,
    "data": DataPlugin,
    "adapter": Adapter,
    "placement": PlacementPlugin,
}
