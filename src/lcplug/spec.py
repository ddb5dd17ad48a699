"""Patch specs and the manifest.

A spec says which plugin of each kind to install, with which params, on which layers. Users write it
as a compact string (`"yarn:factor=8,original_max_position_embeddings=4096"`), a dict
(`{"name": "yarn", "factor": 8}`), or one mapping/YAML file holding all kinds. `PatchSpec` is the
normal form; `Manifest` is what `config.lcplug` records so that a saved checkpoint reloads patched.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ManifestError, SpecError
from .plugin import KINDS

MANIFEST_VERSION = 1


@dataclass(frozen=True)
class PluginSpec:
    """One plugin by name, with raw (not yet validated) params."""

    kind: str
    name: str
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **self.params}

    def __str__(self) -> str:
        if not self.params:
            return self.name
        return self.name + ":" + ",".join(f"{k}={_fmt(v)}" for k, v in self.params.items())


def _fmt(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(_fmt(v) for v in value)
    return str(value)


_PARAM_RE = re.compile(r"\s*([A-Za-z_][\w\-]*)\s*=\s*")


def parse_plugin_spec(kind: str, raw: Any) -> PluginSpec:
    """Normalise one kind's spec: `"name"`, `"name:k=v,k2=v2"`, `{"name": ..., **params}`, or a PluginSpec.

    List values in the compact form are written with spaces (`"longrope:short_factor=1 1.2 1.5"`);
    values stay strings here and are typed by the plugin's Params.
    """
    if isinstance(raw, PluginSpec):
        return raw
    if isinstance(raw, str):
        name, _, rest = raw.strip().partition(":")
        name = name.strip()
        if not name:
            raise SpecError(f"empty {kind} spec {raw!r}; expected 'name' or 'name:param=value,...'")
        params: dict[str, Any] = {}
        rest = rest.strip()
        while rest:
            m = _PARAM_RE.match(rest)
            if not m:
                raise SpecError(
                    f"{kind} spec {raw!r}: cannot parse {rest!r}; expected param=value pairs separated by commas"
                )
            key = m.group(1).replace("-", "_")
            rest = rest[m.end() :]
            nxt = _PARAM_RE.search(rest)
            # a value runs up to the comma that precedes the next `key=`
            cut = rest.rfind(",", 0, nxt.start() + 1) if nxt else -1
            value, rest = (rest[:cut], rest[cut + 1 :]) if cut >= 0 else (rest, "")
            if key in params:
                raise SpecError(f"{kind} spec {raw!r}: parameter {key!r} given twice")
            params[key] = value.strip().rstrip(",").strip()
        return PluginSpec(kind, name, params)
    if isinstance(raw, Mapping):
        data = dict(raw)
        if "name" not in data:
            if len(data) == 1:  # {"yarn": {"factor": 8}}
                ((name, params),) = data.items()
                if params is None or isinstance(params, Mapping):
                    return PluginSpec(kind, str(name), dict(params or {}))
            raise SpecError(f"{kind} spec {raw!r} has no 'name'; expected {{'name': ..., <params>}}")
        name = data.pop("name")
        nested = data.pop("params", None)
        if nested is not None:
            if not isinstance(nested, Mapping):
                raise SpecError(f"{kind} spec: 'params' must be a mapping, got {nested!r}")
            data = {**dict(nested), **data}
        return PluginSpec(kind, str(name), data)
    raise SpecError(f"{kind} spec must be a string or a mapping, got {type(raw).__name__}: {raw!r}")


@dataclass(frozen=True)
class PatchSpec:
    """A whole patch: at most one plugin per kind, plus the layer selection for attention."""

    plugins: dict[str, PluginSpec] = field(default_factory=dict)
    layers: Any = None

    @classmethod
    def build(cls, spec: Any = None, *, layers: Any = None, **kinds: Any) -> PatchSpec:
        """From keyword args (`attention=..., rope=...`), a mapping, a YAML/JSON file path, or a PatchSpec."""
        merged: dict[str, Any] = {}
        if isinstance(spec, PatchSpec):
            merged.update({k: v for k, v in spec.plugins.items()})
            layers = spec.layers if layers is None else layers
        elif isinstance(spec, (str, Path)):
            merged.update(load_spec_file(spec))
        elif isinstance(spec, Mapping):
            merged.update(spec)
        elif spec is not None:
            raise SpecError(f"spec must be a mapping, a YAML/JSON path or a PatchSpec, got {type(spec).__name__}")
        if "layers" in merged:
            layers = merged.pop("layers") if layers is None else layers
            merged.pop("layers", None)
        for kind, value in kinds.items():
            if value is not None:
                merged[kind] = value
        unknown = [k for k in merged if k not in KINDS]
        if unknown:
            raise SpecError(f"unknown plugin kind {unknown[0]!r} in spec; valid kinds: {', '.join(KINDS)}, layers")
        plugins = {k: parse_plugin_spec(k, v) for k, v in merged.items() if v is not None}
        return cls(plugins=plugins, layers=layers)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: self.plugins[k].to_dict() for k in KINDS if k in self.plugins}
        if self.layers is not None:
            out["layers"] = self.layers if isinstance(self.layers, (str, int)) else list(self.layers)
        return out

    def __bool__(self) -> bool:
        return bool(self.plugins)


def load_spec_file(path: str | Path) -> dict[str, Any]:
    from .yamlfile import read_yaml

    data = read_yaml(path, what="spec file", error=SpecError)
    if not isinstance(data, Mapping):
        raise SpecError(f"spec file {str(path)!r} must hold a mapping of kind -> plugin spec")
    return dict(data.get("patch", data))


@dataclass
class Manifest:
    """What `config.lcplug` records: the spec, who provided each plugin, and the base the patch started from."""

    spec: dict[str, Any]
    plugins: dict[str, dict[str, str]]
    lcplug_version: str
    base: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    manifest_version: int = MANIFEST_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "manifest_version": self.manifest_version,
            "lcplug_version": self.lcplug_version,
            "spec": self.spec,
            "plugins": self.plugins,
            "base": self.base,
            "state": self.state,
        }

    @classmethod
    def from_dict(cls, data: Any) -> Manifest:
        if not isinstance(data, Mapping) or "spec" not in data:
            raise ManifestError(f"config.lcplug is not an lcplug manifest (no 'spec'): {data!r}")
        version = data.get("manifest_version", 1)
        if not isinstance(version, int) or version > MANIFEST_VERSION:
            raise ManifestError(
                f"manifest_version {version!r} is newer than this lcplug understands ({MANIFEST_VERSION}); "
                "upgrade lcplug"
            )
        lcplug_version = str(data.get("lcplug_version", "0"))
        from ._version import __version__

        if _major(lcplug_version) > _major(__version__):
            raise ManifestError(
                f"checkpoint was patched with lcplug {lcplug_version}, a newer major version than the installed "
                f"{__version__}; upgrade lcplug (pip install -U lcplug)"
            )
        return cls(
            spec=dict(data["spec"]),
            plugins=dict(data.get("plugins", {})),
            lcplug_version=lcplug_version,
            base=dict(data.get("base", {})),
            state=dict(data.get("state", {})),
            manifest_version=version,
        )


def _major(version: str) -> int:
    m = re.match(r"(\d+)", version)
    return int(m.group(1)) if m else 0
