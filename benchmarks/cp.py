"""Context-parallel benchmark: every cp strategy on 1, 2 and 4 gloo processes, side by side in one run.

    nice -n 19 python benchmarks/cp.py                    # tiny Llama, one 16K-token row, fwd+bwd
    python benchmarks/cp.py --seq-len 4096 --worlds 1 2 --strategies ring ulysses

Each measurement is a fresh group of processes (one thread each, gloo on localhost) running one training
step of a small fp32 Llama (2 layers, hidden 512, MLP 1536, 4 heads, 2 KV heads of 64) on one packed row
of the same total length, sharded over the group. Columns per strategy and group size: the bytes each rank sent through
`lcplug.cp.comm` (data collectives; the step-flag and loss all-reduces are left out), the planner's
prediction for the same step (`lcplug.cp.planner`), the step's wall time (slowest rank), and each rank's
peak memory during the step (RSS high-water mark, reset after a warm-up step, over the RSS before it: the
step's own allocations, not the interpreter's, its lazy set-up or the gradient buffers), with its ratio to
the one-process run next to the ideal 1/P. The processes share
the machine's cores, so times show overheads, not speed-ups. Results also go to a JSON file and a PNG.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from worker import run_worker

STRATEGIES = {
    "ring": {"name": "ring"},
    "ring-contiguous": {"name": "ring", "layout": "contiguous"},
    "ulysses": {"name": "ulysses"},
    "allgather": {"name": "allgather"},
    "hybrid": {"name": "hybrid", "ulysses": 2},
}
MODEL = {
    "num_hidden_layers": 2,
    "hidden_size": 512,
    "intermediate_size": 1536,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
}
"""Wide enough that a step's activations, which CP divides by P, outweigh the fixed per-step buffers (the
attention's bounded layout pieces and kernel chunks); attention as a 4-head, 2-KV-head model of dim 64."""
DATA_KINDS = ("send_recv", "all_to_all", "all_gather", "reduce_scatter")


def _rank(rank: int, world: int, port: int, strategy: str, seq_len: int, out: str) -> None:
    """One rank: one training step on its shard; writes its bytes, seconds and peak memory."""
    import datetime
    import os
    import time

    import torch
    import torch.distributed as dist

    import lcplug
    from lcplug.cp import comm_stats, cp_loss, cp_runtime, shard_batch
    from lcplug.testing import tiny_model

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=1800),
    )
    model = tiny_model("llama", **MODEL).train()
    lcplug.patch(model, {"cp": {**STRATEGIES[strategy], "degree": world, "timeout": 1800}})
    ids = torch.randint(3, model.config.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(0))
    batch = {
        "input_ids": ids,
        "labels": ids.clone(),
        "position_ids": torch.arange(seq_len).view(1, -1),
        "doc_ids": torch.zeros_like(ids),
        "cu_seqlens": torch.tensor([0, seq_len]),
        "max_seqlen": seq_len,
    }
    part = shard_batch(model, batch)

    def step() -> None:
        logits = model(input_ids=part["input_ids"], position_ids=part["position_ids"], use_cache=False).logits
        cp_loss(logits, part["shift_labels"], cp_runtime(model).mesh.cp).backward()
        model.zero_grad(set_to_none=False)

    step()  # warm-up: lazy imports, kernel and thread-pool set-up, gradient buffers are not the step's own
    Path("/proc/self/clear_refs").write_text("5")  # reset the RSS high-water mark (VmHWM)
    before = _status_kib("VmRSS")
    comm_stats(model).reset()
    dist.barrier()
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    stats = comm_stats(model)
    row = {
        "seconds": seconds,
        "sent": sum(stats.sent[k] for k in DATA_KINDS),
        "by_kind": {k: stats.sent[k] for k in DATA_KINDS if stats.sent[k]},
        "peak_mib": (_status_kib("VmHWM") - before) / 1024,
    }
    rows = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    dist.destroy_process_group()
    os._exit(0)  # skip interpreter teardown: nothing left to flush


def _status_kib(field: str) -> int:
    """A memory figure of this process from /proc/self/status (KiB): VmRSS now, VmHWM its high-water mark."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _worker(args: argparse.Namespace) -> dict:
    """Runs inside the measurement subprocess: spawn the group, return rank 0's gathered rows."""
    import os
    import socket
    import tempfile

    import torch.multiprocessing as mp

    os.environ["OMP_NUM_THREADS"] = "1"
    # tensors above 64 KiB get their own mappings, returned on free: RSS then follows live memory instead of
    # what glibc's heap kept from earlier steps (the ranks are spawned, so they read this at start-up)
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "rows.json")
        mp.spawn(_rank, args=(args.world, port, args.strategy, args.seq_len, out), nprocs=args.world, join=True)
        rows = json.loads(Path(out).read_text())
    return {
        "seconds": max(r["seconds"] for r in rows),
        "sent": max(r["sent"] for r in rows),
        "by_kind": rows[0]["by_kind"],
        "peak_mib": max(r["peak_mib"] for r in rows),
        "peak_mib_per_rank": [r["peak_mib"] for r in rows],
    }


