"""Training metrics to `metrics.jsonl` (one JSON object per line) and TensorBoard, from rank 0 only.

A resumed run first drops what the interrupted run logged after its checkpoint (JSON lines past the
step; TensorBoard through `purge_step`), so the logs read as one uninterrupted run; a fresh run into the
same directory drops an earlier run's rows.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

JSONL = "metrics.jsonl"
TENSORBOARD = "tensorboard"


class MetricsLog:
    """Append metrics at a step to the sinks `log` names (`jsonl`, `tensorboard`); a no-op where not `enabled`."""

    def __init__(
        self, directory: Path, log: Sequence[str], *, enabled: bool = True, resume_step: int | None = None
    ) -> None:
        self.enabled = enabled
        self.jsonl = directory / JSONL if enabled and "jsonl" in log else None
        self.writer = None
        if not enabled:
            return
        directory.mkdir(parents=True, exist_ok=True)
        if self.jsonl is not None and self.jsonl.is_file():
            rows = [line for line in self.jsonl.read_text().splitlines() if line.strip()]
            kept = [line for line in rows if resume_step is not None and json.loads(line)["step"] <= resume_step]
            self.jsonl.write_text("".join(line + "\n" for line in kept))
        if "tensorboard" in log:
            from torch.utils.tensorboard import SummaryWriter

            purge = 0 if resume_step is None else resume_step + 1  # a fresh run drops an earlier run's events
            self.writer = SummaryWriter(str(directory / TENSORBOARD), purge_step=purge)

    def log(self, values: Mapping[str, float], step: int, **labels: Any) -> None:
        """One row: `step`, the `labels` (e.g. the stage name, kept out of TensorBoard) and the values."""
        if not self.enabled:
            return
        if self.jsonl is not None:
            row = {"step": step, **labels, **{k: _number(v) for k, v in values.items()}}
            with self.jsonl.open("a") as f:
                f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _number(value: float) -> float | None:
    """JSON has no NaN or infinity: those are written as null (counts stay integers)."""
    if isinstance(value, int):
        return value
    value = float(value)
    return value if math.isfinite(value) else None
