"""`accelerate launch` of 2 CPU processes with `cp: {degree: 2, strategy: ring}` trains like one process.

Both ranks read the same rows (one cp group, `dp_coordinates`), each runs its zigzag shard of every
sequence, the loss is reduced by token count over the group and DDP averages the gradients over both
ranks: the loss curve and token counts must equal one process training on whole sequences. Launch line:

    accelerate launch --config_file recipes/accelerate/cpu-2proc.yaml -m lcplug train R.yaml
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


def _recipe(recipe, rows_file, out: Path, cp: dict) -> dict:
    data = {"seq_len": 64, "batch_size": 2, "sources": {"rows": {"name": "text", "paths": [str(rows_file)]}}}
    return recipe(
        data=data,
        patch={"attention": {"name": "sliding-window", "window": 12, "sinks": 2, "block_size": 8}},
        stages=[{"name": "main", "train": "all", "steps": 3, "lr": 1e-3, "schedule": {"warmup": 1}}],
        output={"dir": str(out), "log": ["jsonl"]},
        cp=cp,
    )


def test_two_cp_ranks_match_one_process(recipe, read_metrics, rows_file, tmp_path):
    path = tmp_path / "cp.yaml"
    path.write_text(yaml.safe_dump(_recipe(recipe, rows_file, tmp_path / "cp", {"degree": 2, "strategy": "ring"})))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG)]
    done = subprocess.run([*launch, "-m", "lcplug", "train", str(path)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-9000:-2500]
    summary = json.loads((tmp_path / "cp" / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["manifest"]["spec"]["cp"]["name"] == "ring"

    one = train(Recipe.from_dict(_recipe(recipe, rows_file, tmp_path / "one", {"degree": 1})))
    assert one["world_size"] == 1
    rows_cp, rows_one = read_metrics(tmp_path / "cp"), read_metrics(tmp_path / "one")
    assert [r["loss"] for r in rows_cp] == pytest.approx([r["loss"] for r in rows_one], rel=1e-5)
    assert [r["grad_norm"] for r in rows_cp] == pytest.approx([r["grad_norm"] for r in rows_one], rel=1e-4)
    assert [r["tokens"] for r in rows_cp] == [r["tokens"] for r in rows_one]
