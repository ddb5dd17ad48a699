"""What each rank of a spawned cp group runs in the tests; results go back to the test through a JSON file.

`parity(rank, world, out)`: for every strategy x pattern, a cp rank's attention (outputs and q/k/v
gradients through the collectives) and a whole tiny-model training step (logits, loss, every parameter's
gradient) against the single-process run of the same model on the whole batch, which each rank computes
itself. `failure(rank, world, out, case)`: a dead rank or disagreeing shapes must raise a clear error.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import time
import traceback

import torch
import torch.distributed as dist

SEQ = 64
STRATEGIES = {
    "ring": "ring",
    "ring-contiguous": {"name": "ring", "layout": "contiguous"},
    "ulysses": "ulysses",
    "allgather": "allgather",
    "hybrid": {"name": "hybrid", "ulysses": 2},
}
PATTERNS = {
    "causal": None,
    "sliding-window": {"name": "sliding-window", "window": 12, "sinks": 2, "block_size": 8},
    "loza": {"name": "loza", "block": 8, "sink_blocks": 1, "local_blocks": 2},
    "dsa": {"name": "dsa", "topk": 16, "block_size": 8, "heads": 2, "dim": 8, "stage": "sparse"},
    "packed": {
        "name": "sliding-window",
        "window": 20,
        "sinks": 0,
        "block_size": 8,
        "learnable_sink": True,
        "sink_init": 0.5,
    },
    "packed-causal": None,
}
PACKED = {"packed": [20, 30, 14], "packed-causal": [9, 40, 15]}


def init(rank: int, world: int, port: int, timeout_s: float = 60.0) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def model_and_batch(pattern: str, cp_spec=None, own: str | None = None):
    import lcplug
    from lcplug.positions import packed_position_ids
    from lcplug.testing import tiny_model

    model = tiny_model("llama", num_hidden_layers=2).train()
    spec = {}
    if PATTERNS[pattern] is not None or own:
        spec["attention"] = PATTERNS[pattern] or own
    if cp_spec is not None:
        spec["cp"] = cp_spec
    if spec:
        lcplug.patch(model, spec)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (2, SEQ), generator=gen)
    labels = ids.clone()
    if pattern in PACKED:
        pos = packed_position_ids(PACKED[pattern]).expand(2, -1).clone()
    else:
        pos = torch.arange(SEQ).expand(2, -1).clone()
    labels[pos == 0] = -100
    doc_ids = torch.zeros_like(ids)
    batch = {
        "input_ids": ids,
        "labels": labels,
        "position_ids": pos,
        "doc_ids": doc_ids,
        "cu_seqlens": torch.tensor([0, SEQ]),
        "max_seqlen": SEQ,
    }
    return model, batch


def reference_step(pattern: str):
    """Logits, loss and gradients of the single-process run on the whole batch."""
    model, batch = model_and_batch(pattern)
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    shifted = torch.cat([batch["labels"][:, 1:], torch.full_like(batch["labels"][:, :1], -100)], 1)
    loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), shifted.flatten(), ignore_index=-100)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), loss.detach(), grads


def cp_step(pattern: str, cp_spec):
    from lcplug.cp import cp_loss, cp_runtime, shard_batch
    from lcplug.positions import shard_indices

    model, batch = model_and_batch(pattern, cp_spec)
    runtime = cp_runtime(model)
    part = shard_batch(model, batch)
    out = model(input_ids=part["input_ids"], position_ids=part["position_ids"], use_cache=False)
    loss = cp_loss(out.logits, part["shift_labels"], runtime.mesh.cp)
    loss.backward()
    comm = runtime.mesh.cp
    grads = {}
    for n, p in model.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        grads[n] = comm.all_reduce(g) / comm.size
    total = comm.all_reduce(loss.detach()) / comm.size
    idx = shard_indices(SEQ, runtime.mesh.rank, runtime.mesh.degree, runtime.layout)
    return out.logits.detach(), idx, total, grads


def attention_step(pattern: str, cp_spec):
    """One attention module, called through the dispatcher on random q/k/v shards: outputs and q/k/v grads."""
    from lcplug.attention.dispatch import lcplug_attention_forward
    from lcplug.cp import cp_runtime, shard_batch
    from lcplug.patching import unpatch
    from lcplug.positions import shard_indices

    model, batch = model_and_batch(pattern, cp_spec)
    runtime = cp_runtime(model)
    module = model.model.layers[1].self_attn
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, SEQ, 16, generator=gen)
    k = torch.randn(2, 2, SEQ, 16, generator=gen)
    v = torch.randn(2, 2, SEQ, 16, generator=gen)
    grad_out = torch.randn(2, SEQ, 4, 16, generator=gen)
    idx = shard_indices(SEQ, runtime.mesh.rank, runtime.mesh.degree, runtime.layout)
    pos = shard_batch(model, batch)["position_ids"]
    local = [t[:, :, idx].clone().requires_grad_() for t in (q, k, v)]
    out, _ = lcplug_attention_forward(module, *local, None, position_ids=pos, scaling=0.25)
    (out * grad_out[:, idx]).sum().backward()
    unpatch(model)  # the same layer module, now single-process, on the whole sequences
    model2, _ = model_and_batch(pattern, own="full")
    module2 = model2.model.layers[1].self_attn
    whole = [t.clone().requires_grad_() for t in (q, k, v)]
    mask = _lazy_mask(model2, batch["position_ids"])
    ref, _ = lcplug_attention_forward(module2, *whole, mask, position_ids=batch["position_ids"], scaling=0.25)
    (ref * grad_out).sum().backward()
    errs = {"attn_out": float((out - ref[:, idx]).abs().max().detach())}
    for name, a, b in zip("qkv", local, whole):
        errs[f"attn_d{name}"] = float((a.grad - b.grad[:, :, idx]).abs().max())
    return errs


def _lazy_mask(model, position_ids):
    """The mask transformers builds for a whole packed batch (through lcplug's mask interface when patched)."""
    from transformers.masking_utils import create_causal_mask

    embeds = torch.zeros(position_ids.shape[0], position_ids.shape[1], model.config.hidden_size)
    return create_causal_mask(
        config=model.config,
        inputs_embeds=embeds,
        attention_mask=None,
        past_key_values=None,
        position_ids=position_ids,
    )


def parity(rank: int, world: int, port: int, out_path: str) -> None:
    init(rank, world, port)
    results = {}
    refs = {p: reference_step(p) for p in PATTERNS}
    for sname, sspec in STRATEGIES.items():
        for pname in PATTERNS:
            results[f"{sname}/{pname}"] = parity_case(world, sspec, pname, refs[pname])
    with small_pieces():
        for sname, sspec in STRATEGIES.items():
            for pname in PIECED:
                results[f"{sname}/{pname}{PIECES}"] = parity_case(world, sspec, pname, refs[pname])
    try:
        results["masked-rank"] = masked_rank(world)
    except Exception as exc:
        results["masked-rank"] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(gathered, f)
    dist.destroy_process_group()


PIECED = ("causal", "sliding-window", "dsa", "packed")
PIECES = "+pieces"
"""Cases rerun with layouts cut into 8 x 16-token pieces and nothing cached (`small_pieces`)."""


@contextlib.contextmanager
def small_pieces():
    """cp's layout pieces shrunk to a few blocks and its mask cache off, as at a very long row."""
    from lcplug.cp import attend, shard

    saved = attend.PIECE_KEYS, attend.PIECE_PAIRS, attend.ALIGN, shard.CACHE_PAIRS
    attend.PIECE_KEYS, attend.PIECE_PAIRS, attend.ALIGN, shard.CACHE_PAIRS = 16, 8 * 16, 8, 0
    try:
        yield
    finally:
        attend.PIECE_KEYS, attend.PIECE_PAIRS, attend.ALIGN, shard.CACHE_PAIRS = saved


def parity_case(world: int, sspec, pname: str, ref) -> dict:
    """One strategy x pattern: errors of the cp training step and attention call against one process."""
    started = time.perf_counter()
    try:
        spec = {"name": sspec} if isinstance(sspec, str) else dict(sspec)
        spec["degree"] = world
        spec["timeout"] = 20
        if spec["name"] == "hybrid" and world == 2:
            spec["ulysses"] = 2
        logits, idx, loss, grads = cp_step(pname, spec)
        ref_logits, ref_loss, ref_grads = ref
        errs = {
            "logits": float((logits - ref_logits[:, idx]).abs().max()),
            "loss": abs(float(loss) - float(ref_loss)),
            "grads": max(
                float((grads[n] - ref_grads.get(n, torch.zeros_like(g))).abs().max()) for n, g in grads.items()
            ),
        }
        errs.update(attention_step(pname, spec))
        return {"errors": errs, "seconds": time.perf_counter() - started}
    except Exception as exc:  # report, keep the group in step for the other cases
        return {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}


def masked_rank(world: int) -> dict:
    """Rank 0's tokens all masked (contiguous shards, first half of every row unlabelled): finite loss and
    gradients, equal to the single-process ones."""
    from lcplug.cp import cp_loss, cp_runtime, shard_batch

    spec = {"name": "ring", "layout": "contiguous", "degree": world, "timeout": 20}
    model, batch = model_and_batch("causal", spec)
    batch["labels"][:, : SEQ // world + 1] = -100
    part = shard_batch(model, batch)
    runtime = cp_runtime(model)
    comm = runtime.mesh.cp
    runtime.mesh.stats.reset()
    logits = model(input_ids=part["input_ids"], position_ids=part["position_ids"], use_cache=False).logits
    forward = runtime.mesh.stats.to_dict()
    loss = cp_loss(logits, part["shift_labels"], comm)
    loss.backward()
    step = runtime.mesh.stats.to_dict()
    finite = bool(torch.isfinite(loss)) and all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    total = float(comm.all_reduce(loss.detach()) / comm.size)
    ref_model, _ = model_and_batch("causal")
    out = ref_model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    shifted = torch.cat([batch["labels"][:, 1:], torch.full_like(batch["labels"][:, :1], -100)], 1)
    ref = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), shifted.flatten(), ignore_index=-100)
    return {
        "errors": {"loss": abs(total - float(ref))},
        "finite": finite,
        "local_loss": float(loss),
        "bytes": {"forward": forward, "step": step},
    }


