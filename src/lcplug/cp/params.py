"""Params every cp plugin shares: the degree and how long a collective may wait."""

from __future__ import annotations

from dataclasses import dataclass

from ..params import Params, param


@dataclass(frozen=True)
class CPParams(Params):
    degree: int = param(
        2,
        "ranks each sequence is sharded over (divides the world size)",
        check=lambda v: v >= 1,
        valid="an integer >= 1",
    )
    timeout: float = param(
        300.0,
        "seconds a cp collective waits for a rank before failing with a clear error (a dead rank never hangs the run)",
        check=lambda v: v > 0,
        valid="a number > 0",
    )