def predicted_bytes(strategy: str, world: int, seq_len: int) -> float | None:
    """The planner's bytes per rank for this step (fp32, no checkpointing); None where it finds the
    strategy invalid. Two "GPUs per node" make the planner's hybrid the 2 x 2 the benchmark runs."""
    import torch

    from lcplug.cp.planner import Job, Topology, model_shape, plan_cp
    from lcplug.testing import tiny_model

    with torch.device("meta"):
        shape = model_shape(tiny_model("llama", **MODEL), "tiny llama")
    job = Job(seq_len, dtype_bytes=4, checkpointing=False)
    plan = plan_cp(shape, Topology(world, gpus_per_node=min(world, 2)), job)
    row = next(s for s in plan.strategies if s.strategy == strategy)
    return row.step_bytes if row.valid else None


def measure(strategy: str, world: int, seq_len: int, timeout: int) -> dict:
    return run_worker(__file__, ["--strategy", strategy, "--world", str(world), "--seq-len", str(seq_len)], timeout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=16384, help="tokens of the one row (fixed total)")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4], help="group sizes")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per measurement")
    parser.add_argument("--out", default="benchmarks/results/cp")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args)))
        return 0

    header = (
        f"{'strategy':<16} {'P':>2} {'sent MiB':>9} {'planner':>9} {'ratio':>6} {'time s':>8} {'x 1 proc':>8} "
        f"{'peak MiB':>9} {'x 1 proc':>8} {'ideal':>6}"
    )
    print(f"tiny Llama {MODEL}, one row of {args.seq_len} tokens, one fwd+bwd step, fp32, 1 thread per rank\n")
    print(header)
    print("-" * len(header))
    rows = []
    base = measure("ring", 1, args.seq_len, args.timeout) if 1 in args.worlds else None
    for strategy in args.strategies:
        for world in args.worlds:
            predicted = predicted_bytes(strategy, world, args.seq_len)
            if predicted is None:
                continue  # a split this group size cannot form (hybrid needs 2 x 2)
            res = base if world == 1 else measure(strategy, world, args.seq_len, args.timeout)
            row = {"strategy": strategy, "world": world, **res, "predicted": predicted}
            _print_row(row, base)
            rows.append(row)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    _plot(rows, out.with_suffix(".png"))
    print(f"\nwrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return 0


def _print_row(row: dict, base: dict | None) -> None:
    name, world = row["strategy"], row["world"]
    if "error" in row:
        print(f"{name:<16} {world:>2} {row['error']}")
        return
    mib = 1 << 20
    predicted = row["predicted"]
    ratio = f"{row['sent'] / predicted:.3f}" if predicted else "-"
    planned = f"{predicted / mib:.2f}" if predicted is not None else "invalid"
    ok = base is not None and "error" not in base
    time_x = f"{row['seconds'] / base['seconds']:.2f}" if ok else "-"
    peak_x = f"{row['peak_mib'] / base['peak_mib']:.2f}" if ok else "-"
    print(
        f"{name:<16} {world:>2} {row['sent'] / mib:>9.2f} {planned:>9} {ratio:>6} {row['seconds']:>8.2f} "
        f"{time_x:>8} {row['peak_mib']:>9.0f} {peak_x:>8} {1 / world:>6.2f}",
        flush=True,
    )


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for strategy in dict.fromkeys(r["strategy"] for r in rows):
        group = [r for r in rows if r["strategy"] == strategy and "error" not in r]
        xs = [r["world"] for r in group]
        axes[0].plot(xs, [r["sent"] / (1 << 20) for r in group], marker="o", label=strategy)
        axes[1].plot(xs, [r["seconds"] for r in group], marker="o", label=strategy)
        axes[2].plot(xs, [r["peak_mib"] for r in group], marker="o", label=strategy)
    worlds = sorted({r["world"] for r in rows})
    base = next((r["peak_mib"] for r in rows if r["world"] == 1 and "error" not in r), None)
    if base:
        axes[2].plot(worlds, [base / w for w in worlds], "k--", label="1/P of one process")
    for ax, label in zip(axes, ["MiB sent per rank", "step seconds (slowest rank)", "peak MiB per rank"]):
        ax.set_xscale("log", base=2)
        ax.set_xticks(worlds, [str(w) for w in worlds])
        ax.set_xlabel("processes")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
