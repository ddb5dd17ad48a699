"""Prefetch: read the next dense layer's spilled blocks on a worker thread while this layer computes.

A dense layer reads every block it holds at each step, so which blocks it will need next is known in
advance: all of its spilled ones. While layer i runs (its gather, attention and MLP), one worker thread
reads layer i+1's spilled blocks from the lower tier (mmap reads and CRC checks release the GIL), so the
read overlaps compute. Double buffering: at most one layer is being read ahead while another consumes
what was read for it. Reads land in host memory; the layer moves them to its device when it takes them.
A failed read raises in the layer that takes it, as a direct read would.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .layer import TieredLayer


class Prefetcher:
    """Reads ahead for the prefetchable layers among `layers` (indexed like the cache's layers)."""

    def __init__(self, layers: list[TieredLayer]):
        self.layers = layers
        self.order = [i for i, layer in enumerate(layers) if layer.prefetchable]
        self.pending: dict[int, Future] = {}
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lcplug-kv-prefetch")

    def advance(self, idx: int) -> None:
        """Layer `idx` is about to update: hand it the blocks read for it, and start reading for the next one."""
        future = self.pending.pop(idx, None)
        if future is not None:
            self.layers[idx].staged = future.result()
        if not self.order:
            return
        later = [i for i in self.order if i > idx]
        nxt = later[0] if later else self.order[0]
        if nxt != idx and nxt not in self.pending:
            self.pending[nxt] = self.pool.submit(self.layers[nxt].read_spilled)

    def close(self) -> None:
        """Stop reading ahead; waits for a read in flight (it holds a store open)."""
        for future in self.pending.values():
            future.cancel()
        self.pool.shutdown(wait=True)
        self.pending.clear()
