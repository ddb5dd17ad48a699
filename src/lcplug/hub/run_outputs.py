"""What a training run leaves beside its `final/` checkpoint, so publishing `final/` carries it too.

`lcplug train` writes `<output.dir>/final/` (weights, config with the manifest), and beside it
`recipe.yaml`, `eval/` (results.json and the plots), `train_summary.json` and, if kept, `adapter/`.
Publishing `final/` picks these up for the card and the upload; any other directory has none.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..yamlfile import read_yaml
from .client import HubError


@dataclass(frozen=True)
class RunOutputs:
    recipe: dict[str, Any] | None = None
    eval_dir: Path | None = None
    adapter_dir: Path | None = None


def run_outputs(directory: Path) -> RunOutputs:
    """The run's recipe, evaluation and adapter when `directory` is a run's `final/`; else nothing."""
    out = directory.resolve().parent
    if directory.resolve().name != "final" or not (out / "train_summary.json").is_file():
        return RunOutputs()
    recipe = out / "recipe.yaml"
    return RunOutputs(
        recipe=read_yaml(recipe, what="run recipe", error=HubError) if recipe.is_file() else None,
        eval_dir=out / "eval" if (out / "eval" / "results.json").is_file() else None,
        adapter_dir=out / "adapter" if (out / "adapter" / "adapter_config.json").is_file() else None,
    )
