"""Context parallelism: each sequence sharded over the ranks of a cp group, any attention pattern on top.

- `mesh`: the dp x cp `DeviceMesh` and the ulysses x ring split of cp (`cp_mesh`);
- `comm`: counted, differentiable collectives (`CommStats`: bytes per rank per collective kind);
- `shard`: spans each rank holds, the global mask (`ShardMask`) built from global indices and positions;
- `rules`: what each layer attends to over global spans; `strategies`: how keys reach the queries;
- `install`: the seam with the attention dispatcher; `loss`: the LM loss reduced over the group.

`shard_batch(model, batch)` gives a rank its part of a packed batch; `comm_stats(model)` reads the bytes;
`suspended(model)` runs it single-process for a while (evaluation on one rank).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..data.packing import context_parallel_slice
from .comm import CommStats
from .errors import CPCommError, CPConfigError, CPError, CPShapeError
from .install import CPRuntime, cp_runtime, suspended
from .loss import cp_loss
from .mesh import CPMesh, cp_mesh
from .shard import Span, check_seq_len, rank_spans


def shard_batch(model: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
    """This rank's part of a packed batch for a cp-patched `model` (the batch unchanged without active cp)."""
    runtime = cp_runtime(model)
    if runtime is None:
        return dict(batch)
    check_seq_len(batch["input_ids"].shape[-1], runtime.mesh.degree, runtime.layout)
    return context_parallel_slice(batch, runtime.mesh.rank, runtime.mesh.degree, runtime.layout)


def comm_stats(model: nn.Module) -> CommStats | None:
    """Bytes this rank's cp collectives sent/received since the last `reset()` (None without active cp)."""
    runtime = cp_runtime(model)
    return None if runtime is None else runtime.mesh.stats


__all__ = [
    "CPCommError",
    "CPConfigError",
    "CPError",
    "CPMesh",
    "CPRuntime",
    "CPShapeError",
    "CommStats",
    "Span",
    "check_seq_len",
    "comm_stats",
    "cp_loss",
    "cp_mesh",
    "cp_runtime",
    "rank_spans",
    "shard_batch",
    "suspended",
]
