"""`hybrid`: a layer schedule mixing attention variants with the model's own full attention."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lcplug.attention import LayerAttention, NativeAttention
from lcplug.errors import ConflictError, SpecError, UnsupportedModelError
from lcplug.hookspecs import hookimpl
from lcplug.layers import select_layers
from lcplug.params import Params, param
from lcplug.patching import patch_state
from lcplug.plugin import Adapter, AttentionPlugin
from lcplug.spec import parse_plugin_spec

NOT_VARIANTS = ("hybrid", "full")
"""Names a schedule entry may not take: a schedule does not nest, and full layers come from ratio/full_layers."""

DEEPSEEK_V4_FLASH: dict[str, Any] = {
    "name": "hybrid",
    "pinned": {"0-1": {"name": "sliding-window", "window": 128, "sinks": 0, "learnable_sink": True}},
    "sparse": [{"name": "csa", "learnable_sink": True}, {"name": "hca", "learnable_sink": True}],
    "ratio": "1:0",
}
"""DeepSeek-V4-Flash's schedule: two sliding-window-only layers (window 128, per-head sink), then CSA and HCA
layer by layer (each with its own 128-token window and sink; CSA: m = 4, top-512; HCA: m' = 128), no full layer."""


def _nonempty_if_list(value: Any) -> bool:
    return not isinstance(value, list) or len(value) > 0


@dataclass(frozen=True)
class HybridParams(Params):
    sparse: str | dict | list[str | dict] = param(
        "sliding-window",
        "the sparse variant, as a spec (a name, 'name:k=v' or {'name': ..., <params>}), or a list of specs the "
        "sparse layers take in turn (['csa', 'hca']: CSA, HCA, CSA, ...)",
        check=_nonempty_if_list,
        valid="a spec or a non-empty list of specs",
    )
    ratio: str = param(
        "5:1",
        "sparse:full layers per group among the layers `pinned` leaves, e.g. '5:1' (MiMo-V2: five SWA layers, "
        "then one global) or '1:0' (no full layer); ignored when full_layers is given",
    )
    full_layers: list[int] | None = param(None, "explicit layers that stay full (overrides ratio)")
    pinned: dict[str, Any] | None = param(
        None,
        "layers -> the variant they run whatever ratio says, e.g. {'0-1': 'sliding-window:window=128'} "
        "(DeepSeek-V4's two window-only lead layers); keys take any layer-selection form",
        check=lambda v: all(isinstance(k, str) for k in v),
        valid="a mapping with string keys (quote numbers in YAML: '2': ...)",
    )


@dataclass(frozen=True)
class Variant:
    """One attention variant of the schedule: the plugin and where its spec sits (`sparse[1]`, `pinned[0-1]`)."""

    label: str
    plugin: AttentionPlugin


class LayerScope(nn.ModuleList):
    """The attention modules of the layers one variant runs: what its training hooks see in a schedule of
    several variants, so each finds only its own layers (csa's indexers, not hca's missing ones)."""


class HybridAttention(AttentionPlugin):
    """A layer schedule: attention variants on some layers, the model's own full attention on the others.

    `hybrid:ratio=5:1` keeps every sixth layer on the model's own attention and runs `sparse` on the
    others (MiMo-V2-Flash's 5:1 SWA:global schedule with its window of 128 is
    `{"name": "hybrid", "sparse": {"name": "sliding-window", "window": 128}, "ratio": "5:1"}`).
    `sparse` may list several specs, which the sparse layers take in turn, and `pinned` gives chosen layers a
    variant of their own; ratio then groups the remaining layers. DeepSeek-V4-Flash (two window-only layers,
    then CSA and HCA alternating, `DEEPSEEK_V4_FLASH`) is
    `{"name": "hybrid", "pinned": {"0-1": "sliding-window:window=128,sinks=0"}, "sparse": ["csa", "hca"],
    "ratio": "1:0"}`. Any installed attention plugin but `hybrid` and `full` can be a variant; the spec's
    `layers` narrows where the schedule applies (the other layers stay full).

    Training: each variant's groups and losses are offered under their own names, groups of the same name
    joined (`train: sinks` trains the window layers' sinks and the compressed layers' alike). Two variants
    offering one loss name computed by different functions (dsa's and csa's `indexer_kl`) are an error: a
    stage could not say which it means. A stage that changes only the variants' params (dsa warm-up ->
    sparse) restages in place, keeping every trained weight whose name and shape remain.
    """

    name = "hybrid"
    Params = HybridParams

    def __init__(self, params=None):
        super().__init__(params)
        p = self.params
        specs = p.sparse if isinstance(p.sparse, list) else [p.sparse]
        labels = [f"sparse[{i}]" for i in range(len(specs))] if isinstance(p.sparse, list) else ["sparse"]
        self.cycle = [self._variant(label, spec) for label, spec in zip(labels, specs)]
        self.pinned = {key: self._variant(f"pinned[{key}]", spec) for key, spec in (p.pinned or {}).items()}
        self.variants = [*self.pinned.values(), *self.cycle]
        if p.full_layers is None:
            select_layers(p.ratio, 1)  # validates the ratio's form early

    def _variant(self, label: str, raw: Any) -> Variant:
        from lcplug.registry import get_registry

        spec = parse_plugin_spec("attention", raw)
        if spec.name in NOT_VARIANTS:
            raise ConflictError(
                f"{self.qualname()}: {label}={spec.name!r} is not a sparse variant; valid: any other attention "
                "variant (full layers come from ratio or full_layers, and a schedule does not nest)"
            )
        return Variant(label, get_registry().get("attention", spec.name).build(spec.params))

    # ---- the schedule ------------------------------------------------------------------------------------

    def plan(self, num_layers: int) -> list[Variant | None]:
        """Each layer's variant (None: the model's own full attention) for a model of `num_layers` layers."""
        p = self.params
        plan: list[Variant | None] = [None] * num_layers
        owner: dict[int, str] = {}
        for key, variant in self.pinned.items():
            for idx in select_layers(key, num_layers):
                if idx in owner:
                    raise SpecError(
                        f"{self.qualname()}: layer {idx} is pinned twice, by {owner[idx]!r} and {key!r}; "
                        "valid: pinned keys that select disjoint layers"
                    )
                owner[idx], plan[idx] = key, variant
        rest = [i for i in range(num_layers) if i not in owner]
        if p.full_layers is not None:
            full = set(select_layers(p.full_layers, num_layers))
            both = sorted(full & set(owner))
            if both:
                raise SpecError(
                    f"{self.qualname()}: full_layers names layer {both[0]}, which pinned[{owner[both[0]]}] also "
                    "assigns; valid: full layers outside the pinned ones"
                )
            sparse = [i for i in rest if i not in full]
        else:
            sparse = [rest[j] for j in select_layers(p.ratio, len(rest))]
        for n, idx in enumerate(sparse):
            plan[idx] = self.cycle[n % len(self.cycle)]
        return plan

    def check(self, model: Any, adapter: Adapter) -> None:
        num_layers = len(adapter.attention_modules(model))
        self.plan(num_layers)  # a bad ratio, layer list or pinned key raises SpecError naming it
        for variant in self.variants:
            variant.plugin.check(model, adapter)
        self._num_layers = num_layers

    def layer_attention(
        self, layer_idx: int, attn_module: nn.Module, adapter: Adapter, *, native_fn: Any, native_impl: str
    ) -> LayerAttention:
        variant = self.plan(self._num_layers)[layer_idx]
        if variant is None:
            return NativeAttention(native_fn, native_impl)
        return variant.plugin.layer_attention(
            layer_idx, attn_module, adapter, native_fn=native_fn, native_impl=native_impl
        )

    def manifest_state(self) -> dict[str, Any]:
        """The full layers; with several variants, each variant's layers; each variant's own state."""
        plan = self.plan(self._num_layers)
        state: dict[str, Any] = {"full_layers": [i for i, v in enumerate(plan) if v is None]}
        if len(self.variants) > 1:
            state["layers"] = {v.label: [i for i, w in enumerate(plan) if w is v] for v in self.variants}
        inner = {v.label: s for v in self.variants if (s := v.plugin.manifest_state())}
        return {**state, "variants": inner} if inner else state

    # ---- training ----------------------------------------------------------------------------------------

    def scopes(self, model: nn.Module) -> list[tuple[Variant, nn.Module]]:
        """Each variant with what its training hooks see: the model itself when it is the only variant (its
        hooks may then use the whole patch), else a `LayerScope` of its installed layers (variants without
        one are left out)."""
        if len(self.variants) == 1:
            return [(self.variants[0], model)]
        state = patch_state(model)
        if state is None or state.plugins.get("attention") is not self:
            raise UnsupportedModelError(f"{type(model).__name__} is not patched with this {self.qualname()} schedule")
        modules = state.adapter.attention_modules(model)
        plan = self.plan(len(modules))
        out = []
        for variant in self.variants:
            owned = [modules[i] for i in state.layers if plan[i] is variant]
            if owned:
                out.append((variant, LayerScope(owned)))
        return out

    def trainable_groups(self, model: nn.Module) -> dict[str, list[nn.Parameter]]:
        groups: dict[str, list[nn.Parameter]] = {}
        for variant, scope in self.scopes(model):
            for name, params in variant.plugin.trainable_groups(scope).items():
                group = groups.setdefault(name, [])
                seen = {id(p) for p in group}
                group.extend(p for p in params if id(p) not in seen)
        return groups

    def aux_losses(self) -> dict[str, Any]:
        losses: dict[str, Any] = {}
        offered_by: dict[str, str] = {}
        for variant in self.variants:
            for name, fn in variant.plugin.aux_losses().items():
                if name in losses and losses[name] is not fn:
                    raise ConflictError(
                        f"{self.qualname()}: {variant.label} ({variant.plugin.name}) and {offered_by[name]} both "
                        f"offer a loss {name!r}, computed differently, so a stage cannot name it; valid: variants "
                        "whose losses of one name are the same (csa and hca share 'distill')"
                    )
                losses[name] = fn
                offered_by.setdefault(name, f"{variant.label} ({variant.plugin.name})")
        return losses

    def prepare_training(self, model: nn.Module, losses: set[str]) -> None:
        for variant, scope in self.scopes(model):
            variant.plugin.prepare_training(scope, losses)

    def finalize(self, model: nn.Module) -> dict[str, Any] | None:
        """Each variant's finalize, so a calibration stage never ends silently unfinalized: loza's and duo's
        re-patch the whole model with themselves, so nested they refuse, naming the plugin they need."""
        spec = None
        for variant in self.variants:
            spec = variant.plugin.finalize(model) or spec
        return spec

    def restage(self, model: nn.Module, spec: dict[str, Any]) -> bool:
        """Re-patch with `spec` keeping the trained weights, if every layer keeps its variant; else False."""
        if spec.get("name") != self.name:
            return False
        new = type(self).build({k: v for k, v in spec.items() if k != "name"})
        num_layers = self._num_layers
        names = [None if v is None else v.plugin.name for v in self.plan(num_layers)]
        if [None if v is None else v.plugin.name for v in new.plan(num_layers)] != names:
            return False
        from lcplug.attention.gated import repatch_attention
        from lcplug.checkpoint import PLUGIN_PARAM_MARKER

        trained = {n: p.detach().clone() for n, p in model.named_parameters() if PLUGIN_PARAM_MARKER in n}
        repatch_attention(model, new)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in trained and trained[n].shape == p.shape:
                    p.copy_(trained[n])
        return True


@hookimpl
def lcplug_register(register):
    register(HybridAttention)
