"""Every tier on every family: greedy generation equals the default cache for dense, a static sparse pattern
and DSA's content-selected blocks, with blocks really spilled to disk."""

from __future__ import annotations

import pytest
import torch

import lcplug
from lcplug.kv import TieredCache
from lcplug.testing import FAMILIES, padded_batch, tiny_model
from lcplug.testing.models import NATIVE_ATTENTION

VARIANTS = {
    "dense": None,
    "sliding-window": "sliding-window:window=64,sinks=2,block_size=16",
    "dsa": "dsa:stage=sparse,topk=32,block_size=16,heads=2,dim=8",
}
NEW = 5


@pytest.fixture(scope="module")
def prompt():
    return padded_batch(160, seed=11, pad=5)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_disk_tier_matches_default_cache(family, variant, prompt, tmp_path):
    model = tiny_model(family, max_position_embeddings=512, attn_implementation=NATIVE_ATTENTION.get(family))
    if VARIANTS[variant]:
        lcplug.patch(model, attention=VARIANTS[variant])
    ids, mask = prompt

    def greedy(**kwargs):
        return model.generate(
            ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, **kwargs
        )

    expected = greedy()
    with TieredCache(model, tier="disk", hot_tokens=64, block_size=16, path=tmp_path) as cache:
        out = greedy(cache=cache)
        stats = cache.stats()
    assert torch.equal(out, expected)
    if variant != "sliding-window":
        assert stats["spilled"] > 0 and stats["bytes_read"] > 0, stats
