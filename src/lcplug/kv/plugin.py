"""`TieredKVPlugin`: the base the first-party tiers (`device`, `host`, `disk`) share."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from torch import nn

from ..plugin import KVPlugin
from .cache import Tier, TieredCache, plan_layers
from .store import private_directory, release

if TYPE_CHECKING:
    from ..patching import PatchContext


class TieredKVPlugin(KVPlugin):
    """A `TieredCache` of tier `tier`, built from the plugin's params for each `generate` call."""

    tier: ClassVar[Tier]

    def check(self, model: nn.Module, adapter: Any) -> None:
        """An unusable directory fails at patch time rather than at the first `generate`."""
        if self.tier == "disk":
            release([], private_directory(self.params.path))

    def make_cache(self, model: nn.Module) -> TieredCache:
        return TieredCache(model, self.tier, **self.params.to_dict())

    def install(self, ctx: PatchContext) -> None:
        """Check the budget against the layers as attention left them (attention installs first), then install."""
        settings = {k: v for k, v in self.params.to_dict().items() if k not in ("path", "prefetch")}
        plan_layers(ctx.model, self.tier, **settings)
        super().install(ctx)
