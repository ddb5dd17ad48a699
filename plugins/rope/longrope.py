"""`longrope`: per-dimension rescale factors (LongRoPE, Phi-3), transformers' rope_type "longrope"."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lcplug.errors import ParamError
from lcplug.hookspecs import hookimpl
from lcplug.params import Params, param
from lcplug.plugin import RopePlugin
from lcplug.rope import extend_parameters, original_length, rotary_dim

_FACTORS = {"check": lambda v: len(v) > 0 and all(x > 0 for x in v), "valid": "a non-empty list of numbers > 0"}


@dataclass(frozen=True)
class LongRopeParams(Params):
    factor: float = param(
        help="context extension factor s: the target length is L * s", check=lambda v: v >= 1.0, valid="a number >= 1"
    )
    long_factor: list[float] = param(
        help="rescale factor per rotary pair (rotary_dim / 2 values) used beyond L, e.g. from `lcplug rope-search`",
        **_FACTORS,
    )
    short_factor: list[float] | None = param(
        None, "rescale factor per rotary pair used up to L (default: all 1, the trained frequencies)", **_FACTORS
    )
    original_max_position_embeddings: int | None = param(
        None,
        "the pre-extension context length L (default: the model's max_position_embeddings)",
        check=lambda v: v >= 1,
        valid="an integer >= 1",
    )
    attention_factor: float | None = param(
        None, "cos/sin scaling (default: sqrt(1 + ln s / ln L), the paper's)", check=lambda v: v > 0, valid="> 0"
    )


class LongRope(RopePlugin):
    """LongRoPE (Ding et al. 2024): frequency i divided by its own factor, one set up to L, one beyond.

    theta_i' = theta_i / lambda_i, with `long_factor` once the sequence is longer than L and `short_factor`
    up to L, and cos/sin scaled by the attention factor. Factors come from an evolutionary search
    (`lcplug rope-search`). Written as standard `rope_parameters` (rope_type "longrope", as Phi-3 ships);
    max_position_embeddings becomes L * factor.
    """

    name = "longrope"
    Params = LongRopeParams

    def rope_parameters(self, base: dict[str, Any], config: Any) -> dict[str, Any]:
        p = self.params
        pairs = rotary_dim(base, config) // 2
        short = list(p.short_factor) if p.short_factor is not None else [1.0] * pairs
        for label, factors in (("long_factor", p.long_factor), ("short_factor", short)):
            if len(factors) != pairs:
                raise ParamError(
                    f"{self.qualname()}: parameter {label!r} has {len(factors)} values; the model rotates "
                    f"{2 * pairs} dims per head, so it needs {pairs} (one per rotary pair)"
                )
        return extend_parameters(
            base,
            "longrope",
            owner=self.qualname(),
            factor=p.factor,
            short_factor=short,
            long_factor=list(p.long_factor),
            original_max_position_embeddings=original_length(
                config, p.original_max_position_embeddings, self.qualname()
            ),
            attention_factor=p.attention_factor,
        )

    def max_position_embeddings(self, base_max: int) -> int:
        return int((self.params.original_max_position_embeddings or base_max) * self.params.factor)


@hookimpl
def lcplug_register(register):
    register(LongRope)
