"""kill -9 after a checkpoint, resume: the loss of every step equals the uninterrupted run's, bit for bit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import yaml

from lcplug.cli import main

STAGES = [
    {"name": "all", "train": "all", "steps": 12, "lr": 1e-3, "schedule": {"warmup": 3}},
    {"name": "sinks", "train": "sinks", "steps": 18, "lr": 1e-2, "grad_accum": 2},
]


def _write(recipe, tmp_path, name: str) -> tuple:
    raw = recipe(
        patch={"attention": "sliding-window:window=48,sinks=4,block_size=16,learnable_sink=true"},
        data={"seq_len": 128, "batch_size": 4, "sources": recipe()["data"]["sources"]},
        stages=STAGES,
        output={"dir": str(tmp_path / name), "checkpoint_every": 4, "keep": 2, "log": ["jsonl"]},
    )
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, tmp_path / name


def test_resume_after_kill_9_repeats_the_uninterrupted_losses(recipe, read_metrics, tmp_path):
    path, out = _write(recipe, tmp_path, "straight")
    assert main(["train", str(path)]) == 0  # torch runs on one thread in the tests (tests/conftest.py)
    straight = [r["loss"] for r in read_metrics(out)]

    path, out = _write(recipe, tmp_path, "killed")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lcplug", "train", str(path)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 60
    first_in_stage_2 = out / "checkpoints" / "step-00000016"  # resuming there restores stage 1's trained weights
    while not first_in_stage_2.is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed: {err.decode()[-2000:]}"
    assert not (out / "final").exists()
    logged = len(read_metrics(out))

    assert main(["train", str(path), "--resume", "auto"]) == 0
    resumed = [r["loss"] for r in read_metrics(out)]
    assert resumed == straight and len(resumed) == 30
    assert logged < 30
