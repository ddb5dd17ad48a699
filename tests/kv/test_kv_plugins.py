"""The kv plugins: spec parsing, manifest round trip, per-instance install and unpatch; `blocks_needed`."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import lcplug
from lcplug.attention import SlidingWindowPattern
from lcplug.errors import UnknownPluginError
from lcplug.kv import TieredCache, blocks_needed
from lcplug.plugins.attention.loza import StreamingBlocksPattern
from lcplug.testing import tiny_model

PROMPT = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(2))


def _generate(model, **kwargs):
    return model.generate(PROMPT, max_new_tokens=3, do_sample=False, return_dict_in_generate=True, **kwargs)


def test_plugins_are_listed():
    names = {row["name"] for row in lcplug.list_plugins("kv")}
    assert {"device", "host", "disk"} <= names
    assert {"lru", "reads"} <= {row["name"] for row in lcplug.list_plugins("placement")}


def test_unknown_placement_fails_at_patch_time():
    model = tiny_model("llama")
    with pytest.raises(UnknownPluginError, match=r"placement.*'lru'"):
        lcplug.patch(model, kv="host:placement=mru")
    assert lcplug.manifest_of(model) is None


def test_manifest_round_trip(tmp_path):
    model = tiny_model("llama")
    lcplug.patch(model, kv=f"disk:hot_tokens=256,block_size=32,placement=reads,quantize=int8,path={tmp_path}")
    spec = lcplug.manifest_of(model)["spec"]["kv"]
    assert spec == {
        "name": "disk",
        "block_size": 32,
        "hot_tokens": 256,
        "sink_blocks": 1,
        "recent_blocks": 1,
        "placement": "reads",
        "prefetch": True,
        "quantize": "int8",
        "path": str(tmp_path),
    }
    lcplug.save_pretrained(model, tmp_path / "ckpt")
    reloaded = lcplug.from_pretrained(tmp_path / "ckpt")
    assert lcplug.manifest_of(reloaded)["spec"]["kv"] == spec
    out = _generate(reloaded)
    assert isinstance(out.cache, TieredCache) and out.cache.tier == "disk"
    assert all(layer.block_size == 32 for layer in out.cache.layers)
    out.cache.close()


def test_unpatch_restores_default_cache():
    model = tiny_model("llama")
    expected = _generate(model)
    assert isinstance(expected.cache, DynamicCache)
    lcplug.patch(model, kv="host:hot_tokens=192")
    assert "generate" in model.__dict__
    patched = _generate(model)
    assert isinstance(patched.cache, TieredCache)
    patched.cache.close()
    lcplug.unpatch(model)
    assert "generate" not in model.__dict__
    out = _generate(model)
    assert isinstance(out.cache, DynamicCache)
    assert torch.equal(out.sequences, expected.sequences) and torch.equal(patched.sequences, expected.sequences)


def test_patch_is_per_instance():
    patched, other = tiny_model("llama"), tiny_model("llama")
    lcplug.patch(patched, kv="device")
    assert isinstance(_generate(other).cache, DynamicCache)


def test_bad_params():
    model = tiny_model("llama")
    with pytest.raises(lcplug.ParamError, match="block_size"):
        lcplug.patch(model, kv="host:block_size=48")
    with pytest.raises(lcplug.ParamError, match="unknown parameter 'path'"):
        lcplug.patch(model, kv="host:path=/tmp")
    with pytest.raises(lcplug.ParamError, match="hot blocks cannot hold"):  # at patch time, not in generate
        lcplug.patch(model, kv="host:hot_tokens=128")
    assert lcplug.patch_state(model) is None


@pytest.mark.parametrize(
    "pattern",
    [SlidingWindowPattern(window=40, sinks=3, block_size=16), StreamingBlocksPattern(1, 3, 16)],
    ids=["sliding-window", "streaming-blocks"],
)
@pytest.mark.parametrize("shift", [0, 5])
def test_blocks_needed_covers_the_pattern(pattern, shift):
    """Every key a query may see lies in a needed block, and the future retention keeps every key a later
    query may see; both stay bounded (the point of fetching by pattern)."""
    block, length = 16, 200
    num_blocks = (length + shift + block - 1) // block
    for q in range(0, length - shift):
        q_t = torch.tensor([q])
        needed = set(blocks_needed(pattern, q_t, q_t, torch.tensor([shift]), block, num_blocks))
        keys = torch.arange(q + 1)
        allowed = keys[pattern.allows(torch.tensor(q), keys)]
        assert {int(k + shift) // block for k in allowed} <= needed
        assert len(needed) <= 6  # a shift can split the sink and the local span over one more block each
        future = set(blocks_needed(pattern, q_t, q_t + 10**9, torch.tensor([shift]), block, num_blocks))
        later = torch.arange(q, length - shift)
        visible = pattern.allows(later[:, None], keys[None, :]).any(0)
        assert {int(k + shift) // block for k in keys[visible]} <= future
        assert len([b for b in future if b <= (q + shift) // block]) <= 6  # what is kept of the past is bounded
