"""The LM loss of a cp rank, reduced by token count across its cp group.

A rank holds a shard of each row, and of its (pre-shifted) labels. The single-process loss is the sum
of token losses over the trained tokens of the whole rows, divided by their count; each rank returns
its shard's sum divided by the group's count (one all-reduce of an integer), times the cp degree. The
factor makes the usual data-parallel gradient average (DDP divides by all dp x cp ranks) come out as
the single-process gradient: a cp group's ranks each hold a part of one sample's gradient, and those
parts must add up, not average. A rank whose tokens are all masked contributes 0, never NaN; a group
with no trained token at all gives 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.packing import IGNORE_INDEX
from .comm import Comm


def cp_loss(logits: torch.Tensor, shift_labels: torch.Tensor, comm: Comm) -> torch.Tensor:
    """Cross-entropy of (B, L_local, V) logits against (B, L_local) shifted labels, scaled as above."""
    total = F.cross_entropy(
        logits.float().flatten(0, 1),
        shift_labels.flatten().to(logits.device),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    count = (shift_labels != IGNORE_INDEX).sum().reshape(1).to(torch.int64)
    tokens = comm.all_reduce(count).clamp_min(1).to(total.dtype).squeeze(0)
    return total * comm.size / tokens
