"""The hook specifications: the whole pluggy surface of lcplug.

Hooks stay few. A distribution that ships plugins implements `lcplug_register` in a module named by an
entry point in the `lcplug` group; first-party plugins do exactly the same. The lifecycle hooks let a
plugin package observe or extend what lcplug does without patching it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

PROJECT = "lcplug"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def lcplug_register(register: Callable[[type], None]) -> None:
    """Register plugin classes and adapters.

    Call `register(cls)` once per class. `cls` derives from one of the kind bases in `lcplug.plugin`
    (AttentionPlugin, RopePlugin, CPPlugin, KVPlugin, DataPlugin) or from `lcplug.plugin.Adapter`.

        @hookimpl
        def lcplug_register(register):
            register(MyAttention)
    """


@hookspec
def lcplug_patched(model: Any, manifest: dict) -> None:
    """Called after `lcplug.patch` applied a spec to `model` (not called for a no-op re-patch)."""


@hookspec
def lcplug_unpatched(model: Any) -> None:
    """Called after `lcplug.unpatch` restored `model`."""


@hookspec
def lcplug_saved(model: Any, save_directory: str, manifest: dict) -> None:
    """Called after `lcplug.save_pretrained` wrote a patched checkpoint to `save_directory`."""


@hookspec
def lcplug_published(repo_id: str, revision: str | None, manifest: dict) -> None:
    """Called after `lcplug.publish` pushed a checkpoint to the Hub."""


@hookspec
def lcplug_model_card_sections(manifest: dict) -> list[tuple[str, str]]:
    """Return extra (heading, markdown) sections for the model card of a published checkpoint."""
