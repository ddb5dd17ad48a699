"""A 64K-token prefill and decode through the disk tier keeps resident KV under its budget.

The model is the tiny llama with LoZA streaming blocks on layers 0 and 2 and its own dense attention on
layer 1, so both kinds of layer are exercised at length: the pattern layers hold their window, the dense
layer spills everything beyond `hot_tokens` to disk and reads it back at every step. The dense layer's
prefill is O(N^2): about 1.5 minutes on 2 cores, so the test is `slow` (run it with `pytest -m slow`);
benchmarks/kv.py measures resident KV at 128K and through a real 1M-token prefill."""

from __future__ import annotations

import pytest
import torch

import lcplug
from lcplug.kv import TieredCache
from lcplug.testing import tiny_model

LENGTH, CHUNK, HOT = 65536, 8192, 1024
BLOCK = 64


@pytest.mark.slow
def test_64k_prefill_and_decode_keep_resident_kv_under_budget(tmp_path):
    model = tiny_model("llama", max_position_embeddings=LENGTH + 64)
    lcplug.patch(model, attention=f"loza:block={BLOCK},local_blocks=4,sparse_layers=0;2")
    ids = torch.randint(3, 128, (1, LENGTH + 4), generator=torch.Generator().manual_seed(0))
    per_token = 2 * 2 * 16 * 4  # K and V, 2 KV heads of dim 16, fp32
    # dense layer: its hot budget plus one open tail; pattern layers: sink + local blocks + tail + one chunk
    budget = (HOT + BLOCK) * per_token + 2 * (BLOCK * 6 + CHUNK) * per_token
    peak = 0
    with TieredCache(model, tier="disk", hot_tokens=HOT, path=tmp_path) as cache, torch.no_grad():
        for lo in range(0, LENGTH + 4, CHUNK):
            hi = min(LENGTH + 4, lo + CHUNK)
            model(input_ids=ids[:, lo:hi], position_ids=torch.arange(lo, hi)[None], cache=cache, logits_to_keep=1)
            peak = max(peak, cache.stats()["resident_bytes"])
        stats = cache.stats()
    full = 3 * (LENGTH + 4) * per_token
    assert peak <= budget < full / 10, (peak, budget, full)
    assert stats["spilled"] >= (LENGTH - HOT) // BLOCK - 1 and stats["bytes_read"] > 0, stats
