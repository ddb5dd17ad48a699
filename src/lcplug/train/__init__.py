"""Retrofit training: a YAML recipe run end to end under Accelerate, stage by stage, resumable.

    from lcplug.train import Recipe, train
    summary = train("recipes/demo.yaml")                 # or train(Recipe.from_dict({...}))
    summary = train("recipes/demo.yaml", resume="auto")  # continue from the newest checkpoint

From the shell: `lcplug train RECIPE.yaml [--resume auto|PATH] [--max-steps N]`, and on several processes
`accelerate launch [--config_file ...] -m lcplug train RECIPE.yaml`. See docs/train.md.
"""

from __future__ import annotations

from .recipe import (
    BaseModel,
    CPConfig,
    EvalConfig,
    LoraConfig,
    OutputConfig,
    PublishConfig,
    Recipe,
    RecipeError,
    Schedule,
    StageConfig,
)
from .runner import train

__all__ = [
    "BaseModel",
    "CPConfig",
    "EvalConfig",
    "LoraConfig",
    "OutputConfig",
    "PublishConfig",
    "Recipe",
    "RecipeError",
    "Schedule",
    "StageConfig",
    "train",
]
