"""Transactional, per-instance patching.

`Transaction` is an undo log of instance-level changes (attributes, buffers, submodules, config
values, calls with an inverse). The patch engine validates everything first, then applies plugins in a
fixed order inside one transaction; any failure rolls the log back, so a model is either patched whole
or left bit-identical. Nothing here touches a class: every change lands on one object.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

_ABSENT = object()


class Transaction:
    """Record each change with its inverse; `rollback` undoes them in reverse order."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def setattr(self, obj: Any, name: str, value: Any) -> None:
        """Set `obj.name` (attribute, buffer, parameter or config value) and remember the old value."""
        old = _get_own(obj, name)
        saved = copy.deepcopy(old) if isinstance(old, (dict, list)) else old
        setattr(obj, name, value)

        def undo() -> None:
            if saved is _ABSENT:
                if _get_own(obj, name) is not _ABSENT:
                    delattr(obj, name)
            else:
                setattr(obj, name, saved)

        self._undo.append(undo)

    def add_module(self, parent: nn.Module, name: str, module: nn.Module) -> None:
        if name in parent._modules:
            raise RuntimeError(f"{type(parent).__name__} already has a submodule {name!r}")
        parent.add_module(name, module)
        self._undo.append(lambda: delattr(parent, name))

    def call(self, do: Callable[[], Any], undo: Callable[[], Any]) -> Any:
        """Run `do` now and `undo` on rollback."""
        result = do()
        self._undo.append(undo)
        return result

    def rollback(self) -> None:
        errors = []
        while self._undo:
            try:
                self._undo.pop()()
            except Exception as exc:  # keep undoing the rest; report the first failure
                errors.append(exc)
        if errors:
            raise errors[0]

    def __len__(self) -> int:
        return len(self._undo)


def _get_own(obj: Any, name: str) -> Any:
    """The value `obj` holds itself under `name` (instance dict, module buffers/params/submodules)."""
    if isinstance(obj, nn.Module):
        for store in (obj._parameters, obj._buffers, obj._modules):
            if name in store:
                return store[name]
    d = getattr(obj, "__dict__", {})
    return d.get(name, _ABSENT)


@dataclass
class PatchContext:
    """What a plugin's `install` sees: the model, its adapter, the layers chosen, the transaction."""

    model: nn.Module
    adapter: Any
    config: Any
    layers: list[int]
    txn: Transaction
    plugins: dict[str, Any]
    manifest_state: dict[str, Any] = field(default_factory=dict)


# ---- the patch engine -------------------------------------------------------------------------------

INSTALL_ORDER = ("rope", "attention", "kv", "cp", "data")
"""Fixed order: positions first (attention patterns may depend on them), then attention, cache, parallelism."""

STATE_ATTR = "_lcplug_state"


@dataclass
class PatchState:
    """What one patched instance remembers: the validated plugins, its undo log and its manifest."""

    key: tuple
    spec: Any
    plugins: dict[str, Any]
    adapter: Any
    layers: list[int]
    txn: Transaction
    manifest: dict[str, Any]


def patch_state(model: nn.Module) -> PatchState | None:
    """The instance's patch state, or None if it is not patched."""
    return model.__dict__.get(STATE_ATTR)


def choose_adapter(model: nn.Module) -> Any:
    """The highest-priority adapter that matches and supports `model`, else a clear error naming what is missing."""
    from .errors import UnsupportedModelError
    from .registry import get_registry

    reasons = []
    for cls in get_registry().adapters():
        adapter = cls()
        missing = adapter.missing(model)
        if adapter.matches(model) and not missing:
            return adapter
        reasons.append(f"the {cls.name} adapter needs {'; '.join(missing) or 'a model of its family'}")
    detail = "; ".join(reasons) or "no adapter is installed"
    raise UnsupportedModelError(f"{type(model).__name__} is not supported: {detail}")


def resolve(model: nn.Module, spec: Any) -> tuple[Any, dict[str, Any], list[int]]:
    """Validate a PatchSpec against `model` without changing anything: adapter, plugin instances, layers."""
    from .layers import select_layers
    from .registry import get_registry

    registry = get_registry()
    adapter = choose_adapter(model)
    plugins = {kind: registry.get(kind, ps.name).build(ps.params) for kind, ps in spec.plugins.items()}
    num_layers = len(adapter.attention_modules(model))
    layers = select_layers(spec.layers, num_layers)
    for plugin in plugins.values():
        plugin.check_compatible(plugins)
    for plugin in plugins.values():
        plugin.check(model, adapter)
    return adapter, plugins, layers


def _identity(plugins: dict[str, Any], layers: list[int]) -> tuple:
    import json

    entries = [
        (kind, plugins[kind].name, json.dumps(plugins[kind].params.to_dict(), sort_keys=True))
        for kind in INSTALL_ORDER
        if kind in plugins
    ]
    return (*entries, tuple(layers))


def patch(
    model: nn.Module,
    spec: Any = None,
    *,
    attention: Any = None,
    rope: Any = None,
    kv: Any = None,
    cp: Any = None,
    data: Any = None,
    layers: Any = None,
) -> nn.Module:
    """Install plugins on this model instance and return it; see `lcplug.patch`."""
    from .spec import PatchSpec

    pspec = PatchSpec.build(spec, attention=attention, rope=rope, kv=kv, cp=cp, data=data, layers=layers)
    adapter, plugins, layer_list = resolve(model, pspec)
    key = _identity(plugins, layer_list)
    state = patch_state(model)
    if state is not None and state.key == key:
        return model
    previous = state
    if previous is not None:
        unpatch(model)
    try:
        _apply(model, pspec, adapter, plugins, layer_list, key)
    except BaseException:
        if previous is not None:
            _apply(model, previous.spec, previous.adapter, previous.plugins, previous.layers, previous.key)
        raise
    return model


def _apply(model, pspec, adapter, plugins, layer_list, key) -> None:
    from .manifest import build_manifest
    from .registry import get_registry

    txn = Transaction()
    config = adapter.text_config(model)
    ctx = PatchContext(model=model, adapter=adapter, config=config, layers=layer_list, txn=txn, plugins=plugins)
    base = _base_of(config)
    try:
        for kind in INSTALL_ORDER:
            if kind in plugins:
                plugins[kind].install(ctx)
        manifest = build_manifest(plugins, layer_list, base)
        txn.setattr(model.config, "lcplug", manifest)
    except BaseException:
        txn.rollback()
        raise
    model.__dict__[STATE_ATTR] = PatchState(key, pspec, plugins, adapter, layer_list, txn, manifest)
    get_registry().hook.lcplug_patched(model=model, manifest=manifest)


def _base_of(config: Any) -> dict[str, Any]:
    """The values a patch may change and a reload must start from."""
    base: dict[str, Any] = {"max_position_embeddings": getattr(config, "max_position_embeddings", None)}
    if getattr(config, "rope_parameters", None):
        base["rope_parameters"] = copy.deepcopy(dict(config.rope_parameters))
    return base


def unpatch(model: nn.Module) -> nn.Module:
    """Undo every change lcplug made to this instance; behaviour is bit-identical to before `patch`."""
    from .registry import get_registry

    state = model.__dict__.pop(STATE_ATTR, None)
    if state is None:
        return model
    state.txn.rollback()
    get_registry().hook.lcplug_unpatched(model=model)
    return model
