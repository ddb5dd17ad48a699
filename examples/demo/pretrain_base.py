"""Make the demo's short-context base checkpoint: a random-init byte-level Llama, pretrained by lcplug's own runner.

python examples/demo/pretrain_base.py          # about 25 minutes on 2 CPU cores; writes examples/demo/base

The architecture is fixed here (the recipe cannot create a model from nothing); everything about the
training is in recipes/demo-base.yaml, run by `lcplug.train` exactly as any retrofit is.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lcplug.train import train

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "demo-base.yaml"
SHIPPED = Path(__file__).resolve().parent / "base"

CONFIG = LlamaConfig(
    vocab_size=258,  # bytes, then EOS (256) and padding (257)
    hidden_size=256,
    intermediate_size=672,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=8,
    max_position_embeddings=512,  # the short context the demo extends 4x
    rope_theta=10000.0,
    tie_word_embeddings=True,
    bos_token_id=None,
    eos_token_id=256,
    pad_token_id=257,
)


def main(out: Path = SHIPPED) -> None:
    os.chdir(ROOT)  # the recipe's paths are relative to the repository root
    torch.manual_seed(0)
    init = ROOT / "build" / "demo-init"
    LlamaForCausalLM(CONFIG).save_pretrained(init)
    summary = train(RECIPE)
    final = Path(summary["final"])
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(final, out)
    print(f"base checkpoint written to {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else SHIPPED)
