"""`yarn`: YaRN (Peng et al. 2023), transformers' rope_type "yarn", every parameter transformers knows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lcplug.errors import ParamError
from lcplug.hookspecs import hookimpl
from lcplug.params import Params, param
from lcplug.plugin import RopePlugin
from lcplug.rope import extend_parameters, original_length

_POS = {"check": lambda v: v > 0, "valid": "a number > 0"}


@dataclass(frozen=True)
class YarnParams(Params):
    factor: float = param(help="context extension factor s", check=lambda v: v >= 1.0, valid="a number >= 1")
    original_max_position_embeddings: int | None = param(
        None,
        "the pre-extension context length L (default: the model's max_position_embeddings)",
        check=lambda v: v >= 1,
        valid="an integer >= 1",
    )
    beta_fast: float = param(32.0, "ramp boundary in rotations: dims rotating faster are not interpolated", **_POS)
    beta_slow: float = param(1.0, "ramp boundary in rotations: dims rotating slower are fully interpolated", **_POS)
    mscale: float | None = param(None, "attention temperature multiplier scale (DeepSeek style)", **_POS)
    mscale_all_dim: float | None = param(None, "mscale denominator applied over all dims (DeepSeek style)", **_POS)
    attention_factor: float | None = param(None, "override of the cos/sin scaling (default 0.1 ln s + 1)", **_POS)
    truncate: bool | None = param(None, "truncate the correction range to integers (transformers' default: true)")

    def validate(self, owner: str | None = None) -> None:
        super().validate(owner)
        if self.beta_slow >= self.beta_fast:
            raise ParamError(f"{owner}: beta_slow={self.beta_slow} must be smaller than beta_fast={self.beta_fast}")


class YarnRope(RopePlugin):
    """YaRN: NTK-by-parts interpolation with a ramp between beta_slow and beta_fast plus attention scaling.

    Dimensions that rotate more than beta_fast times over the original context are left alone, those
    rotating fewer than beta_slow times are interpolated by `factor`, and a linear ramp blends between;
    cos/sin are scaled by 0.1 ln(s) + 1. Written as standard `rope_parameters` (rope_type "yarn").
    """

    name = "yarn"
    Params = YarnParams

    def rope_parameters(self, base: dict[str, Any], config: Any) -> dict[str, Any]:
        p = self.params
        return extend_parameters(
            base,
            "yarn",
            owner=self.qualname(),
            factor=p.factor,
            original_max_position_embeddings=original_length(
                config, p.original_max_position_embeddings, self.qualname()
            ),
            beta_fast=p.beta_fast,
            beta_slow=p.beta_slow,
            mscale=p.mscale,
            mscale_all_dim=p.mscale_all_dim,
            attention_factor=p.attention_factor,
            truncate=p.truncate,
        )

    def max_position_embeddings(self, base_max: int) -> int:
        orig = self.params.original_max_position_embeddings or base_max
        return int(orig * self.params.factor)


@hookimpl
def lcplug_register(register):
    register(YarnRope)
