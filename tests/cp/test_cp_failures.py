"""Failure behaviour: clear errors, never a hang.

On a real 2-process gloo group: ranks that disagree on shapes fail the shape handshake on every rank; a
rank that dies leaves the others with a `CPCommError` within the cp timeout; a degree that does not
divide the world fails at patch time. Without a group: sequences the shard cannot split and Ulysses
degrees the heads cannot take fail at patch (or shard) time with an error naming the value and what is
valid; outside torch.distributed a cp patch is inactive, and unpatch restores the model.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import spawn
from cp_workers import failure

import lcplug
from lcplug.cp import CPConfigError, check_seq_len
from lcplug.errors import LcplugError, ParamError
from lcplug.testing import tiny_model


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    out = tmp_path_factory.mktemp("cpfail") / "results.json"
    spawn(failure, 2, out)
    return json.loads((out.parent / "results.json.0").read_text())


def test_ranks_disagreeing_on_shapes_fail_the_handshake(outcomes):
    assert outcomes["shapes"].startswith("CPShapeError")
    assert "rank 0: (2, 32, 4, 2, 16)" in outcomes["shapes"] and "rank 1: (2, 24, 4, 2, 16)" in outcomes["shapes"]
    assert outcomes["shapes_s"] < 5


def test_a_dead_rank_is_a_clear_error_within_the_timeout(outcomes):
    assert outcomes["dead"].startswith("CPCommError"), outcomes["dead"]
    assert "cp timeout" in outcomes["dead"]
    assert outcomes["dead_s"] < 5 + 10  # the cp timeout is 5 s


def test_a_degree_that_does_not_divide_the_world_fails_at_patch_time(outcomes):
    assert outcomes["degree"].startswith("CPConfigError")
    assert "cp degree 3 does not divide the world size 2; valid: 1, 2" in outcomes["degree"]


@pytest.mark.parametrize(
    ("seq_len", "degree", "layout", "valid"),
    [
        (30, 4, "contiguous", "a multiple of 4"),
        (36, 4, "zigzag", "a multiple of 8"),
        (14, 2, "zigzag", "a multiple of 4"),
    ],
)
def test_a_sequence_the_shard_cannot_split_names_the_length_and_what_is_valid(seq_len, degree, layout, valid):
    with pytest.raises(CPConfigError, match=f"sequence length {seq_len} .* degree {degree} .*{valid}"):
        check_seq_len(seq_len, degree, layout)
    check_seq_len(seq_len - seq_len % (degree * (2 if layout == "zigzag" else 1)), degree, layout)


def test_ulysses_above_the_heads_fails_at_patch_time_and_leaves_the_model_alone():
    model = tiny_model("llama")  # 4 query heads, 2 KV heads
    before = model.config._attn_implementation
    with pytest.raises(
        CPConfigError, match="ulysses degree 8 does not split the model's 4 query heads; valid: 1, 2, 4"
    ):
        lcplug.patch(model, cp="ulysses:degree=8")
    assert model.config._attn_implementation == before and not hasattr(model.config, "lcplug")


def test_hybrid_ulysses_must_divide_the_degree():
    with pytest.raises(ParamError, match="'ulysses' got 3, which does not divide degree 4"):
        lcplug.patch(tiny_model("llama"), cp={"name": "hybrid", "degree": 4, "ulysses": 3})


def test_outside_torch_distributed_cp_is_inactive_and_unpatch_restores(recwarn):
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (1, 16))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            lcplug.patch(model, attention="sliding-window:window=4,block_size=4", cp="ring:degree=2")
        assert any("inactive" in str(w.message) for w in seen)
        assert model.config.lcplug["spec"]["cp"]["degree"] == 2
        lcplug.unpatch(model)
        assert torch.equal(model(input_ids=ids).logits, before)


def test_cp_errors_are_lcplug_errors():
    assert issubclass(CPConfigError, LcplugError)
