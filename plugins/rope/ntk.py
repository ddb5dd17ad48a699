"""`ntk`: static NTK-aware scaling, written as standard rope_type "default" with a larger rope_theta."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lcplug.hookspecs import hookimpl
from lcplug.params import Params, param
from lcplug.plugin import RopePlugin
from lcplug.rope import scale_theta


@dataclass(frozen=True)
class NtkParams(Params):
    factor: float = param(
        help="context extension factor s: the base becomes b * s^(d/(d-2)), d the rotary dim",
        check=lambda v: v >= 1.0,
        valid="a number >= 1",
    )


class NtkRope(RopePlugin):
    """Static NTK-aware scaling (bloc97 2023): change the rotary base instead of the positions.

    b' = b * s^(d/(d-2)) with d the rotated dims per head (partial rotary included): high frequencies
    stay almost as trained, the lowest one is interpolated by exactly s. transformers has no type for it,
    but it is standard rope_type "default" with rope_theta = b', so that is what is written (the checkpoint
    loads right anywhere) and `factor` stays in the manifest. Composes with an existing "linear" rope.
    """

    name = "ntk"
    Params = NtkParams

    def rope_parameters(self, base: dict[str, Any], config: Any) -> dict[str, Any]:
        return scale_theta(base, self.params.factor, config, owner=self.qualname())

    def max_position_embeddings(self, base_max: int) -> int:
        return int(base_max * self.params.factor)


@hookimpl
def lcplug_register(register):
    register(NtkRope)
