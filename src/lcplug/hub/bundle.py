"""What a publish uploads: the files of a checkpoint directory that belong on the Hub, plus the card.

An allow-list, not "everything in the folder": a checkpoint directory can hold optimizer states,
logs or a stray token file, and none of that should reach a public repo. Uploaded are the safetensors
weights (with their index), a PEFT adapter (at the top level, or a training run's `adapter/` as
`adapter/`), config.json (which carries the manifest), generation_config.json, the tokenizer files,
and a freshly rendered README.md with the images it shows. Everything else is listed as left out.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd

from ..card import render_model_card
from ..yamlfile import read_yaml
from .client import REPO_ID, HubError
from .run_outputs import run_outputs

KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("adapter", ("adapter_config.json", "adapter_model.safetensors")),
    ("weights", ("*.safetensors", "*.safetensors.index.json")),
    ("config", ("config.json", "generation_config.json")),
    (
        "tokenizer",
        (
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "added_tokens.json",
            "tokenizer.model",
            "spiece.model",
            "vocab.json",
            "vocab.txt",
            "merges.txt",
            "chat_template.jinja",
            "chat_template.json",
        ),
    ),
)
"""(kind, file-name patterns) of the top-level files a publish uploads; the first matching kind wins."""


@dataclass(frozen=True)
class Upload:
    """One file of the upload: its path in the repo, what it is, and its content (a local file or bytes)."""

    path_in_repo: str
    kind: str
    source: Path | bytes

    @property
    def size(self) -> int:
        return len(self.source) if isinstance(self.source, bytes) else self.source.stat().st_size


@dataclass(frozen=True)
class Bundle:
    """The upload of one checkpoint directory, ready to list (dry run) or commit."""

    directory: Path
    uploads: list[Upload]
    left_out: list[str] = field(default_factory=list)
    manifest: dict[str, Any] | None = None

    def operations(self) -> list[CommitOperationAdd]:
        """Fresh commit operations (huggingface_hub mutates them while uploading, so never reuse a list)."""
        return [CommitOperationAdd(u.path_in_repo, u.source) for u in self.uploads]

    @property
    def total_size(self) -> int:
        return sum(u.size for u in self.uploads)

    def table(self) -> str:
        """The file list with kinds and sizes, then what is left out: what a dry run prints."""
        width = max(len(u.path_in_repo) for u in self.uploads)
        lines = [f"{u.path_in_repo:<{width}}  {u.kind:<9}  {human_size(u.size):>9}" for u in self.uploads]
        lines.append(f"{len(self.uploads)} files, {human_size(self.total_size)}")
        if self.left_out:
            lines.append("not uploaded: " + ", ".join(self.left_out))
        return "\n".join(lines)


def human_size(size: int) -> str:
    units = ("B", "KiB", "MiB", "GiB")
    power = 0
    while power < len(units) - 1 and size >= 1024 ** (power + 1):
        power += 1
    return f"{size} B" if power == 0 else f"{size / 1024**power:.1f} {units[power]}"


def kind_of(name: str) -> str | None:
    """The kind of a top-level file name, or None for a file a publish leaves out."""
    for kind, patterns in KINDS:
        if any(fnmatch.fnmatch(name, p) for p in patterns):
            return kind
    return None


def build_bundle(
    directory: str | Path,
    repo_id: str,
    *,
    base_model: str | None = None,
    license: str | None = None,
    recipe: str | Path | Mapping[str, Any] | None = None,
    eval_dir: str | Path | None = None,
) -> Bundle:
    """Select the files of `directory` and render its card. Fails if there is nothing loadable to publish."""
    directory = Path(directory)
    if not directory.is_dir():
        raise HubError(f"{str(directory)!r} is not a directory; expected one saved with lcplug.save_pretrained")
    run = run_outputs(directory)
    uploads, left_out = [], []
    for path in sorted(directory.iterdir()):
        kind = kind_of(path.name) if path.is_file() else None
        if kind is None:
            left_out.append(path.name + ("/" if path.is_dir() else ""))
        else:
            uploads.append(Upload(path.name, kind, path))
    names = {u.path_in_repo for u in uploads}
    adapter = "." if "adapter_config.json" in names else None
    if run.adapter_dir is not None and adapter is None:
        adapter = "adapter"
        uploads += [
            Upload(f"adapter/{p.name}", "adapter", p)
            for p in sorted(run.adapter_dir.iterdir())
            if p.is_file() and kind_of(p.name) == "adapter"
        ]
    _check_loadable(directory, names)
    config = json.loads((directory / "config.json").read_text()) if "config.json" in names else {}
    manifest = config.get("lcplug")
    recipe = _recipe(recipe) if recipe is not None else run.recipe
    card = render_model_card(
        manifest,
        title=repo_id.split("/")[-1],
        base_model=base_model or _base_model(recipe, directory),
        license=license,
        recipe=recipe,
        eval_dir=eval_dir if eval_dir is not None else run.eval_dir,
        load_ref=repo_id,
        adapter=adapter,
    )
    uploads.append(Upload("README.md", "card", card.text.encode()))
    uploads += [Upload(name, "image", path) for name, path in card.images.items()]
    return Bundle(directory, uploads, left_out, manifest)


def _check_loadable(directory: Path, names: set[str]) -> None:
    model = "config.json" in names and any(kind_of(n) == "weights" and n.endswith(".safetensors") for n in names)
    adapter = {"adapter_config.json", "adapter_model.safetensors"} <= names
    if not (model or adapter):
        raise HubError(
            f"{str(directory)!r} holds no checkpoint to publish: expected config.json with *.safetensors weights "
            "(lcplug.save_pretrained) and/or adapter_config.json with adapter_model.safetensors (PEFT); "
            f"found {', '.join(sorted(p.name for p in directory.iterdir())) or 'nothing'}"
        )


def _recipe(recipe: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(recipe, Mapping):
        return dict(recipe)
    data = read_yaml(recipe, what="recipe", error=HubError)
    if not isinstance(data, Mapping):
        raise HubError(f"recipe {str(recipe)!r} must hold a mapping (a retrofit recipe), got {type(data).__name__}")
    return dict(data)


def _base_model(recipe: Mapping[str, Any] | None, directory: Path) -> str | None:
    """The Hub id of the base model, from the recipe or the adapter config, if it is one (not a local path)."""
    candidates = [((recipe or {}).get("base") or {}).get("model")]
    adapter_config = directory / "adapter_config.json"
    if adapter_config.is_file():
        candidates.append(json.loads(adapter_config.read_text()).get("base_model_name_or_path"))
    for value in candidates:
        if isinstance(value, str) and REPO_ID.fullmatch(value) and not Path(value).exists():
            return value
    return None
