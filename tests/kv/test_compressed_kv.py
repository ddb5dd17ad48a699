"""Compressed layers (ksa, csa, hca) in the KV tiers: the cache keeps raw only the layer's window and open
entry windows, pools each entry once, and the tokens are those of the default cache, which keeps every raw
token and lets the layer pool afresh at every call.

Tiny Llama (layers 0 and 2 compressed, layer 1 dense, so host and disk tiers spill something), fp32,
pooling weights moved off their neutral start so wrong pooling shows; a left-padded batch of two rows.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import DynamicCache

import lcplug
from lcplug.attention.compress import find_entries
from lcplug.attention.compressed import compressed_layers
from lcplug.kv import KVCacheError, TieredCache
from lcplug.testing import padded_batch, perturb_added, tiny_model

ATTENTION = {
    "ksa": "ksa:chunk=4,window=3,block_size=8",
    "hca": "hca:size=16,window=10,block_size=8,learnable_sink=true",
    "csa": "csa:size=8,stride=4,window=10,topk=6,heads=2,dim=8,block_size=8",  # fewer top-k than visible entries
}
COMPRESSED = [0, 2]  # layer 1 keeps the model's own attention
TIER_SPECS = {
    "device": "device",
    "host": "host:hot_tokens=64,block_size=16",
    "disk": "disk:hot_tokens=64,block_size=16",
}
PROMPT, NEW = 150, 10
TOL = 1e-5


@pytest.fixture(scope="module")
def prompt():
    return padded_batch(PROMPT, seed=3, pad=7)


def _model(variant: str, family: str = "llama", kv: str | None = None):
    model = tiny_model(family, max_position_embeddings=1024)
    lcplug.patch(model, attention=ATTENTION[variant], layers=COMPRESSED, kv=kv)
    return perturb_added(model, 0.5)


def _greedy(model, prompt, **kwargs):
    ids, mask = prompt
    return model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=NEW,
        min_new_tokens=NEW,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        **kwargs,
    )


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids as `generate` counts them: from each row's first real token (pads: 1)."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


def _compressed(cache: TieredCache):
    return [cache.layers[i] for i in COMPRESSED]


@pytest.mark.parametrize("variant", ATTENTION)
@pytest.mark.parametrize("tier", TIER_SPECS)
def test_generate_through_each_tier_equals_default_cache(tier, variant, prompt, tmp_path):
    model = _model(variant, kv=TIER_SPECS[tier] + (f",path={tmp_path}" if tier == "disk" else ""))
    expected = _greedy(model, prompt, cache=DynamicCache(config=model.config))  # the layer pools afresh
    out = _greedy(model, prompt)  # the kv plugin's cache
    assert isinstance(out.cache, TieredCache) and out.cache.tier == tier
    assert torch.equal(out.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(expected.logits), rtol=0, atol=TOL)
    for layer in _compressed(out.cache):
        s = layer.stats()
        assert s["dropped"] > 0 and s["spilled"] == 0 and s["entries"] > 0, s  # raw gone, entries kept
    if tier != "device":
        dense = out.cache.layers[1].stats()
        assert dense["spilled"] > 0 and dense["bytes_read"] > 0, dense  # the dense layer really used the tier
    out.cache.close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
@pytest.mark.parametrize("variant", ATTENTION)
def test_the_model_own_sliding_layers_and_softcap(variant, family, prompt):
    """Gemma's own sliding layers (window 8) hide entries the compressed window would show: the layer ANDs
    the model's mask at the cached entries' slots, as it does for entries it pools itself (Gemma-2 also
    soft-caps its logits)."""
    model = _model(variant, family=family, kv="device")
    expected = _greedy(model, prompt, cache=DynamicCache(config=model.config))
    out = _greedy(model, prompt)
    assert torch.equal(out.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(expected.logits), rtol=0, atol=TOL)
    assert all(layer.stats()["dropped"] > 0 for layer in _compressed(out.cache))
    out.cache.close()


@pytest.mark.parametrize("variant", ATTENTION)
def test_chunked_prefill_then_decode(variant, prompt):
    """A prefill in chunks that end mid-entry (37, 50, 3, rest) gives the one-pass logits at every real
    token, and generation continued from that cache equals the default cache's."""
    ids, mask = prompt
    model = _model(variant)
    positions = _positions(mask)
    with torch.no_grad():
        whole = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        with TieredCache(model, tier="device") as cache:
            bounds = [0, 37, 87, 90, PROMPT - 1]
            for lo, hi in itertools.pairwise(bounds):
                part = model(
                    input_ids=ids[:, lo:hi],
                    attention_mask=mask[:, :hi],
                    position_ids=positions[:, lo:hi],
                    cache=cache,
                    use_cache=True,
                ).logits
                real = mask[:, lo:hi].bool()
                assert (part - whole[:, lo:hi])[real].abs().max() < TOL, (lo, hi)
            assert all(layer.stats()["dropped"] > 0 for layer in _compressed(cache))
            out = _greedy(model, prompt, cache=cache)
    expected = _greedy(model, prompt, cache=DynamicCache(config=model.config))
    assert torch.equal(out.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(expected.logits), rtol=0, atol=TOL)


