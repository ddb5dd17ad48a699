"""Where an n-gram memory's embedding rows live: on the model's device, in host memory, or on disk.

A step reads only the rows its tokens hash to, so the tables need not sit next to the compute:
- `device`: an ordinary parameter that moves with the model;
- `host`: a parameter that stays in CPU memory (fp32) when the model moves; a step gathers its rows on the
  host and copies only those to the device. Trainable, and equal to `device` bit for bit;
- `disk`: the rows in a memory-mapped file in a private directory (the KV tiers' `private_directory`,
  removed when the table is collected); a step pages in only the rows it reads. Serving only: the rows are
  a buffer, not a parameter (train with `device` or `host`). The buffer is the mapped file itself, so the
  state dict carries it and loading a checkpoint writes straight into the file: `save_pretrained` /
  `lcplug.from_pretrained` round-trip a disk-placed memory.
"""

from __future__ import annotations

import weakref
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..kv.store import private_directory, release

PLACEMENTS = ("device", "host", "disk")


class HashedTables(nn.Module):
    """`rows` x `dim` embedding rows looked up by flat index, kept where `placement` says."""

    def __init__(self, rows: int, dim: int, placement: str, seed: int):
        super().__init__()
        self.rows, self.dim, self.placement = rows, dim, placement
        init = torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed)) * dim**-0.5
        self.path = None  # disk placement: the memory-mapped file holding the rows
        if placement == "disk":
            self.path = private_directory(None) / "rows.npy"
            self.register_buffer("weight", _mapped(init, self.path))
        else:
            self.weight = nn.Parameter(init)

    def lookup(self, index: torch.Tensor) -> torch.Tensor:
        """Rows at `index` (any shape of longs) -> (*index.shape, dim) on `index`'s device."""
        return self.weight[index.to(self.weight.device)].to(index.device)

    def _apply(self, fn, recurse=True):
        """Host and disk rows stay where they are whatever the model moves or casts to; device rows follow."""
        return super()._apply(fn, recurse) if self.placement == "device" else self

    def extra_repr(self) -> str:
        return f"rows={self.rows}, dim={self.dim}, placement={self.placement}"


def _mapped(rows: torch.Tensor, path: Path) -> torch.Tensor:
    """A CPU tensor backed by a new memory-mapped file at `path` holding `rows` (fp32); the file's
    directory is removed with the tensor."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=tuple(rows.shape))
    array[:] = rows.numpy()
    tensor = torch.from_numpy(array)
    weakref.finalize(tensor, release, [], path.parent)
    return tensor
