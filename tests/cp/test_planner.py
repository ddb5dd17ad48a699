"""The cp planner: its formulas by hand, its recommendation as the topology changes, its CLI and errors,
and its per-layer bytes against what lcplug's strategies move on 2 and 4 gloo processes.
"""

from __future__ import annotations

import json

import pytest
import torch

from lcplug.attention.pattern import SlidingWindowPattern
from lcplug.cli import main
from lcplug.cp.planner import (
    Branch,
    Job,
    PlannerError,
    StrategyPlan,
    Topology,
    allgather_bytes,
    chunk_pairs,
    layer_volume,
    plan_cp,
    ring_bytes,
    ring_schedule,
    skeleton_shape,
    ulysses_bytes,
)
from lcplug.train.memory import Dims

MIB = 1 << 20
N = 1 << 20  # 1M tokens
WINDOW = Branch(SlidingWindowPattern(16, 0, 8))


@pytest.fixture(scope="module")
def llama():
    return skeleton_shape("Llama-3.1-8B")


@pytest.fixture(scope="module")
def qwen():
    return skeleton_shape("Qwen3-32B")


def by_name(plan):
    return {s.strategy: s for s in plan.strategies}


# ---- formulas by hand ------------------------------------------------------------------------------


def test_volumes_are_the_methods_formulas():
    """Llama-3.1-8B widths (d 4096, d_kv 1024), 1M tokens, P 64, bf16 (METHODS.md CP lines)."""
    job = Job(N)
    shard = 2 * (N / 64) * 1024 * 2  # K and V of 16K tokens: 64 MiB
    assert shard == 64 * MIB
    assert ring_bytes(job, 64, 8, 128, steps=64) == 63 * shard == 2 * N * 1024 * 2 * 63 / 64
    assert ring_bytes(job, 64, 8, 128, steps=2) == shard  # a window over contiguous shards: one transfer
    assert allgather_bytes(job, 64, 8, 128) == 63 * shard
    # Ulysses of 8 in a node: (N/P)(2d + 2 d_kv)(u-1)/u; of 64 over 8 KV heads: replicated to 64
    assert ulysses_bytes(job, 64, 8, 32, 8, 128) == (N / 64) * (2 * 4096 + 2 * 1024) * 2 * 7 / 8
    assert ulysses_bytes(job, 64, 64, 64, 8, 128) == (N / 64) * (4 * 8192) * 2 * 63 / 64


def test_pairs_and_ring_steps_by_hand():
    """8 tokens in 4 chunks of 2: causal pairs 3 on the diagonal, 4 below; a window of 2 reaches one chunk back."""
    causal = chunk_pairs(Branch(), 8, 4)
    assert causal.tolist() == [[3, 0, 0, 0], [4, 3, 0, 0], [4, 4, 3, 0], [4, 4, 4, 3]]
    window = chunk_pairs(Branch(SlidingWindowPattern(2, 0, 1)), 8, 4)
    assert window.tolist() == [[3, 0, 0, 0], [1, 3, 0, 0], [0, 1, 3, 0], [0, 0, 1, 3]]
    # above MAX_QUERY_BLOCKS queries go in blocks: over by block (block - 1) / 2 pairs per block at most
    assert chunk_pairs(Branch(), 1 << 16, 4).sum() == pytest.approx((1 << 16) * ((1 << 16) + 1) / 2, rel=1e-3)
    # zigzag over 2 ranks: rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2: equal causal work
    zig = ring_schedule(Branch(), 8, 2, 1, "zigzag")
    assert zig.steps == 2 and [sum(row) for row in zig.pairs] == [18, 18]
    assert ring_schedule(Branch(SlidingWindowPattern(2, 0, 1)), 8, 4, 1, "contiguous").steps == 2
    assert ring_schedule(Branch(SlidingWindowPattern(2, 0, 1)), 16, 4, 1, "zigzag").steps == 4  # chunk 2P-1-r needs r+1
    assert ring_schedule(Branch(SlidingWindowPattern(2, 2, 1)), 8, 4, 1, "contiguous").steps == 4  # sinks on rank 0


