"""Engram: a hashed n-gram memory added to chosen layers' residual stream (arXiv:2601.07372).

At each position t of a memory layer, with h_t the residual stream entering the layer:
  e_t = concat over orders n and hash heads k of E_{n,k}[hash_{n,k}(x_{t-n+1..t})]   (O(1) lookups)
  a_t = sigmoid(RMSNorm(h_t) . RMSNorm(W_key e_t) / sqrt(d))                           (context-aware gate)
  u_t = a_t * W_value e_t
  h_t <- h_t + u_t + SiLU(causal depthwise conv(u)_t)                                  (short conv, kernel w)
W_value, the memory's output projection, starts at zero, so patching alone changes nothing.

Decoding needs what came before the step: the last max(order) - 1 token ids (for the n-grams) and, per
layer, the last w - 1 gated values (for the convolution). `EngramRuntime` keeps both per cache object, so a
step through a cache computes exactly what one prefill of the whole sequence does; a forward without a
cache starts from nothing.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LcplugError
from .hashing import NgramHash
from .tables import HashedTables


class EngramError(LcplugError, ValueError):
    """A forward an n-gram memory cannot serve (no token ids to hash)."""


class EngramMemory(nn.Module):
    """One layer's memory: hash -> tables -> gate -> short conv; `forward` returns what to add to the stream."""

    def __init__(
        self, hidden: int, *, orders: list[int], heads: int, size: int, dim: int, kernel: int, placement: str, seed: int
    ):
        super().__init__()
        self.hash = NgramHash(orders, heads, size, seed)
        slots = len(orders) * heads
        self.tables = HashedTables(slots * size, dim, placement, seed + 1)
        self.key = nn.Linear(slots * dim, hidden, bias=False)
        self.value = nn.Linear(slots * dim, hidden, bias=False)
        nn.init.zeros_(self.value.weight)
        self.norm_hidden, self.norm_key = nn.RMSNorm(hidden), nn.RMSNorm(hidden)
        self.conv = nn.Conv1d(hidden, hidden, kernel, groups=hidden, bias=False)
        self.kernel = kernel

    def forward(
        self, hidden: torch.Tensor, window: torch.Tensor, past: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden (B, L, d), `window` ids (see `NgramHash`), `past` the last kernel - 1 gated values (B, w-1, d)
        or None -> (the addition to the stream (B, L, d), the new `past`)."""
        rows = self.tables.lookup(self.hash(window))  # (B, L, slots, dim)
        memory = rows.flatten(2).to(hidden.dtype)
        key = self.norm_key(self.key(memory))
        gate = torch.sigmoid((self.norm_hidden(hidden) * key).sum(-1, keepdim=True) / hidden.shape[-1] ** 0.5)
        gated = gate * self.value(memory)
        if past is None:
            past = gated.new_zeros(gated.shape[0], self.kernel - 1, gated.shape[-1])
        full = torch.cat((past, gated), dim=1)
        conv = self.conv(full.transpose(1, 2)).transpose(1, 2)  # (B, L, d): valid positions only
        return gated + F.silu(conv), full[:, full.shape[1] - (self.kernel - 1) :]


@dataclass
class _History:
    """What one cache carries across steps: the last ids and each layer's last gated values."""

    ids: torch.Tensor | None = None
    conv: dict[int, torch.Tensor] = field(default_factory=dict)


class EngramRuntime:
    """Per-instance hooks: the model's pre-hook records this forward's ids and cache; each memory layer's
    pre-hook adds its memory to the hidden states entering the layer."""

    def __init__(self, context: int):
        self.context = context
        self._histories: weakref.WeakKeyDictionary[Any, _History] = weakref.WeakKeyDictionary()
        self._window: torch.Tensor | None = None
        self._history: _History | None = None

    def model_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise EngramError(
                "engram: the model was called without input_ids (inputs_embeds only); the n-gram memory hashes "
                "token ids, so pass input_ids"
            )
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        history = None
        if cache is not None:
            history = self._histories.get(cache)
            if history is None or not cache.get_seq_length():
                history = self._histories[cache] = _History()
        before = ids.new_full((ids.shape[0], self.context), -1)
        if history is not None and history.ids is not None:
            before = history.ids
        window = torch.cat((before, ids), dim=1)
        if history is not None:
            history.ids = window[:, window.shape[1] - self.context :]
        self._window, self._history = window, history

    def layer_pre_hook(self, layer_idx: int, memory: EngramMemory):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            past = None if self._history is None else self._history.conv.get(layer_idx)
            added, tail = memory(hidden, self._window.to(hidden.device), past)
            if self._history is not None:
                self._history.conv[layer_idx] = tail.detach()
            hidden = hidden + added
            if "hidden_states" in kwargs:
                return args, {**kwargs, "hidden_states": hidden}
            return (hidden, *args[1:]), kwargs

        return hook
