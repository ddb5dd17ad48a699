"""Attention benchmark: dense SDPA vs block-sparse executors, side by side in one run.

    python benchmarks/attention.py                       # 4K..64K, every pattern and executor
    python benchmarks/attention.py --lengths 4096 8192 --patterns sliding-window --no-backward
    python benchmarks/attention.py --lengths 32768 --patterns sliding-window --rounds 3   # fastest of 3, interleaved

Each measurement runs in a fresh subprocess (batch 1, 8 heads, head dim 64, fp32, 2 threads), so its
peak RSS is its own. Columns: time of the attention call, speed-up over dense SDPA causal at the same
length, the FLOP-ratio bound (causal pairs / pairs the pattern keeps: the speed-up a perfect sparse
kernel would reach), the fraction of that bound reached, the time to build the block layout (once per
forward pass, shared by all layers with that pattern, so timed apart), and peak RSS. Results also go to
a JSON file and a PNG plot.

`mla` is not a pattern but a cache format: keys and values up-projected from a latent of rank H * D (half
of dense K/V) plus 16 decoupled rope dims per head, then dense causal SDPA (one row, under the `torch`
executor's name). Its speed-up below 1 is the up-projection's cost; every JSON row carries
`kv_bytes_per_token` (fp32, one layer), so mla's can be read against dense's.

`hysparse` times one sparse layer with the plugin's default params: its window branch and its queries over
the full layer's K/V on the blocks that layer chose (inputs here stand in for both layers), mixed by
gates of 0.5. The choice (one more q . k pass in the full layer, per group) is the `layout s` column. Its
`kv_bytes_per_token` is per layer averaged over one group of `period` layers: the shared K/V once, plus
window and sinks for each sparse layer.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from worker import run_worker

HEADS, DIM = 8, 64
PATTERNS = ("sliding-window", "loza", "dsa", "ksa", "csa", "hca", "nsa", "mla", "hysparse")
COMPRESSED = {"ksa", "csa", "hca", "nsa"}  # whole layers (pooling + branches), default params, torch/reference only
LAYERS = COMPRESSED | {"hysparse"}  # timed as whole layer calls, torch/reference executors only
EXECUTORS = ("torch", "flex", "flex-native", "reference")
NATIVE_FLEX = {"sliding-window", "loza"}  # patterns torch's own create_block_mask can express as a mask_mod
REFERENCE_MAX = 4096  # the dense reference is O(N^2) in time and memory
MLA_RANK, MLA_ROPE = HEADS * DIM, 16  # mla: latent size per token; rope dims per head kept outside the latent


def _mla_inputs(n: int, grad: bool):
    """What an `mla` cache holds for n tokens (latent (n, rank), rope keys (1, H, n, rope dims)) and the
    up-projection."""
    import torch

    latent = torch.randn(n, MLA_RANK, requires_grad=grad)
    rope_key = torch.randn(1, HEADS, n, MLA_ROPE, requires_grad=grad)
    up = torch.randn(MLA_RANK, HEADS * (2 * DIM - MLA_ROPE), requires_grad=grad) * MLA_RANK**-0.5
    return latent, rope_key, up


def _mla_attention(q, latent, rope_key, up):
    """Up-project keys (nope dims) and values from the latent, join the rope keys, run dense causal SDPA."""
    import torch

    n, split = latent.shape[0], HEADS * (DIM - MLA_ROPE)
    expanded = latent @ up
    nope = expanded[:, :split].view(n, HEADS, -1).transpose(0, 1)[None]
    value = expanded[:, split:].view(n, HEADS, DIM).transpose(0, 1)[None]
    key = torch.cat((rope_key, nope), dim=-1)
    return torch.nn.functional.scaled_dot_product_attention(q, key, value, is_causal=True)


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

    mla = _mla_inputs(n, grad) if args.pattern == "mla" else None

    def run():
        if mla is not None:
            out = _mla_attention(q, *mla)
        elif args.pattern in COMPRESSED:
            out, _ = compressed(stub, q, k, v, mask, scaling=DIM**-0.5)
        elif args.pattern == "hysparse":
            reader.shared.put(choice)  # what the group's full layer hands over in each forward pass
            out, _ = reader(stub, q, k, v, mask, scaling=DIM**-0.5)
        elif args.pattern == "dense":
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
    layout = None if args.pattern in ("dense", "mla", *LAYERS) else _layout(args.pattern, mask, q, k)
    if args.pattern == "hysparse":  # the full layer's block choice, made once per forward pass per group
        stub = torch.nn.Module()
        oracle, reader, hysparse = _hysparse_layers(args.executor)
        choice = oracle.choose(stub, q, k, v, mask, DIM**-0.5, {})
    if layout is not None:  # what the executors derive from it once per forward pass
        layout.band()
        layout.row_ranges()
    layout_seconds = time.perf_counter() - start
    kept = n * (n + 1) // 2 if layout is None else int(layout.mask.sum())
    if args.pattern in COMPRESSED:  # layouts are built inside the layer's call: included in its time
        compressed, stub = _compressed_layer(args.pattern), torch.nn.Module()
        compressed.executor = "reference" if args.executor == "reference" else "torch"
        kept = _compressed_pairs(compressed, n)
    if args.pattern == "hysparse":
        window = reader.window.pattern
        kept = int(static_layout(window, mask, None, block_q=64, block_k=64).mask.sum())
        kept += int(choice.layout().mask.sum())
    if layout is not None or args.executor == "flex-native" or args.pattern in LAYERS:
        run()  # warm-up: compilation (flex) and the layout's derived tensors (biases, BlockMask), which a model
        # builds once per forward pass and shares across its layers
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kv_elements = MLA_RANK + HEADS * MLA_ROPE if mla is not None else 2 * HEADS * DIM
    if args.pattern == "hysparse":
        kept_tokens = min(n, hysparse.window + hysparse.sinks)
        kv_elements *= (1 + (hysparse.period - 1) * kept_tokens / n) / hysparse.period
    return {
        "seconds": seconds,
        "layout_seconds": layout_seconds,
        "pairs": kept,
        "peak_mib": peak,
        "kv_bytes_per_token": compressed.kv_bytes_per_token(n, 4) if args.pattern in COMPRESSED else 4 * kv_elements,
    }


def _compressed_layer(pattern: str):
    """One ksa/csa/hca/nsa layer with the plugin's default params, for 8 heads (MHA) of head dim 64."""
    import torch

    from lcplug.attention.compress import Compressor
    from lcplug.registry import get_registry

    plugin = get_registry().get("attention", pattern).build({})
    p = plugin.params
    geometry = p.geometry()
    return plugin.layer_class(
        None,
        "sdpa",
        geometry=geometry,
        compressor=Compressor(HEADS, DIM, geometry.size, torch.float32),
        kv_heads=HEADS,
        head_dim=DIM,
        num_heads=HEADS,
        block_size=p.block_size,
        executor="torch",
        **plugin.layer_extras(0, HEADS, HEADS, DIM, torch.float32),
    )


