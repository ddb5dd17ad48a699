"""Every cp strategy x attention pattern equals the single-process run, on 2 and 4 gloo processes (fp32).

One spawned group per world size runs every case (`cp_workers.parity`): per case, a whole tiny-model
training step (this rank's logits, the loss reduced by token count over the group, every parameter's
gradient all-reduced over the group) and one attention call through the dispatcher (outputs, q/k/v
gradients through the collectives) must match the single-process run to 1e-5. The `+pieces` cases rerun
some patterns with layouts cut into pieces of a few blocks and no mask cache, as a very long row runs.
"""

from __future__ import annotations

import pytest
from cp_workers import PATTERNS, PIECED, PIECES, STRATEGIES, parity

CASES = [f"{s}/{p}" for s in STRATEGIES for p in PATTERNS] + [f"{s}/{p}{PIECES}" for s in STRATEGIES for p in PIECED]
ATOL = 1e-5


@pytest.fixture(scope="module", params=[2, 4])
def results(request, run_group):
    return request.param, run_group(parity, request.param)


@pytest.mark.parametrize("case", CASES)
def test_strategy_and_pattern_match_one_process(results, case):
    world, per_rank = results
    for rank, rows in enumerate(per_rank):
        row = rows[case]
        assert "error" not in row, f"world {world} rank {rank}: {row.get('trace', row.get('error'))}"
        worst = {k: v for k, v in row["errors"].items() if v > ATOL}
        assert not worst, f"world {world} rank {rank} {case}: {worst}"


def test_a_rank_with_every_token_masked_gives_no_nan(results):
    _, per_rank = results
    for rank, rows in enumerate(per_rank):
        row = rows["masked-rank"]
        assert "error" not in row, row
        assert row["finite"], f"rank {rank}: NaN or inf in loss or gradients"
        assert row["errors"]["loss"] < ATOL
    assert per_rank[0]["masked-rank"]["local_loss"] == 0.0


def test_the_byte_counter_sees_each_ring_transfer(results):
    """Causal attention over contiguous shards: rank r needs ranks <= r, so the ring runs world steps, each
    layer passing its K/V shard (2 x B 2 x 2 KV heads x 64/world tokens x 16 dims x 4 bytes) on world - 1
    times forward; backward passes the shards round again (no rank keeps them) and sends each step's dK/dV
    back to its owner."""
    world, per_rank = results
    shard = 2 * 2 * 2 * (64 // world) * 16 * 4
    layers = 2
    for rows in per_rank:
        counted = rows["masked-rank"]["bytes"]
        assert counted["forward"]["send_recv"]["sent"] == layers * (world - 1) * shard
        assert counted["forward"]["send_recv"]["received"] == layers * (world - 1) * shard
        assert counted["step"]["send_recv"]["sent"] == 3 * layers * (world - 1) * shard
        assert counted["step"]["send_recv"]["received"] == 3 * layers * (world - 1) * shard
        assert counted["forward"]["all_gather"]["calls"] == 2  # the shape handshake and the position ids
        assert counted["forward"]["all_reduce"]["calls"] == 1  # ring steps, shared by both layers
