"""The model card (README.md) of a retrofitted checkpoint: what it is, how it was made, how to load it.

A checkpoint saved by a training run is Hub-ready: weights, config with the manifest, and this card
(metadata for the Hub, the plugin stack with parameters, the recipe and data mixture, the evaluation
table and plots, how to load it). Plugins add sections through the `lcplug_model_card_sections` hook.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from ._version import __version__


def metadata(manifest: Mapping[str, Any] | None, *, base_model: str | None, license: str | None) -> dict[str, Any]:
    """The card's YAML header: base_model, library_name, tags (lcplug and each plugin), license, pipeline tag."""
    tags = ["lcplug", "long-context"]
    for kind, spec in (manifest or {}).get("spec", {}).items():
        if isinstance(spec, Mapping) and "name" in spec:
            tags.append(f"lcplug-{kind}-{spec['name']}")
    meta: dict[str, Any] = {"library_name": "transformers", "pipeline_tag": "text-generation", "tags": tags}
    if base_model:
        meta["base_model"] = base_model
    if license:
        meta["license"] = license
    return meta


def plugin_stack(manifest: Mapping[str, Any] | None) -> str:
    """The patches the checkpoint needs, kind by kind with every parameter, as a Markdown list."""
    if not manifest:
        return "No lcplug patches: this checkpoint loads in plain transformers.\n"
    lines = []
    for kind, spec in manifest.get("spec", {}).items():
        lines.append(f"- **{kind}**: `{json.dumps(spec, sort_keys=True)}`")
    return "\n".join(lines) + "\n"


def write_model_card(
    directory: str | Path,
    manifest: Mapping[str, Any] | None,
    *,
    title: str,
    base_model: str | None = None,
    license: str | None = None,
    recipe: Mapping[str, Any] | None = None,
    eval_results: Sequence[dict[str, Any]] = (),
    eval_dir: str | Path | None = None,
) -> Path:
    """Write `directory/README.md`; the PNGs of `eval_dir` are copied beside it so the card shows them."""
    from .eval import model_card_section
    from .registry import get_registry

    out = Path(directory)
    header = yaml.safe_dump(metadata(manifest, base_model=base_model, license=license), sort_keys=False)
    body = [f"---\n{header}---", f"# {title}", ""]
    body += [
        f"A long-context retrofit made with [lcplug](https://github.com/lcplug/lcplug) {__version__}.",
        "",
        "> The sparse attention and other runtime patches need lcplug: plain transformers loads the weights",
        "> and the standard RoPE parameters, but runs dense attention.",
        "",
        "## Plugin stack",
        "",
        plugin_stack(manifest),
        "## How to load",
        "",
        "```python",
        "import lcplug",
        "",
        'model = lcplug.from_pretrained("<this repo or directory>")  # reinstalls the patches above',
        "```",
        "",
    ]
    if recipe is not None:
        body += ["## Recipe", "", "```yaml", yaml.safe_dump(dict(recipe), sort_keys=False).rstrip(), "```", ""]
        mixture = (recipe.get("data") or {}).get("mixture")
        if mixture is not None:
            body += ["Training data mixture: `" + json.dumps(mixture) + "`", ""]
    if eval_results:
        plots = {}
        if eval_dir is not None:
            for png in sorted(Path(eval_dir).glob("*.png")):
                shutil.copy2(png, out / png.name)
                key = png.stem.removeprefix("heatmap_")
                plots[key] = png.name
        body.append(model_card_section(list(eval_results), plots=plots))
    for sections in get_registry().pm.hook.lcplug_model_card_sections(manifest=dict(manifest or {})):
        for heading, text in sections:
            body += [f"## {heading}", "", text.rstrip(), ""]
    path = out / "README.md"
    path.write_text("\n".join(body).rstrip() + "\n")
    return path