def _hysparse_layers(executor: str):
    """A full layer choosing blocks and one sparse layer reading them, with the plugin's default params."""
    import torch

    from lcplug.attention import PatternAttention, SlidingWindowPattern
    from lcplug.attention.crosslayer import OracleAttention, ReaderAttention, SharedKV
    from lcplug.registry import get_registry

    p = get_registry().get("attention", "hysparse").build({}).params
    shared = SharedKV(readers=1)
    oracle = OracleAttention(None, "sdpa", shared, topk=p.topk, block_size=p.block_size)
    pattern = SlidingWindowPattern(p.window, p.sinks, p.block_size)
    window = PatternAttention(None, "sdpa", pattern, num_heads=HEADS, executor=executor)
    gate = torch.full((HEADS,), 0.5)
    return oracle, ReaderAttention(None, "sdpa", shared, window, gate, layer_idx=1, executor=executor), p


def _compressed_pairs(layer, n: int) -> int:
    """(query, key-or-entry) pairs the layer scores at length n: its raw window plus the entries it reads."""
    import torch

    g, pos = layer.geometry, torch.arange(n)
    raw = (pos - layer.pattern_raw.window_start(pos).clamp(min=0) + 1).sum()
    end = layer.pattern_raw.window_start(pos) if g.disjoint else pos + 1
    entries = torch.where(end >= g.size, (end - g.size) // g.stride + 1, 0)
    if layer.topk is not None:
        entries = entries.clamp(max=layer.topk)
    if hasattr(layer, "select_count"):  # nsa: plus the selected raw blocks
        entries = entries + torch.clamp(pos + 1, max=layer.select_count * layer.select_block)
    return int(raw + entries.sum())


def measure(length: int, pattern: str, executor: str, mode: str, opts: argparse.Namespace) -> dict | None:
    args = ["--length", str(length), "--pattern", pattern, "--executor", executor, "--mode", mode]
    return run_worker(__file__, [*args, "--threads", str(opts.threads)], opts.timeout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536])
    parser.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=PATTERNS)
    parser.add_argument("--executors", nargs="+", default=list(EXECUTORS), choices=EXECUTORS)
    parser.add_argument("--no-backward", action="store_true", help="forward only")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1, help="times each row is measured, interleaved")
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
            group = [("dense causal", "sdpa")] + [
                (pattern, executor)
                for pattern in args.patterns
                for executor in args.executors
                if _runs(n, mode, pattern, executor)
            ]
            results = _fastest_of_rounds(n, mode, group, args)
            for (pattern, executor), res in zip(group, results):
                _print_row(rows, n, mode, pattern, executor, res, results[0])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    _plot(rows, out.with_suffix(".png"))
    print(f"\nwrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return 0


def _runs(n: int, mode: str, pattern: str, executor: str) -> bool:
    """Whether this (pattern, executor) row exists at this length and mode."""
    if executor == "reference" and n > REFERENCE_MAX:
        return False
    if executor in ("flex", "flex-native") and mode == "fwd+bwd":
        return False  # FlexAttention has no backward on the CPU
    if executor == "flex-native" and pattern not in NATIVE_FLEX:
        return False
    if pattern in LAYERS and executor not in ("torch", "reference"):
        return False
    return pattern != "mla" or executor == "torch"  # mla: one row, the up-projection and SDPA only


def _fastest_of_rounds(n: int, mode: str, group: list[tuple[str, str]], args: argparse.Namespace) -> list[dict]:
    """Each row of one length and mode measured `args.rounds` times, the rounds interleaved (dense, then every
    executor, then again), so that load which comes and goes on a shared machine hits numerator and
    denominator alike; each row keeps its fastest round."""
    rounds = [
        [measure(n, "dense" if executor == "sdpa" else pattern, executor, mode, args) for pattern, executor in group]
        for _ in range(max(1, args.rounds))
    ]
    return [min(row, key=lambda res: res.get("seconds", float("inf"))) for row in zip(*rounds)]


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
