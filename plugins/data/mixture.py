"""`mixture`: explicit domain@proportion weights, with optional per-source length upsampling."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from lcplug.data.base import Domain, MixturePlugin
from lcplug.data.mixture import parse_domains
from lcplug.hookspecs import hookimpl
from lcplug.params import Params, param


@dataclass(frozen=True)
class MixtureParams(Params):
    weights: Any = param(help="'code@0.3,books@0.7', a mapping source -> weight, or a list of domain mappings")
    long_share: float | None = param(
        None,
        "Fu et al. length upsampling for every domain without its own: the share of tokens from long documents",
        check=lambda v: 0 < v < 1,
        valid="a number in (0, 1)",
    )
    long_threshold: int = param(4096, "documents of at least this many tokens count as long", check=lambda v: v >= 1)


class Mixture(MixturePlugin):
    """Domains as `source@proportion` shares of tokens; weights that do not sum to 1 are normalised with a warning.

    `long_share` applies Fu et al.'s per-source length upsampling to each domain (keeping the domain
    shares): documents of at least `long_threshold` tokens are kept, shorter ones thinned until long ones
    make up `long_share` of the source's tokens. Writing the weights straight into `data.mixture` is the
    same as this plugin without upsampling.
    """

    name = "mixture"
    Params = MixtureParams

    def domains(self, sources: Sequence[str]) -> list[Domain]:
        p = self.params
        out = []
        for d in parse_domains(p.weights):
            if d.long_share is None and p.long_share is not None:
                d = replace(d, long_share=p.long_share, long_threshold=p.long_threshold)
            out.append(d)
        return out


@hookimpl
def lcplug_register(register):
    register(Mixture)
