"""The model card (README.md) of a retrofitted checkpoint: what it is, how it was made, how to load it.

One writer serves the training runner (which writes the card into its `final/`) and `lcplug publish`
(which renders it from the checkpoint, the run's recipe and evaluation, and uploads it): metadata for
the Hub, the plugin stack with parameters, how to load it, the recipe and data mixture, the evaluation
table and plots. Plugins add sections through the `lcplug_model_card_sections` hook.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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
    meta: dict[str, Any] = {"library_name": "lcplug", "pipeline_tag": "text-generation", "tags": tags}
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


@dataclass(frozen=True)
class ModelCard:
    """A rendered card: the README.md text and the images it shows (file name beside the card -> local file).

    Rendering is separate from writing so `lcplug publish` can upload a card without touching the
    checkpoint directory, and the training runner can write the same card into its `final/`.
    """

    text: str
    images: dict[str, Path] = field(default_factory=dict)


def render_model_card(
    manifest: Mapping[str, Any] | None,
    *,
    title: str,
    base_model: str | None = None,
    license: str | None = None,
    recipe: Mapping[str, Any] | None = None,
    eval_results: Sequence[dict[str, Any]] = (),
    eval_dir: str | Path | None = None,
    load_ref: str = "<this repo or directory>",
    adapter: str | None = None,
) -> ModelCard:
    """The card of a checkpoint: metadata, plugin stack, how to load it, recipe and data mixture, evaluation.

    Without `eval_results`, the evaluation comes from `eval_dir/results.json` when there is one (what
    `lcplug eval --out` and the training runner write); the PNGs of `eval_dir` become the card's images.
    `load_ref` is the repo id or directory the loading snippets name; `adapter` is where a PEFT adapter
    sits beside the weights ("." for the top level), if any.
    """
    from .eval import model_card_section
    from .registry import get_registry

    if not eval_results and eval_dir is not None and (Path(eval_dir) / "results.json").is_file():
        eval_results = json.loads((Path(eval_dir) / "results.json").read_text())["models"]
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
        *how_to_load(load_ref, adapter),
    ]
    if recipe is not None:
        body += ["## Recipe", "", "```yaml", yaml.safe_dump(dict(recipe), sort_keys=False).rstrip(), "```", ""]
        mixture = (recipe.get("data") or {}).get("mixture")
        if mixture is not None:
            body += ["Training data mixture: `" + json.dumps(mixture) + "`", ""]
    images: dict[str, Path] = {}
    if eval_results:
        plots = {}
        if eval_dir is not None:
            for png in sorted(Path(eval_dir).glob("*.png")):
                images[png.name] = png
                plots[png.stem.removeprefix("heatmap_")] = png.name
        body.append(model_card_section(list(eval_results), plots=plots))
    for sections in get_registry().pm.hook.lcplug_model_card_sections(manifest=dict(manifest or {})):
        for heading, text in sections:
            body += [f"## {heading}", "", text.rstrip(), ""]
    return ModelCard("\n".join(body).rstrip() + "\n", images)


def how_to_load(load_ref: str, adapter: str | None) -> list[str]:
    """The "How to load" section: lcplug (patched), plain transformers (standard parts), and the adapter."""
    lines = [
        "## How to load",
        "",
        "```python",
        "import lcplug",
        "",
        f'model = lcplug.from_pretrained("{load_ref}")  # reinstalls the patches above',
        "```",
        "",
        "Plain transformers loads the weights and the standard RoPE parameters, with its own dense attention:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{load_ref}")',
        "```",
        "",
    ]
    if adapter is not None:
        subfolder = "" if adapter in ("", ".") else f', subfolder="{adapter}"'
        lines += [
            f"The PEFT adapter of the run is in `{adapter}`; put it on the model loaded above with "
            f'`peft.PeftModel.from_pretrained(model, "{load_ref}"{subfolder})`.',
            "",
        ]
    return lines


def write_model_card(directory: str | Path, manifest: Mapping[str, Any] | None, **card: Any) -> Path:
    """Write `directory/README.md` (see `render_model_card` for the arguments), its images copied beside it."""
    out = Path(directory)
    rendered = render_model_card(manifest, **card)
    for name, source in rendered.images.items():
        shutil.copy2(source, out / name)
    path = out / "README.md"
    path.write_text(rendered.text)
    return path
