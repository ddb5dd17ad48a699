"""`dynamic`: dynamic NTK scaling, transformers' rope_type "dynamic"."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lcplug.hookspecs import hookimpl
from lcplug.params import Params, param
from lcplug.plugin import RopePlugin
from lcplug.rope import extend_parameters


@dataclass(frozen=True)
class DynamicParams(Params):
    factor: float = param(
        help="scaling factor s of the NTK base change once the sequence outgrows the trained length",
        check=lambda v: v >= 1.0,
        valid="a number >= 1",
    )


class DynamicRope(RopePlugin):
    """Dynamic NTK (emozilla 2023): the base grows with the current length, nothing changes below L.

    For a sequence of length n > L the base is b * ((s * n / L) - (s - 1))^(d/(d-2)); at n <= L the
    model runs exactly as trained. Written as standard `rope_parameters` (rope_type "dynamic"). transformers
    reads L from max_position_embeddings, so it is left at the trained length: raising it would move the
    point where scaling starts.
    """

    name = "dynamic"
    Params = DynamicParams

    def rope_parameters(self, base: dict[str, Any], config: Any) -> dict[str, Any]:
        return extend_parameters(base, "dynamic", factor=self.params.factor, owner=self.qualname())


@hookimpl
def lcplug_register(register):
    register(DynamicRope)