@pytest.mark.parametrize("variant", ATTENTION)
def test_cached_entries_equal_entries_pooled_from_all_raw_tokens(variant, prompt):
    """Every entry the cache holds (and CSA's indexer keys of it) equals the entry the layer pools from the
    whole raw K/V, which the default cache keeps: none is stale (pooled before its window completed), none
    missing, none at the wrong row or position."""
    model = _model(variant, kv="device")
    out = _greedy(model, prompt)
    seq = out.sequences[:, :-1]  # what the cache holds: the last token was never fed back
    full_mask = torch.cat([prompt[1], torch.ones(2, seq.shape[1] - PROMPT, dtype=prompt[1].dtype)], dim=1)
    raw = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=seq, attention_mask=full_mask, position_ids=_positions(full_mask), cache=raw)
    kv_pos = torch.arange(seq.shape[1]) - (1 - full_mask).sum(-1, keepdim=True)  # 0 at each row's first real token
    for idx, attention, layer in zip(COMPRESSED, compressed_layers(model), _compressed(out.cache)):
        g = attention.geometry
        want = find_entries(kv_pos, g.size, g.stride)
        with torch.no_grad():
            ck, cv = attention.compressor(raw.layers[idx].keys, raw.layers[idx].values, want)
        held = layer.entries.view(layer.length)
        assert torch.equal(held.entries.valid, want.valid) and torch.equal(
            held.entries.start[want.valid], want.start[want.valid]
        )
        assert torch.equal(held.entries.slots[want.valid], want.slots[want.valid])
        valid = want.valid[:, None, :, None]
        torch.testing.assert_close(held.keys * valid, ck * valid, rtol=0, atol=TOL)
        torch.testing.assert_close(held.values * valid, cv * valid, rtol=0, atol=TOL)
        if attention.indexer is not None:
            index = attention.indexer.keys(ck)
            torch.testing.assert_close(
                held.index_keys * want.valid[..., None], index * want.valid[..., None], atol=TOL, rtol=0
            )
    out.cache.close()


@pytest.mark.parametrize("variant", ATTENTION)
def test_the_layer_reads_the_cached_entries(variant, prompt):
    """Changing the stored entries changes the next step's logits: the layer attends to the cache's entries
    and pools nothing itself (the raw tokens behind them are gone anyway)."""
    ids, mask = prompt
    model = _model(variant)
    positions = _positions(mask)
    with torch.no_grad():
        whole = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
        last = {}
        for tampered in (False, True):
            with TieredCache(model, tier="device") as cache:
                model(ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1], cache=cache)
                if tampered:
                    cache.layers[0].entries.values.add_(1.0)
                step = model(ids[:, -1:], attention_mask=mask, position_ids=positions[:, -1:], cache=cache)
                last[tampered] = step.logits[:, -1]
    assert (last[False] - whole).abs().max() < TOL
    assert (last[True] - whole).abs().max() > 1e-2


DEFAULTS = {"ksa": "ksa", "csa": "csa:heads=4,dim=16", "hca": "hca"}  # published geometries, block_size 64


def _fill(cache: TieredCache, config, bounds: list[int], seed: int = 0):
    """Store random K/V for tokens [bounds[i], bounds[i+1]) of one unpadded row through `cache.update`, as the
    attention layers would; yield the length after each chunk."""
    gen = torch.Generator().manual_seed(seed)
    for lo, hi in itertools.pairwise(bounds):
        shape = (1, config.num_key_value_heads, hi - lo, config.head_dim)
        for layer in range(config.num_hidden_layers):
            cache.update(
                torch.randn(shape, generator=gen),
                torch.randn(shape, generator=gen),
                layer,
                kwargs={"position_ids": torch.arange(lo, hi)[None]},
            )
        yield hi


