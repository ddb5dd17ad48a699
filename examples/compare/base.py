"""The retrieval-capable base the variants start from, trained once and cached under build/.

The shipped demo base never learned retrieval (0% passkey at 512 tokens), so a comparison of retrieval
on it would read 0% everywhere. recipes/compare-base.yaml continue-pretrains it at 256 tokens on a
passkey-heavy mixture with lcplug's runner; its `final/` is reused by every later run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lcplug.train import Recipe, train

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "compare-base.yaml"


def ensure_base() -> tuple[Path, dict[str, Any]]:
    """The base checkpoint directory and its training summary (passkey before/after training, seconds).

    Trains only when `<output.dir>/final` (build/compare/base/final) is missing.
    """
    raw = Recipe.from_yaml(RECIPE).to_dict()
    directory = ROOT / raw["output"]["dir"]
    summary_file = directory / "train_summary.json"
    if not (directory / "final").is_dir() or not summary_file.is_file():
        train(Recipe.from_dict(raw))
    return directory / "final", json.loads(summary_file.read_text())
