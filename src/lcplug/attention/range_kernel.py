"""The CPU range-attention kernel (`kernels/range_attention.cpp`): build on first use, fall back cleanly.

Each query row reads at most two key ranges: sliding windows with sinks, streaming blocks, causality,
padding and document boundaries all have that shape (`BlockLayout.row_ranges` finds it). torch's CPU
flash kernel can bound a row's keys only by a top-left causal mask or a dense additive bias, so on a
banded layout it computes masked pairs; this kernel computes, per tile of query rows, only the union of
the rows' ranges (see docs/attention.md for the measured difference).

The extension is compiled with `torch.utils.cpp_extension` the first time it is needed (about a minute;
cached by torch per source and flags). Without a C++ compiler, without the BLAS symbol torch links, or
with `LCPLUG_CPU_KERNEL=0`, `kernel()` is None and callers keep torch's own kernels.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("kernels") / "range_attention.cpp"
log = logging.getLogger("lcplug.attention")

TILE_ROWS = 128
"""Query rows per tile: a tile computes its rows' range union, so a window W costs (W + TILE_ROWS) / W of
its pairs; fewer rows make the products shallower."""

CHUNK_KEYS = 512
"""Keys per product: a tile's score chunk (TILE_ROWS x CHUNK_KEYS fp32, 256 KiB) stays in cache."""


@functools.cache
def kernel():
    """The compiled extension module, or None where it cannot be built (a warning says why, once)."""
    if os.environ.get("LCPLUG_CPU_KERNEL", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load

        log.info("loading the CPU range-attention kernel (the first build on a machine takes about a minute)")
        return load(
            name="lcplug_range_attention",
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-fopenmp", *_isa_flags()],  # OpenMP: ATen's parallel_for is inline
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as exc:  # no compiler, no ninja, a BLAS without sgemm_: torch's kernels still work
        warnings.warn(f"lcplug: CPU range-attention kernel unavailable ({exc}); using torch's kernels", stacklevel=2)
        return None


def _isa_flags() -> list[str]:
    """ATen's vector types pick their instructions from CPU_CAPABILITY macros: match what torch runs here."""
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        return ["-mavx2", "-mfma", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return []


def usable(query: torch.Tensor) -> bool:
    """The kernel takes float32 CPU tensors and has been built (or loaded) on this machine."""
    return query.device.type == "cpu" and query.dtype == torch.float32 and kernel() is not None


def range_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ranges: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, H, Lq, D), k/v (B, Hk, Lk, D), ranges (B, Lq, 4) int64 (`row_ranges.Ranges`): (out (B, H, Lq, D),
    lse (B, H, Lq), -inf where a row reads nothing). No autograd: `range_attention_backward` is its backward."""
    return tuple(kernel().forward(q, k, v, ranges, scale, TILE_ROWS, CHUNK_KEYS))


def range_attention_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grad_out: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    ranges: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of `range_attention` given the *final* log-sum-exp `lse` (B, H, Lq) (+inf for rows that read
    nothing) and delta = rowsum(grad_out * final out) (B, H, Lq): exact when other keys share the softmax."""
    return tuple(kernel().backward(q, k, v, grad_out, lse, delta, ranges, scale, TILE_ROWS, CHUNK_KEYS))
