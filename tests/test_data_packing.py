"""Packing: rows with document boundaries, labels, position ids, cu_seqlens; packed documents equal run apart."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

import lcplug
from lcplug.data import IGNORE_INDEX, PackedLoader, Row, collate, context_parallel_slice, model_inputs
from lcplug.positions import shard_indices
from lcplug.testing import tiny_model


def test_collate_restarts_positions_and_masks_boundaries():
    ids = np.arange(10, 20, dtype=np.int32)
    mask = np.array([1, 1, 1, 0, 0, 1, 1, 1, 1, 0], dtype=bool)
    batch = collate([Row(ids, mask, [3, 5, 2], [0, 1, -1]), Row(ids, np.ones(10, bool), [10], [0])])
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4, 0, 1], list(range(10))]
    assert batch["labels"][0].tolist() == [-100, 11, 12, -100, -100, 15, 16, 17, -100, -100]
    assert batch["labels"][1].tolist() == [-100, *range(11, 20)]
    assert batch["doc_ids"][0].tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 2, 2]
    assert batch["cu_seqlens"].tolist() == [0, 3, 8, 10, 20] and batch["cu_seqlens"].dtype == torch.int32
    assert batch["max_seqlen"] == 10 and batch["input_ids"].dtype == torch.long
    crossing = collate([Row(ids, mask, [3, 5, 2], [0, 1, -1])], cross_document=True)
    assert crossing["position_ids"].tolist() == [list(range(10))]
    assert crossing["labels"][0].tolist() == [10, 11, 12, -100, -100, 15, 16, 17, 18, -100]
    assert crossing["cu_seqlens"].tolist() == [0, 10] and crossing["doc_ids"].sum() == 0


def jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return {"name": "text", "paths": [str(path)], "shuffle": False}


def test_documents_split_across_rows_and_the_last_row_is_padded(tmp_path):
    texts = ["a" * 30, "b" * 50, "c" * 10]
    loader = PackedLoader(
        {"seq_len": 32, "batch_size": 2, "repeat": False, "sources": {"t": jsonl(tmp_path / "t.jsonl", texts)}}
    )
    batches = list(loader)
    rows = [bytes(r.tolist()).decode(errors="replace") for b in batches for r in b["input_ids"].to(torch.uint8)]
    assert "".join(rows).rstrip("\x00") == "".join(texts)
    assert [b["input_ids"].shape[0] for b in batches] == [2, 1]  # the stream ends in a short batch
    first, last = batches
    # b (50 tokens) is cut at the row length into 32 + 18; each part restarts at 0, as does a row
    assert first["position_ids"].tolist() == [[*range(30), 0, 1], [*range(30), 0, 1]]
    assert last["position_ids"][0].tolist() == [*range(16), *range(10), *range(6)]  # b's end, c, padding
    assert (last["labels"][0, 26:] == IGNORE_INDEX).all() and loader.padding == 6


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """A batch of ASCII documents (ids < 128, the tiny models' vocabulary), packed two or three to a row."""
    texts = [f"document {i}: " + "the quick brown fox jumps over the lazy dog. "[: 20 + 7 * i] for i in range(7)]
    path = tmp_path_factory.mktemp("docs") / "d.jsonl"
    spec = jsonl(path, texts)
    config = {"seq_len": 96, "batch_size": 2, "repeat": False, "sources": {"t": spec}}
    return PackedLoader(config), PackedLoader({**config, "cross_document": True})


def split_documents(batch):
    """Each (row, document) of a packed batch, without padding."""
    docs = []
    for row in range(batch["input_ids"].shape[0]):
        bounds = batch["cu_seqlens"].tolist()
        length = batch["input_ids"].shape[1]
        for start, end in itertools.pairwise(bounds):
            if start // length == row and end <= (row + 1) * length:
                ids = batch["input_ids"].view(-1)[start:end]
                if (batch["labels"].view(-1)[start + 1 : end] != IGNORE_INDEX).any():
                    docs.append((row, start % length, ids))
    return docs


@pytest.mark.parametrize("attention", [None, "sliding-window:window=16,sinks=2,block_size=16"])
def test_a_packed_batch_equals_its_documents_run_apart(packed, attention):
    loader, _ = packed
    batch = next(PackedLoader(loader.config))
    model = tiny_model("llama")
    if attention:
        lcplug.patch(model, attention=attention)
    with torch.no_grad():
        out = model(**model_inputs(batch))
        docs = split_documents(batch)
        assert len(docs) >= 4
        total, count = 0.0, 0
        for row, start, ids in docs:
            alone = model(input_ids=ids[None], labels=ids[None])
            torch.testing.assert_close(out.logits[row, start : start + len(ids)], alone.logits[0], atol=1e-5, rtol=0)
            total += alone.loss.item() * (len(ids) - 1)
            count += len(ids) - 1
    assert out.loss.item() == pytest.approx(total / count, abs=1e-5)  # every document's own tokens, none across


def test_cross_document_attention_can_be_switched_on(packed):
    loader, crossing = packed
    apart, together = next(PackedLoader(loader.config)), next(PackedLoader(crossing.config))
    assert torch.equal(apart["input_ids"], together["input_ids"])
    model = tiny_model("llama")
    with torch.no_grad():
        a = model(**model_inputs(apart)).logits
        b = model(**model_inputs(together)).logits
    (row, start, ids), *_ = [d for d in split_documents(apart) if d[1] > 0]
    first = slice(0, split_documents(apart)[0][2].numel())
    torch.testing.assert_close(a[0, first], b[0, first], atol=1e-5, rtol=0)  # the row's first document: same
    later = slice(start, start + len(ids))
    assert (a[row, later] - b[row, later]).abs().max() > 1e-3  # a later document sees the ones before it


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_context_parallel_slices_keep_global_positions_and_shifted_labels(packed, layout):
    batch = next(PackedLoader(packed[0].config))
    world = 4
    shards = [context_parallel_slice(batch, rank, world, layout) for rank in range(world)]
    length = batch["input_ids"].shape[1]
    order = torch.cat([shard_indices(length, r, world, layout) for r in range(world)])
    for key in ("input_ids", "position_ids", "doc_ids"):
        whole = torch.empty_like(batch[key])
        whole[:, order] = torch.cat([s[key] for s in shards], dim=1)
        assert torch.equal(whole, batch[key])
    shifted = torch.empty_like(batch["labels"])
    shifted[:, order] = torch.cat([s["shift_labels"] for s in shards], dim=1)
    assert torch.equal(shifted[:, :-1], batch["labels"][:, 1:]) and (shifted[:, -1] == IGNORE_INDEX).all()
    assert all(torch.equal(s["cu_seqlens"], batch["cu_seqlens"]) for s in shards)