def test_plan_numbers_for_llama_at_1m(llama):
    plan = by_name(plan_cp(llama, Topology(64), Job(N)))
    shard = 64 * MIB
    ring = plan["ring"]
    assert ring.layer_bytes == 63 * shard and ring.ring_steps == [64]
    # forward, recomputed forward, and backward's two passes (the K/V again, dK/dV back), 32 layers
    assert ring.step_bytes == 4 * 32 * 63 * shard
    assert ring.overlap and 0 < ring.hidden < 1  # forward transfers hide; the backward's are counted exposed
    assert ring.memory["kv"] == 0  # no rank keeps a received shard for backward
    hybrid = plan["hybrid"]
    assert (hybrid.ulysses, hybrid.ring) == (8, 8)
    assert hybrid.layer_bytes == (N / 64) * (2 * 4096 + 2 * 1024) * 2 * 7 / 8 + 7 * shard
    # the contiguous ring does the same transfers but its last rank holds all the causal work
    assert plan["ring-contiguous"].step_bytes == ring.step_bytes
    assert plan["ring-contiguous"].compute_seconds > 1.8 * ring.compute_seconds


# ---- recommendation --------------------------------------------------------------------------------


def test_ulysses_is_invalid_above_the_query_heads_and_replicates_kv_heads(llama, qwen):
    llama_plan = by_name(plan_cp(llama, Topology(64), Job(N)))
    assert not llama_plan["ulysses"].valid
    assert "32 query heads" in llama_plan["ulysses"].why and "16, 32" in llama_plan["ulysses"].why
    qwen_plan = by_name(plan_cp(qwen, Topology(64), Job(N)))
    assert qwen_plan["ulysses"].valid  # 64 query heads; 8 KV heads replicated 8 times
    assert qwen_plan["ulysses"].layer_bytes == ulysses_bytes(Job(N), 64, 64, 64, 8, 128)


def test_recommendation_follows_the_topology(llama, qwen):
    slow = plan_cp(llama, Topology(64, inter_bw=50), Job(N))
    assert slow.recommended == "hybrid"  # the all-to-all stays on NVLink, 8x fewer bytes cross nodes
    assert "ulysses cannot run" in slow.reason
    one_node = plan_cp(qwen, Topology(8, memory_gib=141), Job(1 << 17))  # an H200 node
    assert not by_name(one_node)["hybrid"].valid  # all in one node: hybrid would be plain ulysses
    # ring's forward hides but its backward moves the K/V twice: a tie (within 2%), and ulysses moves fewer bytes
    assert one_node.recommended == "ulysses" and "within 2% of ring" in one_node.reason
    fast = plan_cp(llama, Topology(64, inter_bw=10_000), Job(N))  # inter-node no slower than NVLink
    assert by_name(fast)["ring"].step_seconds < by_name(fast)["hybrid"].step_seconds
    assert fast.recommended == "hybrid" and "within 2% of ring" in fast.reason  # a tie: fewer bytes wins
    across = plan_cp(qwen, Topology(64, inter_bw=12.5), Job(1 << 17))
    assert across.recommended == "hybrid"
    assert by_name(across)["ring"].exposed_seconds > 10 * by_name(across)["hybrid"].exposed_seconds
    small = Topology(64, memory_gib=20)
    assert not plan_cp(qwen, small, Job(N)).strategies[0].fits
    assert "nothing fits" in plan_cp(qwen, small, Job(N)).reason


def test_a_sliding_window_makes_the_contiguous_ring_one_transfer():
    shape = skeleton_shape("llama-3.1-8b", "sliding-window:window=4096,sinks=0")
    plan = plan_cp(shape, Topology(64), Job(N))
    ring = by_name(plan)
    assert ring["ring-contiguous"].ring_steps == [2] and ring["ring"].ring_steps == [64]
    assert ring["ring-contiguous"].layer_bytes == 64 * MIB
    assert plan.recommended == "ring-contiguous"
    assert plan.attention == [("sliding window 4096 + 0 sinks", 32)]


# ---- CLI and errors --------------------------------------------------------------------------------


def test_cli_prints_a_table_and_json(capsys):
    assert main(["plan", "--model", "Llama-3.1-8B", "--seq-len", "1048576", "--gpus", "64"]) == 0
    out = capsys.readouterr().out
    assert "recommended: hybrid" in out and "ring-contiguous" in out
    args = ["plan", "--model", "qwen3-32b", "--seq-len", "131072", "--gpus", "16", "--inter-bw", "25", "--json"]
    assert main(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["topology"]["inter_bw"] == 25 and data["recommended"] in {s["strategy"] for s in data["strategies"]}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "llama-9b", "--seq-len", "1024", "--gpus", "8"], "valid shipped configs: "),
        (["--model", "qwen3-32b", "--seq-len", "1024", "--gpus", "12"], "valid: fewer than 8 or a multiple of 8"),
        (["--model", "qwen3-32b", "--seq-len", "1000", "--gpus", "8"], "valid: a multiple of 16"),
        (["--model", "qwen3-32b", "--gpus", "8"], "--seq-len"),
        (["recipes/demo.yaml", "--model", "qwen3-32b", "--seq-len", "1024", "--gpus", "8"], "RECIPE or --model"),
    ],
)
def test_cli_errors_name_the_valid_values(capsys, argv, message):
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("lcplug: error:")
    if "llama-9b" in argv:
        assert "llama-3.1-8b" in err and "qwen3-32b" in err


