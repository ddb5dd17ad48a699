"""Every family adapter: `full` is an exact pass-through; `sliding-window` equals an independent reference.

The reference for a sparse pattern is the *unpatched* model fed a hand-built 4D additive mask
(causal & window & sinks & padding, on positions counted from each row's first real token), so
transformers' own attention computes it. fp32; tolerance 1e-5 on logits (2e-5 for Gemma's soft-capping).
"""

from __future__ import annotations

import pytest
import torch

import lcplug
from lcplug.testing import FAMILIES, decode_prefill_gap, logits, tiny_model

ALL = list(FAMILIES)
TOL = 2e-5


@pytest.mark.parametrize("family", ALL)
def test_full_is_bit_identical_and_unpatch_restores(family, batch):
    ids, mask = batch
    model = tiny_model(family)
    ref = logits(model, ids, mask)
    lcplug.patch(model, attention="full")
    assert model.config._attn_implementation == "lcplug"
    assert torch.equal(logits(model, ids, mask), ref)
    lcplug.unpatch(model)
    assert torch.equal(logits(model, ids, mask), ref)
    assert not any("lcplug" in n for n, _ in model.named_modules())


@pytest.mark.parametrize("family", ALL)
def test_full_greedy_generate_equals_unpatched(family, batch):
    ids, mask = batch
    model = tiny_model(family)
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        lcplug.patch(model, attention="full")
        out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, ref)


def reference_mask(model, mask, window, sinks, own_window=None):
    """Additive (B, 1, L, L) mask: causal, sliding window + sinks on row positions, padding, own window."""
    length = mask.shape[1]
    start = (mask == 0).sum(-1)  # left padding per row
    pos = torch.arange(length)[None] - start[:, None]  # (B, L)
    q, k = pos[:, :, None], pos[:, None, :]
    idx = torch.arange(length)
    allowed = (idx[None, :, None] >= idx[None, None, :]) & (((q - k) < window) | (k < sinks))
    allowed = allowed & mask.bool()[:, None, :]
    if own_window is not None:
        allowed = allowed & ((idx[None, :, None] - idx[None, None, :]) < own_window)
    add = torch.zeros(allowed.shape, dtype=torch.float32)
    add.masked_fill_(~allowed, torch.finfo(torch.float32).min)
    return add[:, None]


@pytest.mark.parametrize("family", ALL)
def test_sliding_window_matches_reference(family, batch):
    ids, mask = batch
    model = tiny_model(family)
    window, sinks = 6, 2
    config = model.config
    if getattr(config, "layer_types", None) and "sliding_attention" in config.layer_types:
        ref_mask = {
            "full_attention": reference_mask(model, mask, window, sinks),
            "sliding_attention": reference_mask(model, mask, window, sinks, own_window=config.sliding_window),
        }
    else:
        ref_mask = reference_mask(model, mask, window, sinks)
    with torch.no_grad():
        ref = model(ids, attention_mask=ref_mask).logits
    lcplug.patch(model, attention=f"sliding-window:window={window},sinks={sinks}")
    out = logits(model, ids, mask)
    real = mask.bool()
    assert (out - ref)[real].abs().max() < TOL
    dense = logits(tiny_model(family), ids, mask)
    assert (out - dense)[real].abs().max() > 1e-4, "the pattern must change something at length 20"


@pytest.mark.parametrize("family", ALL)
def test_sliding_window_decode_equals_prefill(family, batch):
    ids, mask = batch
    model = tiny_model(family)
    lcplug.patch(model, attention="sliding-window:window=5,sinks=2")
    assert decode_prefill_gap(model, ids, mask, 6) < TOL


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "qwen2_moe"])
def test_layer_selection_only_touches_chosen_layers(family):
    model = tiny_model(family)
    lcplug.patch(model, attention="sliding-window:window=4", layers="0,2")
    kinds = {
        i: type(m.lcplug_attention).__name__
        for i, m in lcplug.patch_state(model).adapter.attention_modules(model).items()
    }
    assert kinds == {0: "PatternAttention", 1: "NativeAttention", 2: "PatternAttention"}
