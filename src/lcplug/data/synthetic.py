"""Shared pieces of synthetic task builders: lengths, depths, the loss mask of a prompt and its answer.

Builders make their prompts with the evaluation probes' own code (`lcplug.eval.probes`), so a model
trains on exactly the format it is evaluated on; their seeds are derived apart from the probes' own, so
training samples never repeat an evaluation trial.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from ..params import Params, param
from .base import Piece
from .tokenize import TextTokenizer


def _lengths_ok(values: Sequence[int]) -> bool:
    return bool(values) and all(v >= 16 for v in values)


def _depths_ok(values: Sequence[float]) -> bool:
    return all(0 <= v <= 1 for v in values)


@dataclass(frozen=True)
class TaskParams(Params):
    """Parameters every synthetic task shares."""

    lengths: list[int] = param(
        [1024, 2048, 4096], "prompt lengths in tokens; each sample draws one", check=_lengths_ok, valid="integers >= 16"
    )
    loss: Literal["answer", "all"] = param("answer", "answer: loss on the answer only; all: on every token")


@dataclass(frozen=True)
class DepthTaskParams(TaskParams):
    """Parameters of tasks that hide something at a depth."""

    depths: list[float] = param(
        [], "depths (0 = start, 1 = end) to draw from; empty: uniform in [0, 1]", check=_depths_ok, valid="in [0, 1]"
    )


def pick_depth(rng: random.Random, depths: Sequence[float]) -> float:
    """One of `depths`, or uniform in [0, 1] when none are given."""
    return rng.choice(list(depths)) if depths else rng.random()


def task_piece(tokenizer: TextTokenizer, prompt: Sequence[int], answer: Sequence[int], loss: str, group: str) -> Piece:
    """A whole sample: prompt + answer + EOS, trained on the answer (and EOS) or on everything."""
    tail = [*answer, *tokenizer.eos]
    mask = [loss == "all"] * len(prompt) + [True] * len(tail)
    return Piece(ids=[*prompt, *tail], mask=mask, group=group)
