"""Streaming state: deterministic for a seed, exact resume, disjoint data-parallel shards, identical CP groups."""

from __future__ import annotations

import json
import re

import pytest
import torch

from lcplug.data import DataError, PackedLoader, dp_coordinates

KEYS = ("input_ids", "labels", "position_ids", "doc_ids", "cu_seqlens")


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """Every kind of source at once: a code tree, text in pieces, JSON lines, chat, builders, upsampling, curriculum."""
    root = tmp_path_factory.mktemp("data")
    for r in range(4):
        for m in range(3):
            path = root / "code" / f"repo{r}" / f"mod{m}.py"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"from . import mod{(m + 1) % 3}\n" + f"value_{r}_{m} = {r * m}\n" * (20 + 15 * m))
    (root / "text").mkdir()
    (root / "text" / "book.txt").write_text("".join(f"A line of the book, number {i}.\n" for i in range(400)))
    (root / "text" / "docs.jsonl").write_text(
        "".join(json.dumps({"text": f"doc-{i} " + "word " * (5 + 37 * (i % 7)), "g": i // 4}) + "\n" for i in range(60))
    )
    session = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}
    (root / "chat.jsonl").write_text((json.dumps(session) + "\n") * 5)
    return {
        "seed": 3,
        "seq_len": 128,
        "batch_size": 2,
        "curriculum": [{"step": 4, "seq_len": 512}],
        "sources": {
            "code": {"name": "code", "path": str(root / "code")},
            "text": {"name": "text", "paths": [str(root / "text")], "piece_bytes": 1024},
            "chat": {"name": "chat", "paths": [str(root / "chat.jsonl")]},
            "keys": {"name": "needles", "lengths": [150, 200], "task": "multikey", "keys": 2},
            "kv": {"name": "kv-retrieval", "lengths": [300]},
            "mega": {"name": "megadoc", "base": "text", "max_chars": 2000, "min_distance": 200, "recalls": 2},
        },
        "mixture": {
            "name": "mixture",
            "weights": "code@0.3,text@0.2,chat@0.1,keys@0.1,kv@0.1,mega@0.2",
            "long_share": 0.6,
            "long_threshold": 100,
        },
    }


def run(loader: PackedLoader, n: int) -> list[dict]:
    return [next(loader) for _ in range(n)]


def same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in KEYS)


def test_resume_equals_an_uninterrupted_run(recipe):
    whole = run(PackedLoader(recipe), 12)
    for stop in (1, 3, 6, 9):
        loader = PackedLoader(recipe)
        assert same(run(loader, stop), whole[:stop])
        state = json.loads(json.dumps(loader.state_dict()))  # plain values: saved with any checkpoint
        resumed = PackedLoader(recipe)
        resumed.load_state_dict(state)
        assert same(run(resumed, 12 - stop), whole[stop:]), f"resumed after {stop} batches"
    assert {tuple(b["input_ids"].shape) for b in whole} == {(2, 128), (1, 512)}


def test_the_state_stays_small(recipe):
    loader = PackedLoader(recipe)
    run(loader, 8)
    assert len(json.dumps(loader.state_dict())) < 16 * 512  # counters and at most one carried document cut


def test_deterministic_for_a_seed(recipe):
    assert same(run(PackedLoader(recipe), 4), run(PackedLoader(recipe), 4))
    assert not same(run(PackedLoader(recipe), 4), run(PackedLoader({**recipe, "seed": 4}), 4))


def tags(batches: list[dict]) -> set[str]:
    text = "".join(bytes(b["input_ids"].view(-1).to(torch.uint8).tolist()).decode("utf-8", "replace") for b in batches)
    return set(re.findall(r"doc-\d+ ", text))


def test_data_parallel_shards_are_disjoint_and_context_parallel_groups_identical(tmp_path):
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": f"doc-{i} body"}) + "\n" for i in range(200)))
    config = {
        "seq_len": 64,
        "batch_size": 2,
        "repeat": False,
        "sources": {"d": {"name": "text", "paths": [str(tmp_path)]}},
    }
    world, cp = 4, 2
    coords = [dp_coordinates(rank, world, cp) for rank in range(world)]
    assert coords == [(0, 2), (0, 2), (1, 2), (1, 2)]
    batches = [list(PackedLoader(config, dp_rank=r, dp_world=w)) for r, w in coords]
    assert same(batches[0], batches[1]) and same(batches[2], batches[3])
    first, second = tags(batches[0]), tags(batches[2])
    assert first and second and not first & second
    assert len(first | second) == 200
    with pytest.raises(DataError, match="multiple of the context-parallel size"):
        dp_coordinates(0, 3, 2)


def test_a_state_of_another_rank_or_recipe_is_refused(recipe):
    loader = PackedLoader(recipe, dp_rank=0, dp_world=2)
    state = loader.state_dict()
    with pytest.raises(DataError, match="rank 0 of 2, this loader is rank 1 of 2"):
        PackedLoader(recipe, dp_rank=1, dp_world=2).load_state_dict(state)
    other = {**recipe, "mixture": "code@0.5,text@0.5"}
    with pytest.raises(DataError, match="is for domains"):
        PackedLoader(other, dp_rank=0, dp_world=2).load_state_dict(state)
