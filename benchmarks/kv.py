"""KV-tier benchmark: the default cache vs lcplug's device, host and disk tiers, dense vs sparse, side by side.

    python benchmarks/kv.py                                   # 16K..256K, every variant and tier
    python benchmarks/kv.py --lengths 131072 --variants dsa --tiers default disk
    python benchmarks/kv.py --million                         # the 1M-token run (sliding window, disk tier)
    python benchmarks/kv.py --lengths 4096 16384 65536 --variants dense ksa csa hca --tiers default device

Each measurement runs in a fresh subprocess (2 threads, fp32), so its peak RSS is its own. The model is a
tiny random Llama shaped like a real one where it matters for the cache (4 layers, 4 KV heads of dim 64:
2 KiB of K/V per token and layer, the per-layer figure of Llama-3-8B's 8 x 128 heads in bf16 halved). The
context goes in by chunks of 4096 tokens, either synthetic (the default: random K/V stored through
`cache.update`, see `_fill`) or by a real prefill through `model(...)` (`--fill model`); then 16 tokens
are decoded greedily through the model after 2 warm-up steps.

Columns: decode tokens/s and its ratio to the default cache (transformers' `DynamicCache`) of the same
variant at the same length; resident KV (bytes on the compute device at the end: hot blocks, open tail,
indexer keys, compressed entries) and its ratio to the default cache's (which holds every raw token: for
the compressed variants, their KV bytes per token against dense attention); lower-tier bytes read per
decoded token; fill seconds; peak RSS. With `--fill model`, dense attention stops at 64K: its prefill is
O(N^2) (minutes per run on 2 cores beyond that). Results also go to a JSON file and a PNG plot.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from worker import run_worker

VARIANTS = {
    "dense": None,  # the model as loaded: a tier can only hand it full-length K/V
    "full": "full",  # the same attention through lcplug's dispatcher: spilled blocks are streamed
    "sliding-window": "sliding-window:window=2048,sinks=4,block_size=64",
    "dsa": "dsa:stage=sparse,topk=2048,block_size=64,heads=4,dim=16",
    # compressed layers at their published geometries: the tiers keep the raw window plus pooled entries
    "ksa": "ksa:chunk=8,window=128,block_size=64",
    "csa": "csa:size=8,stride=4,window=128,topk=512,heads=4,dim=64,block_size=64",
    "hca": "hca:size=128,window=128,block_size=64",
}
TIERS = ("default", "device", "host", "disk")
HOT_TOKENS = 4096
DENSE_MAX = 65536
CHUNK, DECODE, WARMUP = 4096, 16, 2
MODEL = {
    "vocab_size": 512,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "tie_word_embeddings": False,
}


def _worker(args: argparse.Namespace) -> dict:
    """Runs inside the subprocess: build the model and cache, prefill in chunks, time greedy decode."""
    import resource
    import time

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

    import lcplug
    from lcplug.kv import TieredCache

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", max_position_embeddings=args.length + 1024, **MODEL)
    model = AutoModelForCausalLM.from_config(config).eval()
    if VARIANTS[args.variant]:
        lcplug.patch(model, attention=VARIANTS[args.variant])
    with tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
        if args.tier == "default":
            cache = DynamicCache()
        else:
            cache = TieredCache(model, tier=args.tier, hot_tokens=HOT_TOKENS, path=scratch)
        with torch.no_grad():
            start = time.perf_counter()
            out = _fill(model, cache, args.length, args.fill)
            prefill = time.perf_counter() - start
            token = out.logits[:, -1].argmax(-1, keepdim=True) if out is not None else torch.tensor([[3]])
            read_before, elapsed = _bytes_read(cache), 0.0
            for step in range(WARMUP + DECODE):
                if step == WARMUP:
                    read_before, start = _bytes_read(cache), time.perf_counter()
                pos = torch.tensor([[args.length + step]])
                out = model(input_ids=token, position_ids=pos, past_key_values=cache, use_cache=True)
                token = out.logits[:, -1].argmax(-1, keepdim=True)
            elapsed = time.perf_counter() - start
        row = {
            "variant": args.variant,
            "tier": args.tier,
            "length": args.length,
            "decode_tok_s": DECODE / elapsed,
            "resident_bytes": _resident(cache),
            "read_per_token": (_bytes_read(cache) - read_before) / DECODE,
            "fill": args.fill,
            "prefill_s": prefill,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }
        if args.tier != "default":
            cache.close()
    return row


def _fill(model, cache, length: int, how: str):
    """Put `length` tokens into `cache` in chunks; return the last output (None for a synthetic fill).

    `model`: a real chunked prefill through `model(...)`. `synthetic`: every layer's K/V drawn at random and
    stored through `cache.update`, as the attention layers would store them (DSA layers compute their
    indexer keys from them, compressed layers pool their entries): the cache then holds exactly what a
    prefill leaves, without the prefill's O(N^2) attention (dense) or indexer (DSA), which would take hours
    at 128K on 2 cores. Decode is the model's real forward either way.
    """
    import torch

    config = model.config
    gen = torch.Generator().manual_seed(1)
    out = None
    for lo in range(0, length, CHUNK):
        hi = min(length, lo + CHUNK)
        pos = torch.arange(lo, hi)[None]
        if how == "model":
            ids = torch.randint(3, config.vocab_size, (1, hi - lo), generator=gen)
            out = model(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True, logits_to_keep=1)
            continue
        shape = (1, config.num_key_value_heads, hi - lo, config.head_dim)
        for layer in range(config.num_hidden_layers):
            k, v = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
            cache.update(k, v, layer, kwargs={"position_ids": pos})
    return out


def _bytes_read(cache) -> int:
    return cache.stats()["bytes_read"] if hasattr(cache, "stats") else 0


def _resident(cache) -> int:
    if hasattr(cache, "stats"):
        return cache.stats()["resident_bytes"]
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def _measure(variant: str, tier: str, length: int, fill: str, threads: int, scratch: str | None) -> dict | None:
    args = ["--variant", variant, "--tier", tier, "--length", str(length), "--threads", str(threads), "--fill", fill]
    row = run_worker(__file__, args + (["--scratch", scratch] if scratch else []))
    if "error" in row:
        print(f"  {variant}/{tier}/{length}: failed: {row['error']}", file=sys.stderr)
        return None
    return row


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def table(rows: list[dict]) -> str:
    base = {(r["variant"], r["length"]): r for r in rows if r["tier"] == "default"}
    head = (
        "| context | variant | tier | decode tok/s | vs default | resident KV MiB | vs default | read/token KiB "
        "| fill s | peak RSS MiB |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        ref = base.get((r["variant"], r["length"]))
        speed = f"{r['decode_tok_s'] / ref['decode_tok_s']:.2f}x" if ref else "—"
        held = f"{r['resident_bytes'] / ref['resident_bytes']:.1%}" if ref else "—"
        lines.append(
            f"| {r['length'] // 1024}K | {r['variant']} | {r['tier']} | {r['decode_tok_s']:.1f} | {speed} | "
            f"{_mib(r['resident_bytes'])} | {held} | {r['read_per_token'] / 1024:.0f} | {r['prefill_s']:.1f} | "
            f"{_mib(r['peak_rss'])} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (variant, tier), style in _series(rows).items():
        pts = sorted((r["length"], r["decode_tok_s"], r["resident_bytes"]) for r in style)
        xs = [p[0] for p in pts]
        axes[0].plot(xs, [p[1] for p in pts], marker="o", label=f"{variant}/{tier}")
        axes[1].plot(xs, [p[2] / 2**20 for p in pts], marker="o", label=f"{variant}/{tier}")
    for ax, title in zip(axes, ("decode tokens/s", "resident KV (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_title(title)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _series(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    out: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        out.setdefault((r["variant"], r["tier"]), []).append(r)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=list(VARIANTS), default="dsa")
    parser.add_argument("--tier", choices=TIERS, default="disk")
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768, 65536, 131072, 262144])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--tiers", nargs="+", choices=TIERS, default=list(TIERS))
    parser.add_argument("--fill", choices=("synthetic", "model"), default="synthetic", help="how the context gets in")
    parser.add_argument("--million", action="store_true", help="only the 1M-token sliding-window disk run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scratch", default=None, help="directory for disk-tier files (default: system temp)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(args)))
        return
    if args.million:
        runs = [("sliding-window", "disk", 1 << 20)]
    else:
        runs = [
            (variant, tier, length)
            for length in args.lengths
            for variant in args.variants
            for tier in args.tiers
            if variant not in ("dense", "full") or length <= DENSE_MAX or args.fill == "synthetic"
        ]
    rows = []
    for variant, tier, length in runs:
        print(f"running {variant} / {tier} / {length} ...", file=sys.stderr, flush=True)
        fill = "model" if args.million else args.fill
        row = _measure(variant, tier, length, fill, args.threads, args.scratch)
        if row:
            rows.append(row)
    print(table(rows))
    name = "kv_1m" if args.million else "kv"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(rows, indent=1))
    if not args.million:
        plot(rows, args.out / f"{name}.png")


if __name__ == "__main__":
    main()
