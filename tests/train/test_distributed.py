"""Two CPU processes (gloo) x batch 2 train like one process x batch 4: the same loss curve, world size 2.

Every record of the data is exactly one row (64 bytes, seq_len 64), and record d of an epoch goes to
data-parallel rank d mod 2, so the two ranks' batches together hold the very rows one process reads;
each row has the same number of trained tokens, so the mean over ranks equals the mean over the batch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lcplug.train import Recipe, train

CONFIG = Path(__file__).resolve().parents[2] / "recipes" / "accelerate" / "cpu-2proc.yaml"


def _recipe(recipe, rows_file, out: Path, batch_size: int) -> dict:
    data = {"seq_len": 64, "batch_size": batch_size, "sources": {"rows": {"name": "text", "paths": [str(rows_file)]}}}
    return recipe(
        data=data,
        stages=[{"name": "main", "train": "all", "steps": 4, "lr": 1e-3, "schedule": {"warmup": 1}}],
        output={"dir": str(out), "log": ["jsonl"]},
    )


def test_two_processes_match_one_with_the_same_global_batch(recipe, read_metrics, rows_file, tmp_path):
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(_recipe(recipe, rows_file, tmp_path / "two", batch_size=2)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG)]
    done = subprocess.run([*launch, "-m", "lcplug", "train", str(path)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "train_summary.json").read_text())["world_size"] == 2

    one = train(Recipe.from_dict(_recipe(recipe, rows_file, tmp_path / "one", batch_size=4)))
    assert one["world_size"] == 1
    curve_two = [r["loss"] for r in read_metrics(tmp_path / "two")]
    curve_one = [r["loss"] for r in read_metrics(tmp_path / "one")]
    assert curve_two == pytest.approx(curve_one, rel=1e-4)
    assert [r["tokens"] for r in read_metrics(tmp_path / "two")] == [
        r["tokens"] for r in read_metrics(tmp_path / "one")
    ]
