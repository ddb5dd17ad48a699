"""The loss a stage optimises: the LM loss plus auxiliary losses the model's plugins offer, weighted by name.

A recipe names losses (`losses: {lm: 1.0, indexer_kl: 1.0}`); `lm` is the model's own next-token loss
and every other name must be offered by a plugin the model is patched with (`Plugin.aux_losses`: dsa
offers `indexer_kl`, duo in train mode `duo_l1`). Names are checked twice with the same function: from
the recipe's specs before anything loads, and against the patched model when a stage starts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..errors import did_you_mean
from ..plugin import Plugin
from .recipe import RecipeError

LM = "lm"
"""The model's own causal-LM loss (`outputs.loss`)."""

AuxLoss = Callable[[nn.Module], torch.Tensor]


def stage_losses(weights: Mapping[str, float], plugins: Iterable[Plugin], where: str) -> dict[str, AuxLoss]:
    """The auxiliary loss functions `weights` names; an unknown name lists what these plugins offer."""
    offered: dict[str, AuxLoss] = {}
    for plugin in plugins:
        offered.update(plugin.aux_losses())
    for name in weights:
        if name != LM and name not in offered:
            valid = [LM, *sorted(offered)]
            hint = did_you_mean(name, valid)
            close = f" ({hint})" if hint.startswith("did you mean") else ""
            raise RecipeError(
                f"{where}: unknown loss {name!r}; valid: {', '.join(valid)} (lm and what the model's plugins offer)"
                f"{close}"
            )
    return {name: offered[name] for name in weights if name != LM}


def check_loss_names(weights: Mapping[str, float], spec: Mapping[str, Any], where: str) -> None:
    """`stage_losses` against the plugins a spec names, before any model exists."""
    from ..registry import get_registry
    from ..spec import PatchSpec

    registry = get_registry()
    plugins = [registry.get(kind, ps.name).build(ps.params) for kind, ps in PatchSpec.build(dict(spec)).plugins.items()]
    stage_losses(weights, plugins, where)


def combine(
    outputs: Any, model: nn.Module, weights: Mapping[str, float], aux: Mapping[str, AuxLoss]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The weighted total and each term (unweighted, for the metrics) after one forward pass of `model`."""
    terms = {LM: outputs.loss} if LM in weights else {}
    terms.update({name: fn(model) for name, fn in aux.items()})
    device = next(iter(terms.values())).device
    total = sum((weights[name] * term.to(device) for name, term in terms.items()), torch.zeros((), device=device))
    return total, terms
