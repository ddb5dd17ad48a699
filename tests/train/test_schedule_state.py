"""LR schedules and checkpoint files: warm-up and decay shapes, atomic saves, rotation, finding the newest."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from lcplug.train import RecipeError, Schedule
from lcplug.train.schedule import build_scheduler, lr_factor
from lcplug.train.state import checkpoint_root, clean_partial, complete_checkpoints, find_resume, save_checkpoint


@pytest.mark.parametrize("decay", ["cosine", "linear", "constant"])
def test_warmup_then_decay_to_the_floor(decay):
    schedule = Schedule(warmup=4, decay=decay, min_lr_ratio=0.1)
    factors = [lr_factor(s, schedule, 20) for s in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == 1.0
    assert math.isclose(factors[-1], 1.0 if decay == "constant" else 0.1)
    assert all(a >= b for a, b in itertools.pairwise(factors[4:]))
    if decay == "linear":
        assert math.isclose(factors[4 + 15 // 2 + 1] - 0.1, 0.9 * (1 - 8 / 15))


def test_scheduler_state_resumes(tmp_path):
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=1.0)
    sched = build_scheduler(opt, Schedule(warmup=2, decay="cosine", min_lr_ratio=0.0), 10)
    for _ in range(5):
        opt.step()
        sched.step()
    fresh_opt = torch.optim.AdamW([param], lr=1.0)
    fresh = build_scheduler(fresh_opt, Schedule(warmup=2, decay="cosine", min_lr_ratio=0.0), 10)
    fresh.load_state_dict(sched.state_dict())
    assert fresh.last_epoch == 5 and fresh.get_last_lr() == sched.get_last_lr()


def _save(root, step, keep=2):
    return save_checkpoint(
        root,
        {"step": step},
        model_state=lambda: {"w": torch.full((2,), float(step))},
        train_state=lambda: {"optimizer": {}, "scheduler": {}},
        rank_state={"rng": None, "data": {"step": step}},
        rank=0,
        barrier=lambda: None,
        keep=keep,
    )


def test_checkpoints_rotate_and_the_newest_complete_one_resumes(tmp_path):
    root = checkpoint_root(tmp_path)
    for step in (2, 4, 6):
        _save(root, step)
    assert [c.step for c in complete_checkpoints(root)] == [4, 6]
    # what kill -9 mid-save leaves: a temporary directory, and a renamed one can never be half-written
    partial = root / ".tmp-step-00000008"
    partial.mkdir()
    (partial / "model.pt").write_bytes(b"truncated")
    latest = find_resume("auto", tmp_path)
    assert latest.step == 6 and torch.equal(latest.model_state()["w"], torch.full((2,), 6.0))
    assert latest.rank_state(0)["data"] == {"step": 6}
    clean_partial(root)
    assert not partial.exists()
    assert json.loads((root / "step-00000006" / "meta.json").read_text()) == {"step": 6}


def test_saving_a_step_again_replaces_it(tmp_path):
    root = checkpoint_root(tmp_path)
    _save(root, 2)
    _save(root, 2)
    assert [c.step for c in complete_checkpoints(root)] == [2]


def test_resume_arguments(tmp_path):
    assert find_resume(None, tmp_path) is None
    assert find_resume("auto", tmp_path) is None  # nothing saved yet: start fresh
    with pytest.raises(RecipeError, match="not a complete checkpoint"):
        find_resume(str(tmp_path), tmp_path)
    _save(checkpoint_root(tmp_path), 2)
    with pytest.raises(RecipeError, match="no state for rank 1"):
        find_resume("auto", tmp_path).rank_state(1)