def _raw_start(g, n: int) -> int:
    """First position a layer with geometry `g` must still hold raw after `n` tokens: where the next query's
    raw window starts, or the first entry window not yet complete, whichever is earlier."""
    window_start = (n // g.chunk - g.window + 1) * g.chunk
    return max(0, min(window_start, g.entries_at(n) * g.stride))


@pytest.mark.parametrize("variant", DEFAULTS)
def test_resident_bytes_are_the_raw_window_plus_entries(variant):
    """After each chunk the layer holds exactly the raw blocks from `_raw_start` on (every older one gone),
    the open tail and one entry per complete window: `kv_bytes_per_token` (an upper bound: it counts a whole
    open window) to within one block of raw tokens (and, for KSA, the summaries of the chunks still in the
    raw window, which the formula leaves out), while the dense layer 1 holds every token."""
    model = tiny_model("llama", max_position_embeddings=8192)
    lcplug.patch(model, attention=DEFAULTS[variant], layers=COMPRESSED)
    attention = compressed_layers(model)[0]
    g, bs = attention.geometry, attention.block_size
    per_raw = attention.dense_kv_bytes_per_token(4)  # fp32
    per_entry = per_raw + (attention.indexer.dim * 4 if attention.indexer is not None else 0)
    with TieredCache(model, tier="device") as cache:
        for n in _fill(cache, model.config, [0, 700, 701, 1900, 3001, 4096]):
            first = _raw_start(g, n) // bs
            entries = g.entries_at(n)
            resident = (n - first * bs) * per_raw + entries * per_entry
            formula = attention.kv_bytes_per_token(n, 4) * n
            unlisted = (entries - attention.entries_kept(n)) * per_entry
            assert formula - (g.size + bs) * per_raw <= resident <= formula + bs * per_raw + unlisted, (n, resident)
            for layer in _compressed(cache):
                assert sorted(layer.hot) == list(range(first, n // bs)), (n, sorted(layer.hot))
                assert layer.stats()["dropped"] == first and layer.entries.count == entries
                assert layer.resident_bytes() == resident
                if first:
                    with pytest.raises(KVCacheError, match="dropped"):
                        layer.fetch([first - 1])
            assert cache.layers[1].resident_bytes() == n * per_raw  # the dense layer: every token


def test_positions_the_entries_cannot_follow_are_refused():
    """Entries sit on positions counted one per slot from a row's first real token: positions that restart
    or jump (packed rows, custom ids), start beyond the slots or are missing raise instead of misplacing
    entries; the cache checks what it is given, the layer the positions of its first (uncached) call."""
    model = _model("hca")
    config = model.config
    shape = (1, config.num_key_value_heads, 20, config.head_dim)
    k, v = torch.randn(shape), torch.randn(shape)
    with TieredCache(model, tier="device") as cache:
        cache.update(k, v, 0, kwargs={"position_ids": torch.arange(20)[None]})
        with pytest.raises(KVCacheError, match=r"row 0 has position 0 at slot 20 \(expected 20\)"):
            cache.update(k[:, :, :5], v[:, :, :5], 0, kwargs={"position_ids": torch.arange(5)[None]})
    with TieredCache(model, tier="device") as cache, pytest.raises(KVCacheError, match="count from 0"):
        cache.update(k, v, 0, kwargs={"position_ids": torch.arange(100, 120)[None]})
    with TieredCache(model, tier="device") as cache, pytest.raises(KVCacheError, match="pass position_ids"):
        cache.update(k, v, 0)
    packed = torch.cat([torch.arange(24), torch.arange(16)])[None]  # two documents in one row
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    with TieredCache(model, tier="device") as cache, pytest.raises(RuntimeError, match="packed rows"):
        model(input_ids=ids, position_ids=packed, cache=cache)


def test_saving_compressed_entries_is_refused_and_leaves_nothing(prompt, tmp_path):
    model = _model("csa", kv="device")
    out = _greedy(model, prompt)
    with pytest.raises(KVCacheError, match="layer 0 is compressed attention"):
        out.cache.save(tmp_path / "saved")
    assert list(tmp_path.iterdir()) == []
    out.cache.close()


def test_nsa_keeps_every_raw_token_and_pools_afresh(prompt):
    """NSA's selection branch may read any raw block: the cache treats it as dense (no entries, nothing
    dropped) and the layer pools from the full K/V, so generation equals the default cache's."""
    model = tiny_model("llama", max_position_embeddings=1024)
    lcplug.patch(
        model, attention="nsa:size=4,stride=2,select_block=4,select_count=4,window=5,block_size=4", kv="device"
    )
    expected = _greedy(model, prompt, cache=DynamicCache(config=model.config))
    out = _greedy(model, prompt)
    assert torch.equal(out.sequences, expected.sequences)
    stats = out.cache.stats()
    assert stats["entries"] == 0 and stats["dropped"] == 0, stats
    out.cache.close()
