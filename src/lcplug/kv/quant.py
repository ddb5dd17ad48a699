"""The quantized lower tier (opt-in, lossy): `QuantizedStore` keeps spilled blocks as int8 plus scales.

It wraps either lower tier (`HostStore` or `DiskStore`): `put` quantizes a sealed block and hands the
inner store packed bytes, `get_many` reads them back and dequantizes to the block's original dtype on the
target device (so a host tier also copies ~4x fewer bytes to the GPU for fp32). One mechanism for both
tiers, and the disk tier's CRC-32 covers exactly the bytes stored, int8 data and scales alike.

Scales follow KIVI (Liu et al., 2024), symmetric int8 in [-127, 127], scale = absmax / 127:
- keys per (head, channel), over the block's tokens: key activations carry a few outlier channels of
  consistently large magnitude; a per-token scale would be set by those channels and leave the others a
  handful of levels, a per-channel scale isolates them. A sealed block is a natural quantization group:
  its tokens never change, and the open tail (KIVI's full-precision residual) is never quantized.
- values per (head, token), over channels: values have no such channel structure, and attention mixes
  whole value rows, so a per-token scale confines each token's error to that token's contribution.
Scales are kept in the block's own dtype, so a block of T tokens and D channels stores
`1 + s/T` (keys) and `1 + s/D` (values) bytes per element, s the dtype's size: about 3.8x smaller than
fp32 (1.95x than bf16) at T=64, D=128.

What was quantized is measured, not assumed: `error` accumulates the max absolute and the relative RMS
error of every block put (the cache's `stats()` reports them).
"""

from __future__ import annotations

import math
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch

from .store import KV, DiskStore, HostStore

Quantize = Literal["none", "int8"]
QUANTIZE: tuple[str, ...] = typing.get_args(Quantize)
QMAX = 127
SCALE_DIMS = (-2, -1)
"""The dimension each scale reduces over, keys then values: keys over tokens (one scale per channel),
values over channels (one scale per token)."""


@dataclass
class QuantError:
    """Running error of what a store quantized: sums of squares for the relative RMS, and the max |error|."""

    squared_error: float = 0.0
    squared_signal: float = 0.0
    max_abs: float = 0.0

    def add(self, original: torch.Tensor, restored: torch.Tensor) -> None:
        x = original.float()
        err = restored.float() - x
        self.squared_error += err.square().sum().item()
        self.squared_signal += x.square().sum().item()
        self.max_abs = max(self.max_abs, err.abs().max().item())

    @property
    def rel_rms(self) -> float:
        """RMS error over RMS signal (0 for an all-zero signal)."""
        return math.sqrt(self.squared_error / self.squared_signal) if self.squared_signal else 0.0

    @classmethod
    def merged(cls, errors: Iterable[QuantError]) -> QuantError:
        out = cls()
        for e in errors:
            out.squared_error += e.squared_error
            out.squared_signal += e.squared_signal
            out.max_abs = max(out.max_abs, e.max_abs)
        return out


def quantize(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 of `x` with one scale per slice along `dim` (kept, size 1), in `x`'s dtype."""
    scale = (x.float().abs().amax(dim=dim, keepdim=True) / QMAX).to(x.dtype)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero slice: any scale is exact
    q = (x.float() / scale.float()).round().clamp(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (q.float() * scale.float()).to(scale.dtype)


def _pack(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """One flat byte tensor: the int8 data, then the scales (what the inner store keeps and checksums)."""
    return torch.cat([q.flatten().view(torch.uint8), scale.contiguous().flatten().view(torch.uint8)])


def _unpack(blob: torch.Tensor, shape: torch.Size, dtype: torch.dtype, dim: int) -> torch.Tensor:
    n = math.prod(shape)
    scale_shape = list(shape)
    scale_shape[dim] = 1
    q = blob[:n].view(torch.int8).view(shape)
    scale = blob[n:].clone().view(dtype).view(scale_shape)  # clone: the scales' byte offset may be unaligned
    return dequantize(q, scale)


class QuantizedStore:
    """A lower tier that stores blocks as int8 + scales in `inner` and returns them in their original dtype."""

    def __init__(self, inner: HostStore | DiskStore) -> None:
        self.inner = inner
        self.error = QuantError()
        self.bytes_unquantized = 0
        self._layouts: dict[int, tuple[tuple[torch.Size, torch.dtype], ...]] = {}

    def __contains__(self, block: int) -> bool:
        return block in self.inner

    @property
    def bytes_read(self) -> int:
        return self.inner.bytes_read

    @property
    def bytes_stored(self) -> int:
        return self.inner.bytes_stored

    def put(self, block: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        parts = [quantize(x, dim) for x, dim in zip((keys, values), SCALE_DIMS)]
        self.inner.put(block, *(_pack(q, scale) for q, scale in parts))
        self._layouts[block] = ((keys.shape, keys.dtype), (values.shape, values.dtype))
        for x, (q, scale) in zip((keys, values), parts):
            self.error.add(x, dequantize(q, scale))
            self.bytes_unquantized += x.numel() * x.element_size()

    def get_many(self, blocks: list[int], device: torch.device) -> dict[int, KV]:
        packed = self.inner.get_many(blocks, device)
        out = {}
        for b in blocks:
            keys, values = (
                _unpack(blob, shape, dtype, dim)
                for blob, (shape, dtype), dim in zip(packed[b], self._layouts[b], SCALE_DIMS)
            )
            out[b] = (keys, values)
        return out

    def clear(self) -> None:
        self.inner.clear()
        self._layouts.clear()
        self.error = QuantError()
        self.bytes_unquantized = 0

    def close(self) -> None:
        self.inner.close()
