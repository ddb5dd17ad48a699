"""Quickstart: patch a model in one line, save it with its manifest, reload it patched, unpatch it.

python examples/quickstart.py                 # a tiny random Llama built from a config (no download)
python examples/quickstart.py path/to/ckpt    # any local transformers causal-LM checkpoint
"""

from __future__ import annotations

import json
import sys
import tempfile

import torch
from transformers import AutoModelForCausalLM

import lcplug
from lcplug.testing import tiny_model


def main(path: str | None = None) -> None:
    def load():
        if path:
            return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        return tiny_model("llama", num_hidden_layers=6)

    model, twin = load(), load()
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(3, vocab, (1, 96), generator=torch.Generator().manual_seed(0))

    print("installed plugins:")
    for row in lcplug.list_plugins():
        print(f"  {row['kind']:<10} {row['name']:<16} {row['origin']} {row['version']}  {row['summary'][:60]}")

    with torch.no_grad():
        before = model(ids).logits
        # one line: 5 sliding-window layers per full layer, YaRN x4 on every layer, on this instance only
        lcplug.patch(model, attention="sliding-window:window=32,sinks=4", rope="yarn:factor=4", layers="5:1")
        after = model(ids).logits
        print(f"\npatched: max |logit change| {float((after - before).abs().max()):.4f}")
        print(f"an unpatched twin in the same process is untouched: {torch.equal(twin(ids).logits, before)}")
        print("manifest (config.lcplug):\n" + json.dumps(lcplug.manifest_of(model)["spec"], indent=2))

        with tempfile.TemporaryDirectory() as tmp:
            lcplug.save_pretrained(model, tmp)
            reloaded = lcplug.from_pretrained(tmp)
            print(f"reloaded with lcplug.from_pretrained: identical logits {torch.equal(reloaded(ids).logits, after)}")

        lcplug.unpatch(model)
        print(f"unpatched: bit-identical to before {torch.equal(model(ids).logits, before)}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
