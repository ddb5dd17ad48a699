"""Positions in one place: packed rows, context-parallel shards, attention patterns and RoPE positions."""

from __future__ import annotations

import pytest
import torch
from transformers.masking_utils import find_packed_sequence_indices

import lcplug.attention.positions
from lcplug.attention.mask import LazyMask
from lcplug.positions import (
    packed_position_ids,
    pattern_positions,
    rope_positions,
    shard_indices,
    shard_positions,
)


def test_packed_position_ids_restart_per_document():
    expected = torch.tensor([0, 1, 2, 0, 1, 0, 1, 2, 3])
    assert torch.equal(packed_position_ids([3, 2, 4]), expected)
    assert torch.equal(packed_position_ids(cu_seqlens=[0, 3, 5, 9]), expected)
    assert torch.equal(packed_position_ids(torch.tensor([3, 0, 2])), torch.tensor([0, 1, 2, 0, 1]))
    assert packed_position_ids([]).numel() == 0


def test_packed_position_ids_are_what_transformers_reads_as_documents():
    """transformers' mask code finds documents from restarts of the position ids: ours must match it."""
    lengths = [5, 1, 7, 3]
    found = find_packed_sequence_indices(packed_position_ids(lengths)[None])
    assert torch.equal(found[0], torch.repeat_interleave(torch.arange(4), torch.tensor(lengths)))


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({}, "exactly one of"),
        ({"doc_lengths": [2], "cu_seqlens": [0, 2]}, "exactly one of"),
        ({"cu_seqlens": [1, 3]}, "start at 0"),
        ({"cu_seqlens": [0, 3, 2]}, ">= 0"),
        ({"doc_lengths": [2, -1]}, ">= 0"),
    ],
)
def test_packed_position_ids_bad_input(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        packed_position_ids(**kwargs)


def test_contiguous_shards_keep_global_positions():
    pos = packed_position_ids([6, 10])  # 16 tokens, a document boundary inside rank 1's shard
    shards = [shard_positions(pos, r, 4) for r in range(4)]
    assert torch.equal(torch.cat(shards), pos)
    assert shards[1].tolist() == [4, 5, 0, 1]  # global ids: the second document restarts, the shard does not


def test_zigzag_shards_hold_chunks_r_and_2p_minus_1_minus_r():
    world, length = 4, 16  # 8 chunks of 2
    idx = [shard_indices(length, r, world, "zigzag") for r in range(world)]
    assert idx[0].tolist() == [0, 1, 14, 15]
    assert idx[1].tolist() == [2, 3, 12, 13]
    assert idx[3].tolist() == [6, 7, 8, 9]
    assert sorted(torch.cat(idx).tolist()) == list(range(length))  # a partition of the row
    # balanced causal work: each rank's queries see the same number of keys in total
    work = [int((i + 1).sum()) for i in idx]
    assert len(set(work)) == 1
    pos = torch.arange(100, 116)[None].expand(2, -1)  # batched ids, e.g. a continued sequence
    assert torch.equal(shard_positions(pos, 2, world, "zigzag"), pos[:, [4, 5, 10, 11]])


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ((15, 0, 4, "contiguous"), "divisible by 4"),
        ((16, 0, 3, "zigzag"), "divisible by 6"),
        ((16, 4, 4, "contiguous"), r"rank 4 is not in \[0, world=4\)"),
        ((16, 0, 4, "ring"), "unknown shard layout 'ring'"),
    ],
)
def test_shard_bad_input(args, needle):
    with pytest.raises(ValueError, match=needle):
        shard_indices(*args)


def lazy_mask(b=1, lq=4, lkv=4, q_offset=0, kv_offset=0, padding=None):
    return LazyMask(
        batch_size=b,
        q_length=lq,
        kv_length=lkv,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=lambda b, h, q, kv: q >= kv,
        attention_mask=padding,
    )


def test_pattern_positions_has_one_implementation():
    assert lcplug.attention.positions.pattern_positions is pattern_positions


def test_pattern_positions_packed_padded_and_decode():
    packed = packed_position_ids([2, 3])[None]
    q, kv = pattern_positions(lazy_mask(lq=5, lkv=5), packed, torch.device("cpu"))
    assert torch.equal(q, packed) and torch.equal(kv, packed)
    pad = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    q, kv = pattern_positions(lazy_mask(b=2, lq=5, lkv=5, padding=pad), None, torch.device("cpu"))
    assert q.tolist() == [[-2, -1, 0, 1, 2], [0, 1, 2, 3, 4]]
    pad = torch.cat([pad, torch.ones(2, 1, dtype=torch.long)], dim=1)  # one decode step
    q, kv = pattern_positions(lazy_mask(b=2, lq=1, lkv=6, q_offset=5, padding=pad), None, torch.device("cpu"))
    assert q.tolist() == [[3], [5]] and kv[0].tolist() == [-2, -1, 0, 1, 2, 3]


def test_rope_positions_follow_the_ids_the_model_rotated_by():
    pad = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    mask = lazy_mask(b=2, lq=4, lkv=4, padding=pad)
    generate_ids = (pad.cumsum(-1) - 1).clamp(min=0)  # what generate passes: real tokens count from 0
    q, kv = rope_positions(mask, generate_ids, 4, 4, torch.device("cpu"))
    assert torch.equal(q, pattern_positions(mask, generate_ids, torch.device("cpu"))[0])
    slot_ids = torch.arange(4)[None]  # a plain forward without ids: the model counts the pads too
    q, kv = rope_positions(mask, slot_ids, 4, 4, torch.device("cpu"))
    assert q.tolist() == [[0, 1, 2, 3]] * 2 and torch.equal(kv, q)
    # a decode step of the plain forward: the key slots line up with the query's id
    pad = torch.cat([pad, torch.ones(2, 1, dtype=torch.long)], dim=1)
    mask = lazy_mask(b=2, lq=1, lkv=5, q_offset=4, padding=pad)
    q, kv = rope_positions(mask, torch.tensor([[4]]), 1, 5, torch.device("cpu"))
    assert q.tolist() == [[4], [4]] and kv.tolist() == [[0, 1, 2, 3, 4]] * 2
    q, kv = rope_positions(None, None, 2, 5, torch.device("cpu"))  # a hand-made mask: slots, keys right-aligned
    assert q.tolist() == [[3, 4]] and kv.tolist() == [[0, 1, 2, 3, 4]]
