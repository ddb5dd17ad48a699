"""Starting a cp group once per test module (each group runs many cases in one go).

The processes are forked from the test process after it has imported and warmed up lcplug and a tiny
model once, so a group starts in a fraction of a second instead of re-importing torch and transformers
in every rank (what spawn would do, seconds per process on a 2-core machine).
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def warm_up() -> None:
    """Import what every rank needs and run one patched forward, so forked ranks find it all loaded."""
    import torch

    import lcplug
    from lcplug.testing import tiny_model

    model = lcplug.patch(tiny_model("llama", num_hidden_layers=1), attention="sliding-window:window=8")
    with torch.no_grad():
        model(input_ids=torch.ones(1, 16, dtype=torch.long))


def spawn(target: Callable, world: int, out: Path) -> None:
    """Run `target(rank, world, port, out)` on `world` forked processes (gloo on localhost, 1 thread each)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    warm_up()
    mp.start_processes(target, args=(world, free_port(), str(out)), nprocs=world, join=True, start_method="fork")


@pytest.fixture(scope="module")
def run_group(tmp_path_factory):
    """`run_group(target, world)`: spawn the group, return what rank 0 wrote (a JSON file)."""

    def run(target: Callable, world: int):
        out = tmp_path_factory.mktemp(f"cp{world}") / "results.json"
        spawn(target, world, out)
        return json.loads(out.read_text())

    return run
