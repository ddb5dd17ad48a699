"""Greedy generation through every KV tier equals the default cache, token for token, with blocks really
spilled (dense layers) or dropped (pattern layers), on a left-padded batch."""

from __future__ import annotations

import pytest
import torch

import lcplug
from lcplug.kv import TieredCache
from lcplug.testing import padded_batch, tiny_model

ATTENTION = {
    "dense": None,
    "sliding-window": "sliding-window:window=96,sinks=4,block_size=32",
    "loza": "loza:block=32,local_blocks=3,sparse_layers=0;2",  # layer 1 stays dense: both kinds in one model
    "dsa": "dsa:stage=sparse,topk=64,block_size=32,heads=2,dim=8",  # content-selected blocks, fetched on demand
}
TIER_SPECS = {"device": "device", "host": "host:hot_tokens=192", "disk": "disk:hot_tokens=192"}
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def prompt():
    return padded_batch(300, seed=3, pad=7)


def _model(attention: str | None):
    model = tiny_model("llama", max_position_embeddings=1024)
    return lcplug.patch(model, attention=attention) if attention else model


def _greedy(model, prompt, **kwargs):
    ids, mask = prompt
    return model.generate(
        ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, **kwargs
    )


@pytest.mark.parametrize("variant", ATTENTION)
@pytest.mark.parametrize("tier", TIER_SPECS)
def test_patched_tier_matches_default_cache(tier, variant, prompt, tmp_path):
    model = _model(ATTENTION[variant])
    expected = _greedy(model, prompt, output_logits=True, return_dict_in_generate=True)
    spec = TIER_SPECS[tier] + (f",path={tmp_path}" if tier == "disk" else "")
    lcplug.patch(model, attention=ATTENTION[variant], kv=spec)
    out = _greedy(model, prompt, output_logits=True, return_dict_in_generate=True)
    assert isinstance(out.cache, TieredCache) and out.cache.tier == tier
    assert torch.equal(out.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(expected.logits), rtol=0, atol=1e-5)
    stats = out.cache.stats()
    if tier != "device" and variant != "sliding-window":
        assert stats["spilled"] > 0 and stats["bytes_read"] > 0, stats  # lower tiers were really read
    if variant in ("sliding-window", "loza"):
        assert stats["dropped"] > 0, stats  # pattern layers keep only what they can still read
    out.cache.close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
@pytest.mark.parametrize("name", ["past_key_values", "cache"])
def test_cache_passed_directly(name, prompt, tmp_path):
    model = _model(ATTENTION["loza"])
    expected = _greedy(model, prompt)
    with TieredCache(model, tier="disk", hot_tokens=192, path=tmp_path) as cache:
        out = _greedy(model, prompt, **{name: cache})
        assert cache.stats()["spilled"] > 0
    assert torch.equal(out, expected)
    assert list(tmp_path.iterdir()) == []