def failure(rank: int, world: int, port: int, out_path: str) -> None:
    """Each case must end in a clear error on the surviving ranks, within the cp timeout."""
    import time

    import lcplug
    from lcplug.cp import CPConfigError, shard_batch

    init(rank, world, port, timeout_s=30)
    results = {}
    try:
        lcplug.patch(model_and_batch("causal")[0], cp={"name": "ring", "degree": 3})
        results["degree"] = "no error"
    except CPConfigError as exc:
        results["degree"] = f"{type(exc).__name__}: {exc}"
    model, batch = model_and_batch("causal", {"name": "ring", "degree": world, "timeout": 5})
    part = shard_batch(model, batch)
    cut = 8 if rank == 1 else 0  # rank 1 was given a shorter shard
    start = time.perf_counter()
    try:
        model(input_ids=part["input_ids"][:, cut:], position_ids=part["position_ids"][:, cut:], use_cache=False)
        results["shapes"] = "no error"
    except Exception as exc:
        results["shapes"] = f"{type(exc).__name__}: {exc}"
    results["shapes_s"] = time.perf_counter() - start
    dist.barrier()
    if rank == world - 1:
        os._exit(0)  # this rank dies before the next step
    start = time.perf_counter()
    try:
        model(input_ids=part["input_ids"], position_ids=part["position_ids"], use_cache=False)
        results["dead"] = "no error"
    except Exception as exc:
        results["dead"] = f"{type(exc).__name__}: {exc}"
    results["dead_s"] = time.perf_counter() - start
    with open(f"{out_path}.{rank}", "w") as f:
        json.dump(results, f)
    os._exit(0)  # the group lost a member: skip the collective teardown
