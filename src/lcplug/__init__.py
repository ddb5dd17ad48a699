"""lcplug: give any pretrained Hugging Face causal LM a long context, one instance at a time.

import lcplug
lcplug.patch(model, attention="sliding-window:window=4096,sinks=4", rope="yarn:factor=8")
lcplug.save_pretrained(model, "out/")          # config.json carries the manifest
model = lcplug.from_pretrained("out/")          # reloads patched
lcplug.unpatch(model)                           # bit-identical to before
lcplug.publish("out/", "me/model-32k")          # to the Hub, with a model card; from_pretrained reloads it
"""

from __future__ import annotations

from ._version import __version__
from .checkpoint import from_pretrained, save_pretrained
from .errors import (
    ConflictError,
    DuplicatePluginError,
    LcplugError,
    ManifestError,
    ParamError,
    SpecError,
    UnknownPluginError,
    UnsupportedModelError,
)
from .hookspecs import hookimpl
from .hub import HubError, publish
from .params import Params, param
from .patching import patch, patch_state, unpatch
from .plugin import Adapter, AttentionPlugin, CPPlugin, DataPlugin, KVPlugin, RopePlugin
from .registry import get_registry, plugin_rows


def list_plugins(kind: str | None = None) -> list[dict]:
    """Every installed plugin (optionally of one kind): name, kind, origin, version, params.

    (Not `lcplug.plugins`: that name is the first-party plugin package.)
    """
    return plugin_rows(kind)


def manifest_of(model) -> dict | None:
    """The manifest of a patched model (what `config.lcplug` holds), or None.

    (Not `lcplug.manifest`: that name is the manifest module.)
    """
    state = patch_state(model)
    return None if state is None else state.manifest


__all__ = [
    "Adapter",
    "AttentionPlugin",
    "CPPlugin",
    "ConflictError",
    "DataPlugin",
    "DuplicatePluginError",
    "HubError",
    "KVPlugin",
    "LcplugError",
    "ManifestError",
    "ParamError",
    "Params",
    "RopePlugin",
    "SpecError",
    "UnknownPluginError",
    "UnsupportedModelError",
    "__version__",
    "from_pretrained",
    "get_registry",
    "hookimpl",
    "list_plugins",
    "manifest_of",
    "param",
    "patch",
    "publish",
    "save_pretrained",
    "unpatch",
]
