"""Layers that read few blocks get only those blocks: compact K/V, never full-length tensors, and lower-tier
reads bounded by the pattern (sliding window) or the selection (DSA top-k), with the tokens unchanged."""

from __future__ import annotations

import pytest
import torch

import lcplug
from lcplug.attention import stream
from lcplug.attention.compact import compact_of
from lcplug.attention.dispatch import SUBMODULE
from lcplug.kv import TieredCache
from lcplug.patching import choose_adapter
from lcplug.testing import padded_batch, tiny_model
from lcplug.testing.models import NATIVE_ATTENTION

PROMPT, NEW = 600, 6
DSA = "dsa:stage=sparse,topk=64,block_size=32,heads=2,dim=8"


def _model(attention: str):
    return lcplug.patch(tiny_model("llama", max_position_embeddings=1024), attention=attention)


def _record_keys(model) -> list[tuple[int, int]]:
    """(keys received, keys the mask covers) per attention call, from a hook on each lcplug layer."""
    seen: list[tuple[int, int]] = []
    for module in choose_adapter(model).attention_modules(model).values():
        module._modules[SUBMODULE].register_forward_pre_hook(
            lambda _m, args: seen.append((args[2].shape[-2], args[4].kv_length))
        )
    return seen


def _generate(model, prompt, **kwargs):
    ids, mask = prompt
    return model.generate(ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, **kwargs)


@pytest.fixture(scope="module")
def prompt():
    return padded_batch(PROMPT, seed=5, pad=9)


def test_sliding_window_layers_receive_only_their_window(prompt):
    model = _model("sliding-window:window=96,sinks=4,block_size=32")
    expected = _generate(model, prompt)
    seen = _record_keys(model)
    with TieredCache(model, tier="device") as cache:
        out = _generate(model, prompt, cache=cache)
    assert torch.equal(out, expected)
    decode = seen[-3 * (NEW - 1) :]  # 3 layers per step
    # sink block + window blocks + the open tail: a bounded read, whatever the context length
    assert all(received <= 32 + 96 + 2 * 32 < total for received, total in decode), decode


def test_dsa_reads_only_the_selected_blocks_from_disk(prompt, tmp_path):
    model = _model(DSA)
    expected = _generate(model, prompt)
    seen = _record_keys(model)
    with TieredCache(model, tier="disk", hot_tokens=128, path=tmp_path) as cache:
        out = _generate(model, prompt, cache=cache)
        stats = cache.stats()
        block_bytes = 2 * 2 * 32 * 16 * 4 * 2  # batch 2 x 2 KV heads x 32 tokens x head dim 16, fp32, K and V
    assert torch.equal(out, expected)
    decode = seen[-3 * (NEW - 1) :]
    assert all(received < 32 for received, _ in decode), decode  # the layer starts from the open tail alone
    assert stats["spilled"] > 0
    # prefill reads what it selects; each decode step at most topk // block_size blocks per layer and row
    per_step_cap = 3 * 2 * (64 // 32) * block_bytes
    prefill_cap = 3 * (PROMPT + 9) // 32 * block_bytes
    assert stats["bytes_read"] <= prefill_cap + NEW * per_step_cap, stats


@pytest.mark.parametrize("family", ["llama", "gemma2"])  # gemma2: the model's own sliding layers and soft-capping
def test_dense_layers_stream_spilled_blocks(family, prompt, tmp_path, monkeypatch):
    """Layers on the model's own attention get the blocks held hot and stream the spilled ones from disk in
    parts merged by log-sum-exps (2 blocks per part here), equal to the default cache."""
    monkeypatch.setattr(stream, "CHUNK_BLOCKS", 2)
    model = lcplug.patch(
        tiny_model(family, max_position_embeddings=1024, attn_implementation=NATIVE_ATTENTION.get(family)),
        attention="full",
    )
    ids, mask = prompt
    expected = model.generate(
        ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    seen = _record_keys(model)
    parts = []
    real = stream.merge_partials
    monkeypatch.setattr(stream, "merge_partials", lambda p, like: parts.append(len(p)) or real(p, like))
    with TieredCache(model, tier="disk", hot_tokens=128, block_size=32, path=tmp_path) as cache:
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=NEW,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            cache=cache,
        )
    assert torch.equal(out.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(expected.logits), rtol=0, atol=1e-5)
    decode = seen[-3 * (NEW - 1) :]
    assert all(received <= 128 + 32 < total for received, total in decode), decode  # hot blocks + tail only
    assert parts and min(parts) > 2, parts  # several streamed parts per call


def test_compact_keys_that_lose_their_tag_fail_loudly():
    keys = torch.zeros(1, 2, 10, 4)
    with pytest.raises(RuntimeError, match="lost its block map"):
        compact_of(keys, 64)
    assert compact_of(keys, 10) is None


def test_a_pattern_layer_without_compact_reads_gets_full_length_kv_with_zeros_where_it_never_looks():
    from lcplug.attention import SlidingWindowPattern
    from lcplug.attention.compact import LayerAccess
    from lcplug.kv import TieredLayer

    pattern = SlidingWindowPattern(window=40, sinks=2, block_size=8)
    layer = TieredLayer(0, 8, LayerAccess(pattern=pattern, block_size=8, compact=False))
    keys, values = torch.randn(1, 2, 100, 4), torch.randn(1, 2, 100, 4)
    layer.update(keys[:, :, :99], values[:, :, :99], kwargs={"position_ids": torch.arange(99)[None]})
    k, v = layer.update(keys[:, :, 99:], values[:, :, 99:], kwargs={"position_ids": torch.tensor([[99]])})
    assert k.shape[-2] == 100 and compact_of(k, 100) is None  # full length, as the mask expects
    read = torch.zeros(100, dtype=torch.bool)
    read[:8] = read[56:] = True  # the sink block and blocks 7.. (window 60..99), block-aligned
    assert torch.equal(k[..., read, :], keys[..., read, :]) and torch.equal(v[..., read, :], values[..., read, :])
    assert not k[..., ~read, :].any() and not v[..., ~read, :].any()
