"""`linear`: position interpolation (PI), transformers' rope_type "linear"."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lcplug.hookspecs import hookimpl
from lcplug.params import Params, param
from lcplug.plugin import RopePlugin
from lcplug.rope import extend_parameters


@dataclass(frozen=True)
class LinearParams(Params):
    factor: float = param(
        help="context extension factor s: positions are divided by s (theta/s)",
        check=lambda v: v >= 1.0,
        valid="a number >= 1",
    )


class LinearRope(RopePlugin):
    """Position interpolation (Chen et al. 2023): every rotary frequency divided by `factor`.

    Written as standard `rope_parameters` {"rope_type": "linear", "factor": s}, so the checkpoint loads
    right in plain transformers and serving engines. On a model that is already "linear" the factors
    multiply; max_position_embeddings becomes s times the current one.
    """

    name = "linear"
    Params = LinearParams

    def rope_parameters(self, base: dict[str, Any], config: Any) -> dict[str, Any]:
        return extend_parameters(base, "linear", factor=self.params.factor, owner=self.qualname())

    def max_position_embeddings(self, base_max: int) -> int:
        return int(base_max * self.params.factor)


@hookimpl
def lcplug_register(register):
    register(LinearRope)