def test_bad_topology_raises_planner_error():
    with pytest.raises(PlannerError, match="gpus_per_node 0 must be > 0"):
        Topology(8, gpus_per_node=0)


# ---- bytes moved by the real strategies vs the formulas -------------------------------------------

SEQ, HEADS, KV_HEADS, DIM = 128, 4, 2, 16
DIMS = Dims(layers=1, hidden=HEADS * DIM, intermediate=1, heads=HEADS, kv_heads=KV_HEADS, head_dim=DIM, vocab=1)
CASES = {  # name: (strategy, ulysses (0: the whole group), layout, branch)
    "ring/causal": ("ring", 1, "zigzag", Branch()),
    "ring/window": ("ring", 1, "zigzag", WINDOW),
    "ring-contiguous/causal": ("ring-contiguous", 1, "contiguous", Branch()),
    "ring-contiguous/window": ("ring-contiguous", 1, "contiguous", WINDOW),
    "ulysses/causal": ("ulysses", 0, "contiguous", Branch()),
    "allgather/causal": ("allgather", 1, "contiguous", Branch()),
    "hybrid/causal": ("hybrid", 2, "zigzag", Branch()),
    "hybrid/window": ("hybrid", 2, "zigzag", WINDOW),
}
DATA_KINDS = ("send_recv", "all_to_all", "all_gather", "reduce_scatter")
"""What carries data; the ring's one all-reduce of step flags (4P bytes) is control traffic, left out."""


def moved_bytes(rank: int, world: int, port: int, out: str) -> None:
    """Per case: one attention layer forward and backward through the strategy, this rank's sent bytes."""
    import torch.distributed as dist
    from cp_workers import init

    from lcplug.cp.mesh import cp_mesh
    from lcplug.cp.rules import StaticRule
    from lcplug.cp.shard import ShardContext
    from lcplug.cp.strategies import AllGatherKV, HeadsThenRing
    from lcplug.positions import shard_indices

    init(rank, world, port)
    results = {}
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, SEQ, DIM, generator=gen) for h in (HEADS, KV_HEADS, KV_HEADS))
    for case, (name, ulysses, layout, branch) in CASES.items():
        ulysses = ulysses or world
        strategy = AllGatherKV() if name == "allgather" else HeadsThenRing(ulysses=ulysses, layout=layout)
        mesh = cp_mesh(world, strategy.ulysses, 60.0)
        ctx = ShardContext(mesh.cp, strategy.layout, torch.arange(SEQ).view(1, -1))
        idx = shard_indices(SEQ, mesh.rank, world, strategy.layout)
        local = [t[:, :, idx].clone().requires_grad_() for t in (q, k, v)]
        rule = StaticRule(branch.pattern, None)
        mesh.stats.reset()
        attended = strategy.attend(mesh, ctx, rule, *local, DIM**-0.5, None)
        forward = sum(mesh.stats.sent[kind] for kind in DATA_KINDS)
        attended.square().sum().backward()
        total = sum(mesh.stats.sent[kind] for kind in DATA_KINDS)
        results[case] = {"forward": forward, "backward": total - forward}
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(gathered, f)
    dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 4])
def moved(request, run_group):
    return request.param, run_group(moved_bytes, request.param)


@pytest.mark.parametrize("case", CASES)
def test_bytes_moved_match_the_planner_within_5_percent(moved, case):
    world, per_rank = moved
    name, ulysses, layout, branch = CASES[case]
    plan = StrategyPlan(name, ulysses or world, world // (ulysses or world), layout)
    volume = layer_volume(plan, branch, DIMS, Job(SEQ, dtype_bytes=4), world)
    for rank, rows in enumerate(per_rank):
        got = rows[case]
        assert got["forward"] == pytest.approx(volume.forward, rel=0.05), (world, rank)
        assert got["backward"] == pytest.approx(volume.backward, rel=0.05), (world, rank)
