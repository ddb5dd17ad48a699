"""One variant's retrofit: the same two-stage budget for every variant, run by lcplug's training runner.

Stage "adapt" trains the variant's own retrofit group (compressors on a distillation loss, gates,
latent projections, memory tables; `all` where a variant has none), stage "heal" trains everything on
the LM loss. Steps, tokens per step, learning rate, schedule and data are the same for every variant.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from specs import Variant

from lcplug.train import Recipe, train

ROPE = "yarn:factor=4,original_max_position_embeddings=512"
"""YaRN x4 over the base's 512 positions, for every variant (2048 positions: room for 1024 + the answer)."""


@dataclass(frozen=True)
class Budget:
    """What every variant gets: `steps` optimizer steps of `batch_size` x `seq_len` tokens at `lr`."""

    steps: int = 16
    seq_len: int = 1024
    batch_size: int = 2
    lr: float = 5.0e-4

    @property
    def adapt_steps(self) -> int:
        """A quarter of the steps (at least one) for the variant's own stage, the rest for healing."""
        return max(1, self.steps // 4)


def recipe(name: str, variant: Variant, base: Path, budget: Budget, out: Path) -> dict[str, Any]:
    """The recipe (as a mapping) retrofitting `base` with `variant` into `out`."""
    schedule = {"warmup": 0, "decay": "constant"}
    longest = budget.seq_len - 8  # the answer " 12345." and EOS must fit the row
    passkey_lengths = sorted({200, max(200, longest // 2), longest})  # 163 tokens are intro, needle, question
    common = {"lr": budget.lr, "schedule": schedule, "grad_clip": 1.0}
    return {
        "name": f"compare-{name}",
        "seed": 0,
        "base": {"model": str(base)},
        "tokenizer": "bytes",
        "patch": {"rope": ROPE, "attention": variant.attention},
        "data": {
            "eos_id": 256,
            "pad_id": 257,
            "seq_len": budget.seq_len,
            "batch_size": budget.batch_size,
            "sources": {
                "code": "code",
                "passkey": {"name": "needles", "task": "passkey", "lengths": passkey_lengths},
            },
            "mixture": "code@0.5,passkey@0.5",
        },
        "stages": [
            {
                "name": "adapt",
                "train": variant.adapt_train,
                "losses": variant.adapt_losses,
                "steps": budget.adapt_steps,
                "finalize": variant.finalize,
                **common,
            },
            {
                "name": "heal",
                "train": "all",
                "losses": {"lm": 1.0, **variant.heal_losses},
                "steps": budget.steps - budget.adapt_steps,
                **common,
            },
        ],
        "output": {"dir": str(out), "checkpoint_every": 0, "log": ["jsonl"]},
    }


def retrofit(name: str, variant: Variant, base: Path, budget: Budget, out: Path) -> dict[str, Any]:
    """Train the variant from scratch into `out` (any earlier run there is removed); the runner's summary."""
    if out.exists():
        shutil.rmtree(out)
    return train(Recipe.from_dict(recipe(name, variant, base, budget, out)))
