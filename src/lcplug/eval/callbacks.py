"""Probes during training: every N steps, run them, log the headline numbers, keep them for the model card.

The callback is framework-free: a training loop calls `on_step(step, model)` after each optimizer step
(lcplug's own loop, an Accelerate loop, or a Trainer callback forwarding `state.global_step`). It is a
no-op except on every `every_n_steps`-th step, so the loop needs no bookkeeping of its own.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from .haystack import Haystack
from .probes import Probe, ProbeError, build_probes
from .report import model_card_section
from .runner import evaluate, metrics

LogFn = Callable[[dict[str, float], int], Any]
"""A metrics logger: `log_fn(metrics, step)` (e.g. `lambda m, s: accelerator.log(m, step=s)`)."""


class EvalCallback:
    """Run `probes` every `every_n_steps` steps; log flat metrics and keep every result.

    The haystack is read once and reused, so each evaluation costs only the probes themselves. The
    model is evaluated in eval mode without gradients and put back in the mode it was in.
    """

    def __init__(
        self,
        probes: str | Sequence[Probe],
        every_n_steps: int,
        *,
        tokenizer: Any = None,
        haystack: Haystack | str | os.PathLike | None = None,
        log_fn: LogFn | None = None,
        prefix: str = "eval/",
        label: str = "model",
    ):
        if every_n_steps < 1:
            raise ProbeError(f"every_n_steps={every_n_steps}; valid: an integer >= 1")
        self.probes = build_probes(probes) if isinstance(probes, str) else list(probes)
        self.every_n_steps = every_n_steps
        self.tokenizer = tokenizer
        self.haystack = haystack if isinstance(haystack, Haystack) else Haystack(haystack)
        self.log_fn = log_fn
        self.prefix = prefix
        self.label = label
        self.history: list[tuple[int, dict[str, float]]] = []
        """(step, metrics) of every evaluation so far: the training curve of the probes."""
        self.latest: dict[str, Any] | None = None
        """The full result of the last evaluation (what `lcplug eval` writes for one model)."""

    def on_step(self, step: int, model: Any, log_fn: LogFn | None = None) -> dict[str, float] | None:
        """Evaluate at steps that are multiples of `every_n_steps` (step 0 excluded); return the metrics logged."""
        if step <= 0 or step % self.every_n_steps:
            return None
        self.latest = evaluate(model, self.probes, tokenizer=self.tokenizer, haystack=self.haystack, label=self.label)
        logged = metrics(self.latest, self.prefix)
        self.history.append((step, logged))
        log = log_fn or self.log_fn
        if log is not None:
            log(logged, step)
        return logged

    def model_card_section(self, plots: dict[str, str] | None = None) -> str:
        """Markdown of the last evaluation plus one row per evaluation during training."""
        if self.latest is None:
            raise ProbeError("no evaluation has run yet; call on_step at a multiple of every_n_steps first")
        return model_card_section(self.latest, plots=plots, history=self.history)
