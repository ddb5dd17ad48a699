"""`engram`: zero-init identity, decode equals prefill through the per-cache history, gradients reach the
tables, device / host / disk placements agree, save/load round trip, the `memory` training group."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lcplug
from lcplug.errors import ConflictError, ParamError
from lcplug.memory import EngramMemory
from lcplug.memory.engram import EngramError
from lcplug.plugins.memory.engram import memory_parameters
from lcplug.testing import decode_prefill_gap, logits, tiny_model
from lcplug.train import StageConfig
from lcplug.train.trainables import Trainee, select_trainables

SPEC = {"name": "engram", "memory_layers": [0, 2], "table_size": 101, "dim": 8, "heads": 2, "orders": [2, 3]}


def memories(model) -> list[EngramMemory]:
    return [m for m in model.modules() if isinstance(m, EngramMemory)]


def switch_on(model) -> None:
    """Give the zero-initialised output projections values, as training would."""
    with torch.no_grad():
        for i, memory in enumerate(memories(model)):
            memory.value.weight.copy_(
                torch.randn(memory.value.weight.shape, generator=torch.Generator().manual_seed(i))
            )


@pytest.mark.parametrize("family", ["llama", "qwen2_moe"])
def test_patching_alone_changes_nothing_and_unpatch_restores(family, batch):
    ids, mask = batch
    model = tiny_model(family)
    before = logits(model, ids, mask)
    lcplug.patch(model, attention=SPEC)
    assert torch.equal(logits(model, ids, mask), before)
    switch_on(model)
    assert not torch.allclose(logits(model, ids, mask), before)
    lcplug.unpatch(model)
    assert torch.equal(logits(model, ids, mask), before)
    assert not model._forward_pre_hooks and not any(layer._forward_pre_hooks for layer in model.model.layers)


@pytest.mark.parametrize("attention", ["full", {"name": "mla", "rank": 24, "rope_dims": 4}])
def test_decode_equals_prefill_through_the_ngram_and_conv_history(attention, batch):
    ids, mask = batch
    model = lcplug.patch(tiny_model("llama"), attention={**SPEC, "attention": attention})
    switch_on(model)
    assert decode_prefill_gap(model, ids, mask, 6) < 2e-5


def test_gradients_reach_the_hashed_table_rows():
    model = lcplug.patch(tiny_model("llama"), attention=SPEC)
    switch_on(model)
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    model(ids).logits.pow(2).mean().backward()
    memory = memories(model)[0]
    window = torch.cat((ids.new_full((2, memory.hash.context), -1), ids), dim=1)
    hashed = set(memory.hash(window).flatten().tolist())
    touched = set(memory.tables.weight.grad.abs().sum(-1).nonzero().flatten().tolist())
    assert touched and touched <= hashed
    assert all(p.grad is not None for p in memory.parameters())


def test_placements_agree_and_disk_rows_are_a_mapped_file(batch):
    ids, mask = batch
    outs = {}
    for placement in ("device", "host", "disk"):
        model = lcplug.patch(tiny_model("llama"), attention={**SPEC, "placement": placement})
        switch_on(model)
        outs[placement] = logits(model, ids, mask)
    assert torch.equal(outs["device"], outs["host"]) and torch.equal(outs["device"], outs["disk"])
    tables = memories(model)[0].tables
    memories(model)[0].tables.weight[5] = 7.0  # the buffer is the mapped file: a write lands in it
    assert "weight" in tables._buffers and (np.load(tables.path, mmap_mode="r")[5] == 7.0).all()
    assert not any(p is tables.weight for p in memory_parameters(model))


@pytest.mark.parametrize("placement", ["device", "disk"])
def test_save_and_reload_round_trip(placement, tmp_path):
    model = lcplug.patch(tiny_model("llama"), attention={**SPEC, "placement": placement})
    switch_on(model)
    with torch.no_grad():
        memories(model)[0].tables.weight.mul_(1.5)
    ids = torch.randint(3, 128, (2, 12))
    lcplug.save_pretrained(model, tmp_path)
    reloaded = lcplug.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(reloaded, ids), logits(model, ids))


def test_memory_stage_trains_the_memory_only():
    model = lcplug.patch(tiny_model("llama"), attention=SPEC)
    selected = select_trainables(Trainee(model), StageConfig(name="memory", train="memory", steps=1), "stages[0]")
    assert {id(p) for p in selected.values()} == {id(p) for p in memory_parameters(model)}
    assert all(".lcplug_engram." in name for name in selected)


def test_refusals():
    with pytest.raises(ParamError, match="memory_layers names layer 7; valid: 0 to 2"):
        lcplug.patch(tiny_model("llama"), attention={**SPEC, "memory_layers": [7]})
    with pytest.raises(ConflictError, match="cannot be nested"):
        lcplug.patch(tiny_model("llama"), attention={"name": "hybrid", "sparse": SPEC, "ratio": "2:1"})
    model = lcplug.patch(tiny_model("llama"), attention=SPEC)
    with pytest.raises(EngramError, match="input_ids"):
        model(inputs_embeds=torch.zeros(1, 3, 64))
