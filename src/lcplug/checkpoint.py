"""Save a patched model with its manifest, and load a checkpoint back patched.

`save_pretrained` is transformers' own (the manifest lives in `config.lcplug`, so config.json carries
it; parameters plugins add are ordinary weights in the safetensors files). `from_pretrained` loads with
plain transformers, puts back the base values, re-applies the manifest's spec, then loads the plugin
parameters that plain transformers does not know about from the same safetensors files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from .errors import ManifestError
from .manifest import check_available, read_manifest, rebase
from .patching import patch, patch_state

PLUGIN_PARAM_MARKER = ".lcplug_"
"""Weights whose names contain this belong to plugins (e.g. `...self_attn.lcplug_attention.sink_logit`)."""


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, **kwargs: Any) -> Path:
    """`model.save_pretrained` plus the `lcplug_saved` hook; the manifest travels in config.json."""
    from .registry import get_registry

    model.save_pretrained(save_directory, **kwargs)
    state = patch_state(model)
    if state is not None:
        get_registry().hook.lcplug_saved(model=model, save_directory=str(save_directory), manifest=state.manifest)
    return Path(save_directory)


def resolve_checkpoint(
    path_or_repo: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """A local directory, or a Hub repo id downloaded with huggingface_hub (manifest checked first)."""
    path = Path(path_or_repo)
    if path.is_dir():
        return path
    if path.exists():
        raise ManifestError(f"{str(path)!r} is a file; expected a checkpoint directory or a Hub repo id")
    from .hub import download

    return download(str(path_or_repo), revision=revision, token=token, cache_dir=cache_dir)


def from_pretrained(
    path_or_repo: str | os.PathLike,
    *,
    model_cls: Any = None,
    revision: str | None = None,
    token: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Load a checkpoint with transformers and re-install the patches its manifest records.

    `path_or_repo` is a directory or a Hub repo id (downloaded at `revision` with `token`, huggingface_hub's
    usual sources by default, into `cache_dir`); `kwargs` go to transformers' `from_pretrained`. A
    checkpoint without a manifest loads as a plain model. A missing plugin, or a manifest from a newer
    major lcplug, fails before any weight is read (for a repo, before the weights are downloaded).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = resolve_checkpoint(path_or_repo, revision=revision, token=token, cache_dir=cache_dir)
    config = AutoConfig.from_pretrained(directory)
    manifest = read_manifest(config)
    if manifest is not None:
        check_available(manifest)
    model = (model_cls or AutoModelForCausalLM).from_pretrained(directory, **kwargs)
    if manifest is None:
        return model
    text_config = model.config.get_text_config()
    rebase(text_config, manifest)
    del model.config.lcplug
    patch(model, dict(manifest.spec))
    load_plugin_weights(model, directory)
    return model


def load_plugin_weights(model: nn.Module, directory: Path) -> list[str]:
    """Copy plugin parameters from the checkpoint's safetensors files into the patched model."""
    wanted = {name: t for name, t in model.state_dict().items() if PLUGIN_PARAM_MARKER in name}
    if not wanted:
        return []
    found: dict[str, torch.Tensor] = {}
    for file in _safetensors_files(directory):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                if key in wanted:
                    found[key] = f.get_tensor(key)
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise ManifestError(
            f"checkpoint {str(directory)!r} lacks plugin weights {missing[:3]}{'...' if len(missing) > 3 else ''}; "
            "was it saved after patching?"
        )
    with torch.no_grad():
        for key, tensor in found.items():
            wanted[key].copy_(tensor.to(wanted[key].dtype))
    return sorted(found)


def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / n for n in names]
    return sorted(directory.glob("*.safetensors"))
