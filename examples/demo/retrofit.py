"""The embedded demo: a short-context checkpoint becomes a long-context one on 2 CPU cores in about 10 minutes.

python examples/demo/retrofit.py               # what `make demo` runs
python examples/demo/retrofit.py --steps 20    # a quick look (the model barely changes)

It runs recipes/demo.yaml with lcplug's training runner: the shipped base (examples/demo/base, a
512-position byte-level Llama pretrained by examples/demo/pretrain_base.py) is patched with YaRN x4
and a 3:1 sliding-window/full hybrid, evaluated (passkey + perplexity at 512, 1024 and 2048 tokens),
continued-pretrained at 2048 tokens on stdlib code mixed with synthetic passkey samples, and evaluated
again. Out come the before/after table, heatmap and perplexity PNGs (build/demo/eval/) and a
Hub-ready folder (build/demo/final/: weights, config with the manifest, model card).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from lcplug.train import Recipe, train

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "demo.yaml"


def headline(evals: dict[str, dict[str, float]], length: int) -> str:
    """One line at `length` tokens: the base as shipped -> patched, untrained -> retrofitted."""
    parts = []
    for key, label, fmt in (("passkey/accuracy", "passkey accuracy", "{:.0%}"), ("ppl", "perplexity", "{:.2f}")):
        values = [evals.get(when, {}).get(f"eval/{key}@{length}") for when in ("base", "before", "after")]
        parts.append(f"{label} " + " -> ".join("-" if v is None else fmt.format(v) for v in values))
    return f"at {length:>5} tokens (base -> patched -> retrofitted): " + ", ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, help="train this many steps instead of the recipe's")
    parser.add_argument("--base", help="another base checkpoint directory (default: the shipped one)")
    args = parser.parse_args()
    os.chdir(ROOT)  # the recipe's paths are relative to the repository root
    raw = Recipe.from_yaml(RECIPE).to_dict()
    if args.steps is not None:
        raw["stages"][0]["steps"] = args.steps
    if args.base is not None:
        raw["base"]["model"] = args.base
    recipe = Recipe.from_dict(raw)
    summary = train(recipe)
    out = Path(summary["output"])
    print()
    print((out / "eval" / "table.txt").read_text())
    lengths = recipe.eval.lengths
    for length in lengths:
        print(headline(summary["eval"], length))
    print(f"\ntrained {summary['steps']} steps ({summary['tokens']:,} tokens) in {summary['seconds'] / 60:.1f} min")
    print(f"plots: {', '.join(sorted(p.name for p in (out / 'eval').glob('*.png')))} in {out / 'eval'}")
    print(f"Hub-ready folder: {summary['final']} (lcplug.from_pretrained reloads it patched)")


if __name__ == "__main__":
    main()
