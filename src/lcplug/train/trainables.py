"""What a stage trains: every weight, LoRA adapters (PEFT), LoRA plus embeddings and norms, or a plugin's group.

`train: all` trains every parameter; `lora` trains LoRA adapters only; `lora+` also the input
embeddings and every normalisation layer, as LongLoRA found long-context adaptation needs;
`gates` / `indexer` / `sinks` / `latent` / `memory` / `compress` / `shared` train one group the model's plugins
offer (`Plugin.trainable_groups`: loza/duo/hysparse gates, the dsa indexer, learnable attention sinks, mla's
latent projections healing the conversion, engram's n-gram memory, the pooling weights of ksa/csa/hca/nsa,
hysparse's sparse layers learning to read their full layer's shared K/V).
Exactly the selected parameters require gradients afterwards, and a selection of nothing is an error
naming the stage, never a silent no-op.

The LoRA adapter is injected into the patched model in place (PEFT wraps it in a `PeftModel` for the
forward pass and saving), once per run: later LoRA stages keep training it, other stages leave it frozen,
and the final save merges it or writes it out as an adapter.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..patching import patch_state
from .recipe import LORA_MODES, LoraConfig, RecipeError, StageConfig


@dataclass
class Trainee:
    """The model being trained: the transformers model lcplug patches, and its PEFT wrapper once LoRA is on."""

    model: nn.Module
    peft: nn.Module | None = None
    lora: LoraConfig | None = None

    @property
    def module(self) -> nn.Module:
        """What the forward pass (and Accelerate) runs."""
        return self.peft if self.peft is not None else self.model


def attach_lora(trainee: Trainee, lora: LoraConfig, where: str) -> None:
    """Inject LoRA adapters into the model in place (once per run; the same config is kept)."""
    if trainee.peft is not None:
        return
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    config = PeftLoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules)
    )
    try:
        trainee.peft = get_peft_model(trainee.model, config)
    except ValueError as exc:
        raise RecipeError(f"{where}.lora.target_modules: {str(exc).splitlines()[0]}") from None
    trainee.lora = lora


def plugin_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Every trainable group the plugins of the patched model offer (groups of the same name are joined)."""
    state = patch_state(model)
    groups: dict[str, list[nn.Parameter]] = {}
    for plugin in [] if state is None else state.plugins.values():
        for name, params in plugin.trainable_groups(model).items():
            groups.setdefault(name, []).extend(params)
    return groups


def select_trainables(trainee: Trainee, stage: StageConfig, where: str) -> dict[str, nn.Parameter]:
    """Make exactly the stage's parameters require gradients; return them by `named_weights` name, in order."""
    model = trainee.model
    if stage.train in LORA_MODES:
        attach_lora(trainee, stage.lora, where)
        chosen = {id(p) for n, p in model.named_parameters() if ".lora_" in n}
        if stage.train == "lora+":
            chosen |= {id(p) for p in model.get_input_embeddings().parameters()}
            chosen |= {id(p) for module in norm_layers(model) for p in module.parameters()}
    elif stage.train == "all":
        chosen = {id(p) for p in model.parameters()}
    else:
        groups = plugin_groups(model)
        chosen = {id(p) for p in groups.get(stage.train, [])}
        if not chosen:
            offered = ", ".join(sorted(g for g, ps in groups.items() if ps)) or "none"
            raise RecipeError(
                f"{where}.train: stage {stage.name!r} trains no parameters: the model's plugins offer no "
                f"{stage.train!r} parameters (groups they offer: {offered})"
            )
    selected = {}
    for name, p in named_weights(model).items():
        p.requires_grad_(id(p) in chosen)
        if id(p) in chosen:
            selected[name] = p
    if not sum(p.numel() for p in selected.values()):
        raise RecipeError(f"{where}.train: stage {stage.name!r} ({stage.train}) trains no parameters")
    return selected


def norm_layers(model: nn.Module) -> list[nn.Module]:
    """The model's own normalisation layers (LayerNorm, RMSNorm, ...), not those inside lcplug's plugin modules."""
    return [
        module
        for name, module in model.named_modules()
        if "norm" in type(module).__name__.lower() and ".lcplug_" not in f".{name}" and not list(module.children())
    ]


def named_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The model's parameters by names that LoRA injection does not change (PEFT moves a targeted layer's
    weight to `<layer>.base_layer.weight`; here it stays `<layer>.weight`), so checkpoints name them stably."""
    return {name.replace(".base_layer.", "."): p for name, p in model.named_parameters()}
