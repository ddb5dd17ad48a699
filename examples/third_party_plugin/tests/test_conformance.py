"""chunked-local against lcplug's conformance kit, over several model families, plus its defining property.

The fixtures come from lcplug's pytest plugin, active wherever lcplug is installed: `conformance`,
`lcplug_family` (parametrized by the `lcplug_families` marker) and `tiny_model_factory`.
"""

from __future__ import annotations

import pytest
import torch

import lcplug

FAMILIES = ("llama", "qwen3", "gemma3_text")
"""Plain GQA; QK-norm; the model's own sliding layers with per-layer-type RoPE."""


@pytest.mark.lcplug_families(*FAMILIES)
def test_conforms(conformance, lcplug_family):
    report = conformance("attention", "chunked-local:chunk=8", lcplug_family)
    assert [r.status for r in report.results] == ["pass"] * 4, report


def test_conforms_with_chunks_across_blocks(conformance):
    """Chunks of 5 over blocks of 16: chunk boundaries fall inside blocks and blocks span chunks."""
    conformance("attention", "chunked-local:chunk=5,block_size=16")


def test_conforms_on_a_hybrid_schedule(conformance):
    """Chunked layers next to the model's own full layers (Llama 4 interleaves them)."""
    conformance("attention", "chunked-local:chunk=8", layers="2:1", checks=("round_trip", "reference"))


@pytest.mark.lcplug_families("llama", "qwen3")
def test_no_information_crosses_a_chunk(tiny_model_factory, lcplug_family):
    """With every layer chunked, a token in chunk 0 cannot change any logit of chunk 1 or 2."""
    model = lcplug.patch(tiny_model_factory(lcplug_family), attention="chunked-local:chunk=8")
    ids = torch.randint(3, 128, (1, 24), generator=torch.Generator().manual_seed(0))
    edited = ids.clone()
    edited[0, 3] = (ids[0, 3] + 1) % 128
    with torch.no_grad():
        a, b = model(ids).logits, model(edited).logits
    assert not torch.allclose(a[0, 3:8], b[0, 3:8])
    torch.testing.assert_close(a[0, 8:], b[0, 8:], rtol=0, atol=1e-6)


def test_a_chunk_longer_than_the_sequence_is_full_attention(tiny_model_factory):
    model = tiny_model_factory("llama")
    ids = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits
        lcplug.patch(model, attention="chunked-local:chunk=64")
        chunked = model(ids).logits
    torch.testing.assert_close(chunked, full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("bad", ["chunk=0", "block_size=12", "executor=fastest", "chunks=8"])
def test_bad_params_are_refused_by_name(tiny_model_factory, bad):
    with pytest.raises(lcplug.ParamError, match=bad.split("=")[0]):
        lcplug.patch(tiny_model_factory("llama"), attention=f"chunked-local:{bad}")
