"""Build, read and re-apply the manifest that `config.lcplug` carries.

The manifest is the answer to "which patches does this checkpoint need": the validated spec (every
param, defaults included), the distribution and version of each plugin, the lcplug version, the base
values the patch changed (so a reload starts from them), and plugin state such as calibration results.
"""

from __future__ import annotations

from typing import Any

from .errors import ManifestError, UnknownPluginError
from .spec import Manifest


def build_manifest(plugins: dict[str, Any], layers: list[int], base: dict[str, Any]) -> dict[str, Any]:
    from ._version import __version__

    spec: dict[str, Any] = {kind: {"name": p.name, **p.params.to_dict()} for kind, p in plugins.items()}
    spec["layers"] = list(layers)
    return Manifest(
        spec=spec,
        plugins={
            kind: {"name": p.name, "distribution": p.origin.distribution, "version": p.origin.version}
            for kind, p in plugins.items()
        },
        lcplug_version=__version__,
        base=base,
        state={kind: s for kind, p in plugins.items() if (s := p.manifest_state())},
    ).to_dict()


def read_manifest(config: Any) -> Manifest | None:
    """The manifest of a (top-level) config, or None for a checkpoint lcplug never patched."""
    data = getattr(config, "lcplug", None)
    if data is None:
        return None
    return Manifest.from_dict(data)


def check_available(manifest: Manifest) -> None:
    """Fail early, naming the distribution to install, if a plugin the manifest needs is not installed."""
    from .registry import get_registry

    registry = get_registry()
    for kind, info in manifest.plugins.items():
        try:
            registry.get(kind, info["name"])
        except UnknownPluginError:
            dist = info.get("distribution", "?")
            raise ManifestError(
                f"checkpoint needs {kind} plugin {info['name']!r} from distribution {dist!r} "
                f"(version {info.get('version', '?')}), which is not installed; pip install {dist}"
            ) from None


def rebase(config: Any, manifest: Manifest) -> None:
    """Put back the base values the patch started from, so re-applying the spec does not extend twice."""
    for name, value in manifest.base.items():
        if value is not None:
            setattr(config, name, value)
