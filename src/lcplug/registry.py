"""The plugin registry: one pluggy manager, entry-point discovery, lookup and listing.

Every plugin, first-party or third-party, arrives the same way: an entry point in the `lcplug` group
names a module whose `lcplug_register(register)` hook registers classes. Environment variables select
what is loaded, as pytest and llm allow:

- `LCPLUG_DISABLE_PLUGIN_AUTOLOAD=1`: load no entry points of other distributions (lcplug's own still load);
- `LCPLUG_PLUGINS=a,b`: load only these entry points or distributions (lcplug's own always load);
- `LCPLUG_DISABLE_PLUGINS=a,b`: skip these entry points or distributions (lcplug's own included).
"""

from __future__ import annotations

import functools
import importlib.metadata as md
import os
import re
import sys
import threading
import warnings
from types import ModuleType

import pluggy

from . import hookspecs
from .errors import DuplicatePluginError, LcplugError, UnknownPluginError, did_you_mean
from .plugin import KIND_BASES, Adapter, Origin, Plugin

ENTRY_POINT_GROUP = "lcplug"
SELF_DISTRIBUTION = "lcplug"


def _norm(name: str) -> str:
    """Distribution names compare as pip does: case-insensitive, runs of -_. equal."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _env_list(name: str) -> set[str] | None:
    raw = os.environ.get(name)
    if raw is None:
        return None
    return {_norm(item.strip()) for item in raw.split(",") if item.strip()}


class Registry:
    """Plugin classes by (kind, name), each with its origin; loaded lazily from entry points."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self._classes: dict[tuple[str, str], type[Plugin]] = {}
        self._loaded = False
        self._lock = threading.RLock()
        self.skipped: list[tuple[str, str]] = []  # (entry point, reason): what env vars or errors kept out
        self.failed: dict[str, str] = {}  # entry point -> why it failed to load

    # ---- loading -------------------------------------------------------------------------------------
    def load(self) -> None:
        with self._lock:
            if self._loaded:
                return
            self._loaded = True
            only = _env_list("LCPLUG_PLUGINS")
            disabled = _env_list("LCPLUG_DISABLE_PLUGINS") or set()
            no_autoload = os.environ.get("LCPLUG_DISABLE_PLUGIN_AUTOLOAD", "").lower() in ("1", "true", "yes")
            for ep in sorted(
                md.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: (e.dist.name != SELF_DISTRIBUTION, e.name)
            ):
                dist = ep.dist.name if ep.dist else "unknown"
                first_party = dist == SELF_DISTRIBUTION
                names = {_norm(ep.name), _norm(dist)}
                if names & disabled:
                    self.skipped.append((ep.name, "LCPLUG_DISABLE_PLUGINS"))
                    continue
                if not first_party and no_autoload:
                    self.skipped.append((ep.name, "LCPLUG_DISABLE_PLUGIN_AUTOLOAD"))
                    continue
                if not first_party and only is not None and not names & only:
                    self.skipped.append((ep.name, "LCPLUG_PLUGINS"))
                    continue
                try:
                    module = ep.load()
                    origin = Origin(dist, ep.dist.version if ep.dist else "0", ep.value)
                    self._register_module(module, origin, plugin_name=f"{dist}:{ep.name}")
                except DuplicatePluginError:
                    raise
                except Exception as exc:  # one broken plugin must not take the others down, nor vanish silently
                    reason = f"failed to load: {type(exc).__name__}: {exc}"
                    self.skipped.append((ep.name, reason))
                    self.failed[ep.name] = reason
                    warnings.warn(f"lcplug: entry point {ep.name!r} of {dist} {reason}", stacklevel=2)

    def register_module(self, module: ModuleType | object, distribution: str = "local", version: str = "0") -> None:
        """Register a module (or object) implementing `lcplug_register` by hand, e.g. in a notebook or test."""
        self.load()
        name = f"{distribution}:{getattr(module, '__name__', type(module).__name__)}"
        self._register_module(module, Origin(distribution, version, getattr(module, "__name__", "")), name)

    def _register_module(self, module: object, origin: Origin, plugin_name: str) -> None:
        if self.pm.is_registered(module):
            return
        self.pm.register(module, name=plugin_name)
        for impl in self.pm.hook.lcplug_register.get_hookimpls():
            if impl.plugin is module:
                impl.function(register=functools.partial(self._register_class, origin=origin))

    def _register_class(self, cls: type, origin: Origin) -> None:
        if not isinstance(cls, type) or not issubclass(cls, Plugin):
            raise LcplugError(f"{origin}: register() takes a Plugin or Adapter subclass, got {cls!r}")
        kind = getattr(cls, "kind", None)
        if kind not in KIND_BASES:
            raise LcplugError(
                f"{origin}: plugin {cls.__name__} has kind {kind!r}; valid kinds: {', '.join(KIND_BASES)}"
            )
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise LcplugError(f"{origin}: plugin {cls.__name__} has no name")
        key = (kind, name)
        if key in self._classes and self._classes[key] is not cls:
            other = self._classes[key].origin
            raise DuplicatePluginError(
                f"two distributions register {kind} plugin {name!r}: {other.distribution} {other.version} "
                f"and {origin.distribution} {origin.version}; uninstall one or disable it with LCPLUG_DISABLE_PLUGINS"
            )
        cls.origin = origin
        self._classes[key] = cls

    # ---- lookup --------------------------------------------------------------------------------------
    def get(self, kind: str, name: str) -> type[Plugin]:
        self.load()
        if kind not in KIND_BASES:
            raise LcplugError(f"unknown plugin kind {kind!r}; {did_you_mean(kind, KIND_BASES)}")
        try:
            return self._classes[(kind, name)]
        except KeyError:
            err = UnknownPluginError(kind, name, self.names(kind))
            if self.failed:
                broken = "; ".join(f"{ep} {why}" for ep, why in self.failed.items())
                err.args = (f"{err.args[0]} [note: {broken}]",)
            raise err from None

    def names(self, kind: str) -> list[str]:
        self.load()
        return sorted(n for k, n in self._classes if k == kind)

    def plugins(self, kind: str | None = None) -> list[type[Plugin]]:
        self.load()
        return [cls for (k, _), cls in sorted(self._classes.items()) if kind is None or k == kind]

    def adapters(self) -> list[type[Adapter]]:
        return sorted(self.plugins("adapter"), key=lambda c: -c.priority)  # type: ignore[misc]

    def unregister(self, kind: str, name: str) -> None:
        """Forget one class (tests and notebooks that register by hand clean up with this)."""
        self._classes.pop((kind, name), None)

    def unregister_module(self, module: object) -> None:
        """Forget a module registered with `register_module` and every class it registered."""
        for key, cls in list(self._classes.items()):
            if sys.modules.get(cls.__module__) is module or getattr(cls, "_lcplug_module", None) is module:
                del self._classes[key]
        if self.pm.is_registered(module):
            self.pm.unregister(module)

    @property
    def hook(self) -> pluggy.HookRelay:
        self.load()
        return self.pm.hook

    def call_hook(self, name: str, **kwargs: object) -> list:
        return getattr(self.hook, name)(**kwargs)


_registry: Registry | None = None
_registry_lock = threading.Lock()


def get_registry() -> Registry:
    """The process-wide registry, loaded on first use."""
    global _registry
    with _registry_lock:
        if _registry is None:
            _registry = Registry()
    _registry.load()
    return _registry


def reset_registry() -> None:
    """Drop the registry so the next use reloads entry points (after changing LCPLUG_* variables)."""
    global _registry
    with _registry_lock:
        _registry = None


def plugin_rows(kind: str | None = None, registry: Registry | None = None) -> list[dict]:
    """One JSON-ready row per registered plugin: what `lcplug plugins` prints."""
    reg = registry or get_registry()
    rows = []
    for cls in reg.plugins(kind):
        rows.append(
            {
                "name": cls.name,
                "kind": cls.kind,
                "origin": cls.origin.distribution,
                "version": cls.origin.version,
                "summary": cls.summary(),
                "params": cls.Params.describe(),
            }
        )
    return rows
