"""Attention variants side by side on the demo model: retrieval and KV size after the same retrofit budget.

python examples/compare/variants.py            # all ten variants (~40 min on 2 shared CPU cores, base included)
python examples/compare/variants.py --quick    # full vs sliding-window, shipped base, tiny budget (smoke run)

1. Base: the shipped demo base cannot retrieve, so recipes/compare-base.yaml continue-pretrains it on
   passkey samples at 256 tokens (cached in build/compare/base; reruns skip it).
2. Each variant (examples/compare/specs.py) patches that base with YaRN x4 and its attention, trains its
   own retrofit stage then all weights (the same steps, tokens, lr and data for all: retrofit.py), at 1024
   tokens with raw windows of 128.
3. Each retrofitted model (reloaded with lcplug.from_pretrained from the runner's final/) is evaluated with
   lcplug.eval (passkey over depths at 256, 512, 1024 tokens; perplexity at 1024) and its KV tier's bytes
   per token after a 1024-token prefill are measured (measure.py).
Out: a table on stdout, examples/compare/results/{results.json,accuracy_vs_kv.png} (report.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: the sibling modules

from base import ROOT, ensure_base
from measure import kv_bytes_per_token, probes, retrieval
from report import table, write
from retrofit import ROPE, Budget, retrofit
from specs import QUICK, VARIANTS

from lcplug.eval import Haystack, load_for_eval

RESULTS = Path(__file__).resolve().parent / "results"
SHIPPED_BASE = ROOT / "examples" / "demo" / "base"
"""The quick mode's base: the shipped demo base as is (it cannot retrieve; the quick mode checks plumbing)."""


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="full and sliding-window on the shipped base, a tiny budget, in build/"
    )
    parser.add_argument("--variants", help=f"comma-separated subset of: {', '.join(VARIANTS)}")
    parser.add_argument("--steps", type=int, help="retrofit steps per variant (default 16; quick: 2)")
    parser.add_argument("--samples", type=int, help="passkey samples per (length, depth) (default 2; quick: 1)")
    parser.add_argument("--out", type=Path, help="results directory (default examples/compare/results; quick: build/)")
    return parser.parse_args(argv)


def measure_variant(
    name: str, base: Path, budget: Budget, probe_list: list[Any], haystack: Haystack, out: Path
) -> dict[str, Any]:
    """Retrofit one variant, reload its final checkpoint patched, and measure it: one results row."""
    variant = VARIANTS[name]
    summary = retrofit(name, variant, base, budget, out)
    model, tokenizer = load_for_eval(summary["final"])
    return {
        "variant": name,
        "attention": variant.attention,
        "adapt_train": variant.adapt_train,
        "final_attention": summary["manifest"]["spec"].get("attention"),
        **retrieval(model, tokenizer, probe_list, haystack, label=name),
        "kv_bytes_per_token": kv_bytes_per_token(model, tokenizer, haystack, budget.seq_len),
        "train_seconds": summary["seconds"],
        "train_tokens": summary["tokens"],
    }


def compare(args: argparse.Namespace) -> dict[str, Any]:
    """Train (or reuse) the base, retrofit and measure each variant; the results as one mapping."""
    quick = args.quick
    names = args.variants.split(",") if args.variants else list(QUICK if quick else VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {', '.join(unknown)}; valid: {', '.join(VARIANTS)}")
    build = ROOT / "build" / ("compare-quick" if quick else "compare")
    budget = Budget(steps=args.steps or (2 if quick else 16), seq_len=256 if quick else 1024)
    lengths = [256] if quick else [256, 512, 1024]
    samples = args.samples or (1 if quick else 2)
    started = time.perf_counter()
    base, base_summary = (SHIPPED_BASE, {}) if quick else ensure_base()
    haystack = Haystack()
    probe_list = probes(lengths, samples, ppl_length=budget.seq_len)
    rows = []
    for name in tqdm(names, desc="variants", unit="variant"):
        try:
            rows.append(measure_variant(name, base, budget, probe_list, haystack, build / "runs" / name))
        except Exception as exc:  # one variant failing must not cost the others' hour of compute
            rows.append({"variant": name, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"})
            tqdm.write(f"{name} failed: {rows[-1]['error']}")
    measured = [r for r in rows if "error" not in r]
    dense = next((r["kv_bytes_per_token"] for r in measured if r["variant"] == "full"), None)
    for row in measured:
        row["kv_vs_dense"] = row["kv_bytes_per_token"] / dense if dense else float("nan")
    return {
        "settings": {
            "rope": ROPE,
            "budget": asdict(budget),
            "eval_lengths": lengths,
            "passkey_samples_per_cell": samples,
            "base": str(base.relative_to(ROOT)),
            "base_eval": base_summary.get("eval"),
            "base_train_seconds": base_summary.get("seconds"),
            "command": "python examples/compare/variants.py " + " ".join(sys.argv[1:]),
            "total_seconds": round(time.perf_counter() - started, 1),
        },
        "variants": rows,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    os.chdir(ROOT)  # recipes name paths relative to the repository root
    results = compare(args)
    print()
    print(table(results["variants"], results["settings"]["eval_lengths"]))
    out = args.out or (ROOT / "build" / "compare-quick" / "results" if args.quick else RESULTS)
    for path in write(results, out):
        print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
