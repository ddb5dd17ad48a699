"""Attention benchmark: dense SDPA vs block-sparse executors, side by side in one run.

    python benchmarks/attention.py                       # 4K..64K, every pattern and executor
    python benchmarks/attention.py --lengths 4096 8192 --patterns sliding-window --no-backward

Each measurement runs in a fresh subprocess (batch 1, 8 heads, head dim 64, fp32, 2 threads), so its
peak RSS is its own. Columns: time of the attention call, speed-up over dense SDPA causal at the same
length, the FLOP-ratio bound (causal pairs / pairs the pattern keeps: the speed-up a perfect sparse
kernel would reach), the fraction of that bound reached, the time to build the block layout (once per
forward pass, shared by all layers with that pattern, so timed apart), and peak RSS. Results also go to
a JSON file and a PNG plot.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HEADS, DIM = 8, 64
PATTERNS = ("sliding-window", "loza", "dsa")
EXECUTORS = ("torch", "flex", "flex-native", "reference")
NATIVE_FLEX = {"sliding-window", "loza"}  # patterns torch's own create_block_mask can express as a mask_mod
REFERENCE_MAX = 4096  # the dense reference is O(N^2) in time and memory


def _worker(args: argparse.Namespace) -> dict:
    """Runs inside the subprocess: build inputs, warm up once, time one call."""
    import resource
    import time

    import torch
    from transformers.masking_utils import causal_mask_function

    from lcplug.attention.blocks import static_layout
    from lcplug.attention.executors import RUNNERS
    from lcplug.attention.mask import LazyMask

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n = args.length
    grad = args.mode == "fwd+bwd"
    q, k, v = (torch.randn(1, HEADS, n, DIM, requires_grad=grad) for _ in range(3))
    mask = LazyMask(
        batch_size=1,
        q_length=n,
        kv_length=n,
        q_offset=0,
        kv_offset=0,
        mask_function=causal_mask_function,
        attention_mask=None,
        device=torch.device("cpu"),
    )

    def run():
        if args.pattern == "dense":
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            if args.executor == "flex-native":
                out = native_flex(q, k, v, block_mask=block_mask, scale=DIM**-0.5)
            elif args.executor == "reference":
                from lcplug.attention.reference import reference_attention

                out, _ = reference_attention(q, k, v, layout.to_dense(), DIM**-0.5)
            else:
                out = RUNNERS[args.executor](q, k, v, layout, DIM**-0.5)
        if grad:
            out.sum().backward()
        return out

    def _layout(pattern, mask, q, k):
        if pattern == "dsa":
            from lcplug.attention.blocks import layout_from_blocks
            from lcplug.attention.positions import pattern_positions

            # top-(2048/64) key blocks per query block from a block-mean score, as an indexer would give
            bs, topk = 64, 2048 // 64
            nb = n // bs
            qm, km = q.detach().mean(1).view(nb, bs, DIM).mean(1), k.detach().mean(1).view(nb, bs, DIM).mean(1)
            scores = (qm @ km.T).masked_fill(torch.ones(nb, nb, dtype=torch.bool).triu(1), float("-inf"))
            scores.diagonal().fill_(float("inf"))
            top = scores.topk(min(topk, nb), dim=-1)
            blocks = torch.where(torch.isfinite(top.values) | (top.values > 0), top.indices, -1).sort(-1).values
            q_pos, kv_pos = pattern_positions(mask, None, q.device)
            return layout_from_blocks(blocks[None, None], mask, None, q_pos, kv_pos, block_q=bs, block_k=bs)
        from lcplug.attention.pattern import SlidingWindowPattern

        if pattern == "sliding-window":
            pat = SlidingWindowPattern(1024, 4, 64)
        else:
            from lcplug.plugins.attention.loza import StreamingBlocksPattern

            pat = StreamingBlocksPattern(sink_blocks=1, local_blocks=7, block=128)
        return static_layout(pat, mask, None, block_q=pat.block_size, block_k=pat.block_size)

    if args.executor == "flex-native":  # FlexAttention used directly: create_block_mask from a mask_mod
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        native_flex = torch.compile(flex_attention, dynamic=False)
        if args.pattern == "sliding-window":

            def mask_mod(b, h, qi, ki):
                return (ki <= qi) & (((qi - ki) < 1024) | (ki < 4))

        else:

            def mask_mod(b, h, qi, ki):
                return (ki <= qi) & ((ki < 128) | ((qi // 128 - ki // 128) <= 6))

        block_mask = create_block_mask(mask_mod, None, None, n, n, device="cpu", _compile=True)
    # the layout is built once per forward pass and shared by every layer with the pattern: timed apart
    start = time.perf_counter()
    layout = None if args.pattern == "dense" else _layout(args.pattern, mask, q, k)
    if layout is not None:
        layout.band()
    layout_seconds = time.perf_counter() - start
    kept = n * (n + 1) // 2 if layout is None else int(layout.mask.sum())
    if layout is not None or args.executor == "flex-native":
        run()  # warm-up: compilation (flex) and the layout's derived tensors (biases, BlockMask), which a model
        # builds once per forward pass and shares across its layers
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "layout_seconds": layout_seconds, "pairs": kept, "peak_mib": peak}


def measure(length: int, pattern: str, executor: str, mode: str, threads: int, timeout: int) -> dict | None:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        "--length",
        str(length),
        "--pattern",
        pattern,
        "--executor",
        executor,
        "--mode",
        mode,
        "--threads",
        str(threads),
    ]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout {timeout}s"}
    if res.returncode != 0:
        return {"error": (res.stderr.strip().splitlines() or ["failed"])[-1][:80]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536])
    parser.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=PATTERNS)
    parser.add_argument("--executors", nargs="+", default=list(EXECUTORS), choices=EXECUTORS)
    parser.add_argument("--no-backward", action="store_true", help="forward only")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per measurement")
    parser.add_argument("--out", default="benchmarks/results/attention")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--pattern", help=argparse.SUPPRESS)
    parser.add_argument("--executor", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args)))
        return 0

    modes = ["fwd"] if args.no_backward else ["fwd", "fwd+bwd"]
    rows = []
    header = (
        f"{'N':>6} {'mode':<8} {'pattern':<15} {'executor':<9} {'time s':>8} {'speed-up':>8} {'bound':>7} "
        f"{'% bound':>8} {'layout s':>8} {'peak MiB':>9}"
    )
    print(header)
    print("-" * len(header))
    for n in args.lengths:
        for mode in modes:
            dense = measure(n, "dense", "sdpa", mode, args.threads, args.timeout)
            _print_row(rows, n, mode, "dense causal", "sdpa", dense, dense)
            for pattern in args.patterns:
                for executor in args.executors:
                    if executor == "reference" and n > REFERENCE_MAX:
                        continue
                    if executor in ("flex", "flex-native") and mode == "fwd+bwd":
                        continue  # FlexAttention has no backward on the CPU
                    if executor == "flex-native" and pattern not in NATIVE_FLEX:
                        continue
                    res = measure(n, pattern, executor, mode, args.threads, args.timeout)
                    _print_row(rows, n, mode, pattern, executor, res, dense)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    _plot(rows, out.with_suffix(".png"))
    print(f"\nwrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return 0


def _print_row(rows, n, mode, pattern, executor, res, dense) -> None:
    row = {"length": n, "mode": mode, "pattern": pattern, "executor": executor, **(res or {})}
    if "seconds" in row and dense and "seconds" in dense:
        row["speedup"] = dense["seconds"] / row["seconds"]
        row["bound"] = dense["pairs"] / row["pairs"]
        row["fraction_of_bound"] = row["speedup"] / row["bound"]
    rows.append(row)
    if "error" in row:
        print(f"{n:>6} {mode:<8} {pattern:<15} {executor:<9} {row['error']}")
        return
    print(
        f"{n:>6} {mode:<8} {pattern:<15} {executor:<9} {row['seconds']:>8.3f} {row.get('speedup', 0):>8.2f} "
        f"{row.get('bound', 0):>7.2f} {100 * row.get('fraction_of_bound', 0):>7.0f}% "
        f"{row.get('layout_seconds', 0):>8.3f} {row['peak_mib']:>9.0f}",
        flush=True,
    )


def _plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (pattern, executor, mode), group in _groups(rows).items():
        xs = [r["length"] for r in group]
        axes[0].plot(xs, [r["seconds"] for r in group], marker="o", label=f"{pattern}/{executor} {mode}")
        axes[1].plot(xs, [r["peak_mib"] for r in group], marker="o", label=f"{pattern}/{executor} {mode}")
    for ax, label in zip(axes, ["seconds", "peak RSS (MiB)"]):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6)
    fig.suptitle("lcplug attention: fp32, batch 1, 8 heads, head dim 64, 2 CPU threads")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _groups(rows):
    out: dict = {}
    for r in rows:
        if "seconds" in r:
            out.setdefault((r["pattern"], r["executor"], r["mode"]), []).append(r)
    return out


if __name__ == "__main__":
    sys.exit(main())
