"""Checkpoints a run resumes from exactly: weights, optimizer, scheduler, data position, RNG, step, stage.

Layout under `<output.dir>/checkpoints/`:

    step-00000050/
      meta.json        step, stage, the spec in force, the LoRA config, the names of the weights saved
      model.pt         every weight any stage so far has trained (the rest is the base checkpoint's)
      train.pt         optimizer and LR-scheduler state
      rank0.pt ...     per process: the data loader's position and the python/numpy/torch RNG states

A checkpoint is written into a `.tmp-step-...` directory and renamed into place only once every file
is complete (a directory rename is atomic), so a process killed mid-save (kill -9 included) leaves at
worst a temporary directory that is ignored and cleaned up, never a corrupt newest checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .recipe import RecipeError

CHECKPOINTS = "checkpoints"
_NAME = re.compile(r"^step-(\d{8})$")
_TMP = ".tmp-"


@dataclass
class Checkpoint:
    """A complete checkpoint directory and its meta.json."""

    path: Path
    meta: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    def model_state(self) -> dict[str, torch.Tensor]:
        return torch.load(self.path / "model.pt", map_location="cpu", weights_only=True)

    def train_state(self) -> dict[str, Any]:
        return torch.load(self.path / "train.pt", map_location="cpu", weights_only=False)

    def rank_state(self, rank: int) -> dict[str, Any]:
        file = self.path / f"rank{rank}.pt"
        if not file.is_file():
            raise RecipeError(f"checkpoint {str(self.path)!r} has no state for rank {rank}; resume with its world size")
        return torch.load(file, map_location="cpu", weights_only=False)


def checkpoint_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / CHECKPOINTS


def complete_checkpoints(root: Path) -> list[Checkpoint]:
    """The complete checkpoints under `root`, oldest first (temporary directories are not checkpoints)."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        if _NAME.match(path.name) and (path / "meta.json").is_file():
            found.append(Checkpoint(path, json.loads((path / "meta.json").read_text())))
    return sorted(found, key=lambda c: c.step)


def find_resume(resume: str | None, output_dir: str | os.PathLike) -> Checkpoint | None:
    """`auto`: the newest complete checkpoint of the run, if any; a path: that checkpoint; None: start fresh."""
    if resume is None:
        stale = complete_checkpoints(checkpoint_root(output_dir))
        if stale:
            raise RecipeError(
                f"output.dir {str(output_dir)!r} holds checkpoints of an earlier run (newest: {stale[-1].path.name}); "
                "continue it with --resume auto, or give another output.dir"
            )
        return None
    if resume == "auto":
        found = complete_checkpoints(checkpoint_root(output_dir))
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "meta.json").is_file():
        raise RecipeError(f"--resume {resume!r}: not a complete checkpoint (no meta.json); give one or 'auto'")
    return Checkpoint(path, json.loads((path / "meta.json").read_text()))


def rng_state() -> dict[str, Any]:
    """The python, numpy and torch (CPU and CUDA) generators' states of this process."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    root: Path,
    meta: dict[str, Any],
    *,
    model_state: Callable[[], dict[str, torch.Tensor]],
    train_state: Callable[[], dict[str, Any]],
    rank_state: dict[str, Any],
    rank: int,
    barrier: Callable[[], None],
    keep: int,
) -> Path:
    """Write a checkpoint atomically (every rank its own file, rank 0 the shared ones), then keep the newest `keep`.

    Every process calls this; `barrier` synchronises them (a no-op with one process).
    """
    name = f"step-{int(meta['step']):08d}"
    tmp, final = root / f"{_TMP}{name}", root / name
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    torch.save(rank_state, tmp / f"rank{rank}.pt")
    if rank == 0:
        torch.save(model_state(), tmp / "model.pt")
        torch.save(train_state(), tmp / "train.pt")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    barrier()
    if rank == 0:
        if final.exists():  # a resume from an older checkpoint passes this step again
            stale = root / f"{_TMP}stale-{name}"
            os.replace(final, stale)
            shutil.rmtree(stale)
        os.replace(tmp, final)
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old.path, ignore_errors=True)
    barrier()
    return final


def clean_partial(root: Path) -> None:
    """Remove what a killed save left behind (rank 0, before training starts)."""
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith(_TMP):
                shutil.rmtree(path, ignore_errors=True)
