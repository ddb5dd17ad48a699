"""Stage boundaries: the patch a stage changes on entry, what it trains and on which losses, its finalize.

`enter` merges the stage's `patch:` over the spec in force and applies it: each plugin first gets to
take its own change in place (`Plugin.restage`, e.g. dsa warm-up -> sparse keeps the trained
indexers), otherwise the model is re-patched with `lcplug.patch` (transactional: a spec the model cannot
take fails with the model unchanged). `configure` selects the trainables, resolves the losses and lets
the plugins prepare (dsa switches on its indexer loss). The runner calls both on the real model, and
the pre-flight rehearses them on a meta-device copy, so a stage that cannot work fails before training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import LcplugError
from ..patching import patch, patch_state
from .losses import AuxLoss, stage_losses
from .recipe import RecipeError, StageConfig, merge_spec
from .trainables import Trainee, select_trainables


@dataclass
class StagePlan:
    """What one stage optimises: its trainable parameters by name and its auxiliary losses."""

    params: dict[str, nn.Parameter]
    aux: dict[str, AuxLoss]


def current_spec(model: nn.Module) -> dict[str, Any]:
    """The spec the model is patched with (`lcplug.patch`'s mapping form), empty if unpatched."""
    state = patch_state(model)
    return {} if state is None else dict(state.manifest["spec"])


def apply_spec(model: nn.Module, spec: dict[str, Any], where: str) -> None:
    """`lcplug.patch` with its one-line errors made recipe errors naming the field."""
    try:
        patch(model, spec)
    except LcplugError as exc:
        raise RecipeError(f"{where}: {exc}") from None


def enter(model: nn.Module, stage: StageConfig, where: str) -> None:
    """Apply the stage's patch change, in place where the plugins can, else by re-patching."""
    if not stage.patch:
        return
    spec = merge_spec(current_spec(model), stage.patch)
    state = patch_state(model)
    plugins = {} if state is None else state.plugins
    changed = [kind for kind in stage.patch if kind != "layers"]
    in_place = "layers" not in stage.patch and all(
        kind in plugins and kind in spec and plugins[kind].restage(model, spec[kind]) for kind in changed
    )
    if not in_place:
        apply_spec(model, spec, f"{where}.patch")


def configure(trainee: Trainee, stage: StageConfig, where: str) -> StagePlan:
    """Select the stage's trainables, resolve its losses and let the plugins prepare for them."""
    state = patch_state(trainee.model)
    plugins = [] if state is None else list(state.plugins.values())
    aux = stage_losses(stage.losses, plugins, f"{where}.losses")
    params = select_trainables(trainee, stage, where)
    for plugin in plugins:
        plugin.prepare_training(trainee.model, set(stage.losses))
    return StagePlan(params, aux)


def finalize(model: nn.Module) -> dict[str, Any] | None:
    """Call the plugins' finalize (loza: pick sparse layers; duo: threshold heads); the new spec, if any."""
    state = patch_state(model)
    spec = None
    for plugin in [] if state is None else list(state.plugins.values()):
        spec = plugin.finalize(model) or spec
    return spec
