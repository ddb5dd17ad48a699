"""`llama3`: Llama-3.1's frequency-band scaling, transformers' rope_type "llama3"."""

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
class Llama3Params(Params):
    factor: float = param(
        help="context extension factor s (8 for Llama-3.1)", check=lambda v: v >= 1.0, valid="a number >= 1"
    )
    low_freq_factor: float = param(1.0, "wavelengths above L / low_freq_factor are interpolated by s", **_POS)
    high_freq_factor: float = param(4.0, "wavelengths below L / high_freq_factor are left alone", **_POS)
    original_max_position_embeddings: int | None = param(
        None,
        "the pre-extension context length L (default: the model's max_position_embeddings)",
        check=lambda v: v >= 1,
        valid="an integer >= 1",
    )

    def validate(self, owner: str | None = None) -> None:
        super().validate(owner)
        if self.high_freq_factor <= self.low_freq_factor:
            raise ParamError(
                f"{owner}: high_freq_factor={self.high_freq_factor} must be larger than "
                f"low_freq_factor={self.low_freq_factor}"
            )


class Llama3Rope(RopePlugin):
    """Llama-3.1 scaling: per frequency band, leave high frequencies, interpolate low ones, blend between.

    With wavelength w of a rotary pair: w < L / high_freq_factor keeps its frequency, w > L / low_freq_factor
    is divided by `factor`, and in between the two are mixed by (L / w - low) / (high - low). Written as
    standard `rope_parameters` (rope_type "llama3"); max_position_embeddings becomes L * factor.
    """

    name = "llama3"
    Params = Llama3Params

    def rope_parameters(self, base: dict[str, Any], config: Any) -> dict[str, Any]:
        p = self.params
        return extend_parameters(
            base,
            "llama3",
            owner=self.qualname(),
            factor=p.factor,
            low_freq_factor=p.low_freq_factor,
            high_freq_factor=p.high_freq_factor,
            original_max_position_embeddings=original_length(
                config, p.original_max_position_embeddings, self.qualname()
            ),
        )

    def max_position_embeddings(self, base_max: int) -> int:
        return int((self.params.original_max_position_embeddings or base_max) * self.params.factor)


@hookimpl
def lcplug_register(register):
    register(Llama3Rope)
