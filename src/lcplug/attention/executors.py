"""Executor registry and automatic choice: one pattern, many executors.

Every executor takes the same arguments — query (B, H, Lq, D), key/value (B, Hkv, Lkv, D), a
`BlockLayout`, the softmax scale, optional per-head sink logits and logit soft-cap — and returns
(B, Lq, H, D). `auto` picks the Triton kernel on CUDA when Triton is importable and the torch
block-gather executor everywhere else; asking for an executor the device cannot run falls back to the
torch executor with a warning, never to a wrong answer.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from importlib.util import find_spec

import torch

from .block_torch import block_attention

Executor = Callable[..., torch.Tensor]

EXECUTORS = ("auto", "reference", "torch", "flex", "triton")
"""Names a plugin's `executor` parameter accepts."""


def _flex(*args, **kwargs) -> torch.Tensor:
    from .block_flex import flex_block_attention

    return flex_block_attention(*args, **kwargs)


def _triton(*args, **kwargs) -> torch.Tensor:
    from .block_triton import triton_block_attention

    return triton_block_attention(*args, **kwargs)


RUNNERS: dict[str, Executor] = {"torch": block_attention, "flex": _flex, "triton": _triton}


def triton_usable(device: torch.device) -> bool:
    """Triton runs on CUDA, or on the CPU under TRITON_INTERPRET=1 (how the tests run the kernel)."""
    if find_spec("triton") is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def flex_usable(device: torch.device, needs_grad: bool = False) -> bool:
    """FlexAttention exists in this torch; on the CPU it has no backward."""
    present = find_spec("torch.nn.attention.flex_attention") is not None
    return present and not (needs_grad and device.type == "cpu")


_USABLE = {
    "torch": lambda device, needs_grad: True,
    "flex": flex_usable,
    "triton": lambda device, needs_grad: triton_usable(device),
}


def choose(executor: str, device: torch.device, needs_grad: bool = False) -> str:
    """The executor that will run: `auto` -> triton on CUDA, else torch; unusable choices fall back."""
    if executor == "auto":
        return "triton" if device.type == "cuda" and triton_usable(device) else "torch"
    if executor in _USABLE and not _USABLE[executor](device, needs_grad):
        why = "without a backward" if needs_grad and executor == "flex" else ""
        warnings.warn(
            f"executor {executor!r} cannot run on {device.type}{' ' + why if why else ''}; using 'torch'", stacklevel=3
        )
        return "torch"
    return executor
