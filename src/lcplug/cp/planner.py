"""Context-parallel planner: per-GPU memory, communication and time of each cp strategy, before any GPU.

`plan_cp(model, seq_len, topology)` answers "how should this model shard a 1M-token sequence over 64
GPUs?": for ring (zigzag and contiguous layouts), Ulysses, all-gather and the hybrid (Ulysses inside a
node, ring across nodes) it estimates the bytes each GPU sends per layer and per training step, the time
they take on the topology's links, how much of it hides behind attention compute, the memory per GPU,
and recommends the fastest strategy that is valid and fits.

Everything is modelled on what lcplug's strategies (`lcplug.cp.strategies`) actually do, so the CPU
runs' byte counters (`lcplug.cp.comm.CommStats`) check the formulas (tests/cp/test_planner.py). Per layer
and GPU, forward, with N tokens, P ranks, B rows, b bytes per element, d = H dh, d_kv = H_kv dh
(METHODS.md, "CP"):

- ring (u = 1): (s - 1) transfers of the rank's K/V shard, 2 B (N/P) d_kv b each, s the ring steps some
  rank needs; s = P for causal attention: 2 B N d_kv b (P-1)/P ("Ring ~2N*dkv"). A pattern that needs
  fewer steps moves fewer bytes (a sliding window over contiguous shards: s = 2). Backward sends twice
  that: the shards come round again (no rank keeps another's K/V) and each step's dK/dV goes back to its
  owner.
- Ulysses (u = P): two all-to-alls, B (N/P)(2d + 2 d_kv') b (P-1)/P ("Ulysses ~(N/P)(2d+2dkv)(P-1)/P"),
  d_kv' = max(H_kv, P) dh: with more ranks than KV heads the KV heads are replicated first.
  Valid when P divides H and P divides or is a multiple of H_kv (`HeadsThenRing.check_heads`).
- all-gather: 2 B N d_kv b (P-1)/P forward, the same reduce-scattered in backward ("Llama3 all-gather").
- hybrid (u in-node x r = P/u across nodes, USP / Megatron "a2a+p2p"): the all-to-all term with u, then a
  ring of r members over the group's K/V: (s - 1) x 2 B (N/P) d_kv' b.
- content-selected layers (DSA) add an all-gather of K for the selection (B (N/P) d_kv b (P-1)) and, under
  Ulysses/hybrid, of the selection itself (B (N/P) N bytes (P-1)); their ring runs every step.

Time: a transfer on a link is bytes / bandwidth; a collective's bytes to ranks on other nodes go over the
GPU's NIC (inter-node bandwidth), the rest over NVLink, concurrently; a ring step crossing nodes runs at
inter-node bandwidth. Attention costs 4 dh FLOPs per kept (query, key) pair and head forward, 2.5x that
backward; the linear layers 2 FLOPs per parameter and token forward, twice that backward; all at the
topology's sustained TFLOP/s. The ring's forward transfer of step s+1 overlaps step s's attention (as the
strategy does); its backward's transfers (the K/V again, dK/dV back to their owners) are counted as
exposed, a bound (lcplug overlaps them with the next step), and the all-to-alls and gathers sit between
compute, so that time is exposed. Gradient checkpointing recomputes each layer's forward, communication
included. Not modelled: FSDP/data-parallel traffic, latency per message, kernel efficiency by block
size, document masks (one document per row), and uneven selections of content-selected layers.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..train import memory
from .errors import CPConfigError
from .rules import FULL, DynamicRule, Rule, StaticRule, plan_for, rules_of
from .shard import check_seq_len, rank_spans
from .strategies import HeadsThenRing

CONFIGS_DIR = Path(__file__).resolve().parents[3] / "recipes" / "configs"
"""Shipped configs of real models (a source checkout or editable install), found by file name."""

STRATEGIES = ("ring", "ring-contiguous", "ulysses", "allgather", "hybrid")
"""What the planner compares: the cp plugins, with ring under both shard layouts."""

MAX_QUERY_BLOCKS = 8192
"""Query blocks the pair count walks per sequence: exact below it, blocks of N / 8192 tokens above
(each block's queries counted with the keys of its last query: over by at most one block per query)."""

TIE = 0.02
"""Estimated steps this close to the fastest count as equal (the model is not that accurate)."""

BACKWARD_ATTENTION = 2.5
"""Backward FLOPs of attention per forward FLOP (flash-style: five matmuls against two)."""


class PlannerError(CPConfigError):
    """Planner input that cannot be planned: one line naming the value and what would be valid."""


@dataclass(frozen=True)
class Topology:
    """The cluster: GPUs, how many share a node, link bandwidths (GB/s per GPU, one direction), and each
    GPU's memory and sustained TFLOP/s (defaults: H100 SXM, NVLink 4, one 400 Gb/s NIC per GPU, 40% MFU)."""

    gpus: int
    gpus_per_node: int = 8
    intra_bw: float = 450.0
    inter_bw: float = 50.0
    memory_gib: float = memory.DEVICE_GIB
    tflops: float = 400.0

    def __post_init__(self) -> None:
        for name in ("gpus", "gpus_per_node", "intra_bw", "inter_bw", "memory_gib", "tflops"):
            if not getattr(self, name) > 0:
                raise PlannerError(f"{name} {getattr(self, name)} must be > 0")
        g, n = self.gpus, self.gpus_per_node
        if g > n and g % n:
            raise PlannerError(
                f"{g} GPUs do not fill nodes of {n}; valid: fewer than {n} or a multiple of {n} "
                f"(e.g. {g // n * n} or {(g // n + 1) * n})"
            )

    def node(self, rank: int) -> int:
        return rank // self.gpus_per_node


@dataclass(frozen=True)
class Job:
    """What runs: rows of `seq_len` tokens, `batch` rows per step, elements of `dtype_bytes`; a training
    step (forward + backward, AdamW) or a forward pass only; gradient checkpointing on or off."""

    seq_len: int
    batch: int = 1
    dtype_bytes: int = 2
    train: bool = True
    checkpointing: bool = True


@dataclass(frozen=True)
class Branch:
    """One attention computation a cp layer runs: a static `pattern` within the model's own `window`, or
    (`selected` set) `selected` keys per query chosen from content (DSA's sparse stage)."""

    pattern: Any = FULL
    window: int | None = None
    selected: int | None = None

    @classmethod
    def of(cls, rule: Rule) -> Branch:
        if isinstance(rule, DynamicRule):
            return cls(FULL, rule.window, int(rule.layer.topk))
        assert isinstance(rule, StaticRule)
        return cls(rule.pattern, rule.window)

    @property
    def key(self) -> tuple:
        """Identity across layers (patterns compare by their parameters, not by object)."""
        return (self.pattern.key(), self.window, self.selected)

    def describe(self) -> str:
        what = f"top-{self.selected} selected" if self.selected else self.pattern.describe()
        return what + (f" (window {self.window})" if self.window else "")


@dataclass
class ModelShape:
    """What the planner reads off a (meta) model: widths, parameter counts, and each layer's branches."""

    name: str
    dims: memory.Dims
    parameters: int
    outside: int  # parameters outside the decoder layers (embeddings, LM head)
    embedding: int  # input-embedding parameters (a lookup, no FLOPs)
    layers: list[tuple[Branch, ...]]
    installed: list[nn.Module | None] = field(repr=False)  # each layer's `lcplug_attention` (memory terms)

    def costs(self, seq_len: int) -> list[memory.AttentionCost]:
        """`memory.attention_costs` of the installed attention at `seq_len` (every parameter trainable)."""
        trainable = {id(p) for layer in self.installed if layer is not None for p in layer.parameters()}
        return memory.attention_costs(self.installed, self.dims, seq_len, 2, trainable)

    @property
    def distinct(self) -> dict[tuple[Branch, ...], int]:
        """Each distinct layer kind and how many layers run it, in layer order."""
        kinds: dict[tuple, tuple[Branch, ...]] = {}
        counts: dict[tuple, int] = {}
        for branches in self.layers:
            key = tuple(b.key for b in branches)
            kinds.setdefault(key, branches)
            counts[key] = counts.get(key, 0) + 1
        return {kinds[key]: n for key, n in counts.items()}


# ---- the formulas ------------------------------------------------------------------------------------


def kv_shard_bytes(job: Job, degree: int, kv_heads: int, head_dim: int) -> float:
    """Bytes of one rank's stacked K and V: 2 B (N/P) H_kv dh b (one ring transfer)."""
    return 2 * job.batch * job.seq_len / degree * kv_heads * head_dim * job.dtype_bytes


def ring_bytes(job: Job, degree: int, kv_heads: int, head_dim: int, steps: int) -> float:
    """Ring forward bytes per layer and rank: (s - 1) 2 B (N/P) d_kv b; 2 B N d_kv b (P-1)/P at s = P
    (METHODS.md CP: "Ring ~2N*dkv"). `kv_heads` is d_kv' / dh after any Ulysses replication."""
    return (steps - 1) * kv_shard_bytes(job, degree, kv_heads, head_dim)


def replicated_kv_heads(kv_heads: int, ulysses: int) -> int:
    """KV heads after Ulysses replication: max(H_kv, u) (`heads_to_sequence` repeats them up to u)."""
    return max(kv_heads, ulysses)


def ulysses_bytes(job: Job, degree: int, ulysses: int, heads: int, kv_heads: int, head_dim: int) -> float:
    """All-to-all forward bytes per layer and rank, q/k/v in and the output back, in groups of u:
    B (N/P)(2d + 2 d_kv') b (u-1)/u (METHODS.md CP: "Ulysses ~(N/P)(2d+2dkv)(P-1)/P" at u = P)."""
    kv = replicated_kv_heads(kv_heads, ulysses)
    width = (2 * heads + 2 * kv) * head_dim
    return job.batch * job.seq_len / degree * width * job.dtype_bytes * (ulysses - 1) / ulysses


def allgather_bytes(job: Job, degree: int, kv_heads: int, head_dim: int) -> float:
    """All-gather forward bytes per layer and rank: 2 B N d_kv b (P-1)/P; the backward reduce-scatter of
    dK/dV moves the same (METHODS.md CP: "Llama3 all-gather")."""
    return kv_shard_bytes(job, degree, kv_heads, head_dim) * (degree - 1)


def selection_bytes(job: Job, degree: int, kv_heads: int, head_dim: int, all_queries: bool) -> float:
    """Forward bytes per layer and rank a content-selected layer adds before any strategy moves data: the
    all-gather of K its selection scores, B (N/P) d_kv b (P-1), and under Ulysses/hybrid (every rank needs
    every query's selection) the all-gather of the selection as bytes, B (N/P) N (P-1)."""
    n = job.batch * job.seq_len / degree
    keys = n * kv_heads * head_dim * job.dtype_bytes * (degree - 1)
    return keys + (n * job.seq_len * (degree - 1) if all_queries else 0.0)


def chunk_pairs(branch: Branch, seq_len: int, chunks: int) -> torch.Tensor:
    """(chunks, chunks) float64: kept (query, key) pairs per head between equal chunks of a row, the
    query chunk first; causal, within the model's window, averaged over the pattern's head groups.

    Walks query blocks (one token each up to `MAX_QUERY_BLOCKS` per row) through the pattern's own
    `key_intervals` (its union per block, the same intervals lcplug's layouts are built from). A
    content-selected branch keeps `selected` of the causal keys, spread evenly (its true spread is data).
    """
    size = seq_len // chunks
    block = _query_block(size, seq_len)
    lo = torch.arange(0, seq_len, block, dtype=torch.long)
    hi = lo + block - 1
    key_lo = torch.arange(chunks, dtype=torch.long) * size
    groups = branch.pattern.head_groups
    total = torch.zeros(chunks, chunks, dtype=torch.float64)
    for group in range(groups):
        intervals = branch.pattern.key_intervals(lo, hi, group)
        a = torch.stack([torch.as_tensor(iv[0]).expand_as(lo) for iv in intervals])  # (k, nb)
        b = torch.stack([torch.as_tensor(iv[1]).expand_as(lo) for iv in intervals])
        b = torch.minimum(b, hi + 1)  # causal
        if branch.window:
            a = torch.maximum(a, lo - branch.window + 1)
        order = a.argsort(0)
        a, b = a.gather(0, order)[..., None], b.gather(0, order)[..., None]  # (k, nb, 1) against (chunks,)
        end = key_lo.expand(len(lo), -1)
        covered = torch.zeros(len(lo), chunks, dtype=torch.float64)
        for i in range(len(intervals)):  # union of the block's intervals inside each key chunk
            start = torch.maximum(a[i], end)
            stop = torch.minimum(b[i], key_lo + size)
            covered += (stop - start).clamp(min=0)
            end = torch.maximum(end, stop)
        total += (covered * block).view(chunks, size // block, chunks).sum(1)
    total /= groups
    if branch.selected:
        causal = seq_len * (seq_len + 1) / 2
        total *= min(1.0, seq_len * branch.selected / causal)
    return total


def _query_block(size: int, seq_len: int) -> int:
    """The largest divisor of the chunk size not above seq_len / MAX_QUERY_BLOCKS (1 for short rows)."""
    cap = max(1, seq_len // MAX_QUERY_BLOCKS)
    return next(d for d in range(min(cap, size), 0, -1) if size % d == 0)


@dataclass(frozen=True)
class RingSchedule:
    """A ring of `members` (each a Ulysses group of cp ranks): the steps it runs and the kept pairs per
    head each member's queries meet at each step (`pairs[m][s]`, keys from member (m - s) mod r)."""

    steps: int
    pairs: list[list[float]]

    def step_pairs(self, step: int) -> float:
        """The busiest member's pairs at `step`: the step's critical path."""
        return max(row[step] for row in self.pairs)

    @property
    def busiest(self) -> float:
        """The busiest member's pairs over all steps."""
        return max(sum(row[: self.steps]) for row in self.pairs)


def ring_schedule(branch: Branch, seq_len: int, degree: int, ulysses: int, layout: str) -> RingSchedule:
    """Steps = 1 + the last step any member needs (`lcplug.cp.strategies._ring_steps`): a member needs step
    s when its queries keep any key of member (m - s) mod r. Members hold the chunks `rank_spans` gives
    their u cp ranks (one chunk per token of a row of `chunks` tokens: the layout is scale-free)."""
    chunks = degree if layout == "contiguous" else 2 * degree
    pairs = chunk_pairs(branch, seq_len, chunks)
    members = degree // ulysses
    held = [
        [
            t
            for r in range(m * ulysses, (m + 1) * ulysses)
            for s in rank_spans(chunks, r, degree, layout)
            for t in range(s.start, s.end)
        ]
        for m in range(members)
    ]
    table = [[float(pairs[held[m]][:, held[(m - s) % members]].sum()) for s in range(members)] for m in range(members)]
    needed = [s for s in range(members) if branch.selected or any(row[s] > 0 for row in table)]
    return RingSchedule(1 + max(needed, default=0), table)


# ---- one strategy on one model ---------------------------------------------------------------------


@dataclass
class StrategyPlan:
    """One strategy's estimate: per-GPU bytes (sent, = received), seconds and GiB; `valid` False with `why`."""

    strategy: str
    ulysses: int
    ring: int
    layout: str
    valid: bool = True
    why: str = ""
    ring_steps: list[int] = field(default_factory=list)  # per distinct layer kind
    layer_bytes: float = 0.0  # forward bytes of one layer (the first layer kind), per GPU
    step_bytes: float = 0.0  # bytes per training step (or forward pass), per GPU, all layers
    comm_seconds: float = 0.0
    exposed_seconds: float = 0.0
    compute_seconds: float = 0.0
    overlap: bool = False  # a ring step's transfer fits behind that step's attention
    memory: dict[str, float] = field(default_factory=dict)  # GiB per GPU by term, and "total"
    fits: bool = True

    @property
    def step_seconds(self) -> float:
        return self.compute_seconds + self.exposed_seconds

    @property
    def hidden(self) -> float:
        """Fraction of the communication time hidden behind compute."""
        return 1 - self.exposed_seconds / self.comm_seconds if self.comm_seconds else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "step_seconds": self.step_seconds, "hidden": self.hidden}


def _candidates(topology: Topology, shape: ModelShape) -> list[StrategyPlan]:
    """Each strategy's (ulysses, ring, layout), invalid ones with the reason lcplug would refuse them."""
    p, d = topology.gpus, shape.dims
    node = min(p, topology.gpus_per_node)
    hybrid_u = max(
        (u for u in range(1, node + 1) if node % u == 0 and p % u == 0 and _heads_error(shape, u) is None), default=1
    )
    out = [
        StrategyPlan("ring", 1, p, "zigzag"),
        StrategyPlan("ring-contiguous", 1, p, "contiguous"),
        StrategyPlan("ulysses", p, 1, "contiguous"),
        StrategyPlan("allgather", 1, p, "contiguous"),
        StrategyPlan("hybrid", hybrid_u, p // hybrid_u, "zigzag"),
    ]
    for plan in out:
        if plan.strategy == "ulysses" and (why := _heads_error(shape, p)):
            plan.valid, plan.why = False, why
        elif plan.strategy == "hybrid" and not 1 < hybrid_u < p:
            plan.valid = False
            plan.why = (
                f"no Ulysses size between 1 and {p} fits a node of {node} and the model's {d.heads} heads / "
                f"{d.kv_heads} KV heads (it would be plain ring or plain Ulysses)"
            )
    return out


def _heads_error(shape: ModelShape, ulysses: int) -> str | None:
    """Why lcplug refuses Ulysses of size u on this model (None: it runs), from the strategy's own check."""
    groups = max(b.pattern.head_groups for branches in shape.layers for b in branches)
    try:
        HeadsThenRing(ulysses=ulysses).check_heads(shape.dims.heads, shape.dims.kv_heads, groups)
    except CPConfigError as exc:
        return str(exc)
    return None


def _collective_seconds(nbytes: float, group: int, topology: Topology) -> float:
    """A collective among `group` consecutive ranks: the share of peers on other nodes over the NIC,
    the rest over NVLink, concurrently."""
    if group <= 1:
        return 0.0
    local = min(group, topology.gpus_per_node)
    remote_share = (group - local) / (group - 1)
    on_node = nbytes * (1 - remote_share) / (topology.intra_bw * 1e9)
    return max(on_node, nbytes * remote_share / (topology.inter_bw * 1e9))


def _ring_link(ring: int, ulysses: int, topology: Topology) -> float:
    """Bytes/s of a ring step: inter-node as soon as the ring's members span more than one node."""
    return (topology.inter_bw if ring * ulysses > topology.gpus_per_node else topology.intra_bw) * 1e9


@dataclass(frozen=True)
class LayerVolume:
    """Bytes one rank sends (and receives) for one branch of one layer, by collective, and the ring's
    schedule; the backward moves the same but for the selection (computed without gradient) and the ring
    twice (K/V again, then dK/dV)."""

    selection: float
    all_to_all: float
    ring: float
    gather: float
    schedule: RingSchedule | None  # None for all-gather (no ring)

    @property
    def forward(self) -> float:
        return self.selection + self.all_to_all + self.ring + self.gather

    @property
    def backward(self) -> float:
        return self.all_to_all + 2 * self.ring + self.gather


def layer_volume(plan: StrategyPlan, branch: Branch, dims: memory.Dims, job: Job, degree: int) -> LayerVolume:
    """The per-layer formulas above for one strategy (`plan`'s strategy, Ulysses size and layout)."""
    h, hkv, dh = dims.heads, dims.kv_heads, dims.head_dim
    u = plan.ulysses
    selection = selection_bytes(job, degree, hkv, dh, all_queries=u > 1) if branch.selected else 0.0
    if plan.strategy == "allgather":
        return LayerVolume(selection, 0.0, 0.0, allgather_bytes(job, degree, hkv, dh), None)
    schedule = ring_schedule(branch, job.seq_len, degree, u, plan.layout)
    a2a = ulysses_bytes(job, degree, u, h, hkv, dh) if u > 1 else 0.0
    ring = ring_bytes(job, degree, replicated_kv_heads(hkv, u), dh, schedule.steps)
    return LayerVolume(selection, a2a, ring, 0.0, schedule)


@dataclass(frozen=True)
class BranchCost:
    """Seconds of one branch of one layer on the busiest rank, and the K/V it holds beyond its own shard."""

    comm_forward: float
    comm_backward: float
    exposed_forward: float  # the ring's transfers overlap its steps' attention; the rest waits
    attention: float  # forward attention compute
    held: float  # bytes
    hides: bool  # every ring transfer fits behind its step's attention


def branch_cost(
    plan: StrategyPlan, branch: Branch, dims: memory.Dims, job: Job, topology: Topology, volume: LayerVolume
) -> BranchCost:
    """Times of `volume` on `topology`: a collective by `_collective_seconds`, a ring step by the link its
    members span; attention 4 dh FLOPs per kept pair and head of the rank (H / u heads)."""
    p, u = topology.gpus, plan.ulysses
    per_pair = 4 * dims.head_dim * (dims.heads / u) / (topology.tflops * 1e12)
    selection = _collective_seconds(volume.selection, p, topology)
    if volume.schedule is None:  # all-gather: every key of the sequence held, nothing overlapped
        gather = _collective_seconds(volume.gather, p, topology)
        attention = float(chunk_pairs(branch, job.seq_len, p).sum(1).max()) * per_pair
        return BranchCost(selection + gather, gather, selection + gather, attention, volume.gather, False)
    schedule = volume.schedule
    a2a = _collective_seconds(volume.all_to_all, u, topology)
    kv_heads = replicated_kv_heads(dims.kv_heads, u)
    shard = kv_shard_bytes(job, p, kv_heads, dims.head_dim)
    transfer = shard / _ring_link(plan.ring, u, topology)
    steps = [schedule.step_pairs(s) * per_pair for s in range(schedule.steps)]
    ring_time = sum(max(c, transfer) for c in steps[:-1]) + steps[-1]
    ring = transfer * (schedule.steps - 1)
    held = kv_shard_bytes(job, p, kv_heads - dims.kv_heads, dims.head_dim)  # replicated KV heads only
    return BranchCost(
        comm_forward=selection + a2a + ring,
        comm_backward=a2a + 2 * ring,
        exposed_forward=selection + a2a + ring_time - sum(steps),
        attention=schedule.busiest * per_pair,
        held=held,
        hides=all(c >= transfer for c in steps[:-1]),
    )


def _estimate(plan: StrategyPlan, shape: ModelShape, job: Job, topology: Topology) -> None:
    """Fill `plan`'s bytes, seconds and memory: every layer kind's branches, times the layers running it;
    forward terms once more under checkpointing, backward terms when training."""
    d = shape.dims
    forwards = 1 + (job.train and job.checkpointing)
    tokens = job.batch * job.seq_len / topology.gpus
    linear = 2 * (shape.parameters - shape.embedding) * tokens * (forwards + 2 * job.train)
    compute = linear / (topology.tflops * 1e12)
    comm = exposed = step_bytes = held = 0.0
    overlap = True
    for index, (branches, count) in enumerate(shape.distinct.items()):
        for branch in branches:
            volume = layer_volume(plan, branch, d, job, topology.gpus)
            cost = branch_cost(plan, branch, d, job, topology, volume)
            if index == 0:
                plan.layer_bytes += volume.forward
            plan.ring_steps.append(volume.schedule.steps if volume.schedule else 1)
            step_bytes += count * (volume.forward * forwards + volume.backward * job.train)
            comm += count * (cost.comm_forward * forwards + cost.comm_backward * job.train)
            exposed += count * (cost.exposed_forward * forwards + cost.comm_backward * job.train)
            compute += count * cost.attention * (forwards + BACKWARD_ATTENTION * job.train)
            held = max(held, cost.held)
            overlap &= cost.hides
    plan.step_bytes, plan.comm_seconds, plan.exposed_seconds, plan.compute_seconds = step_bytes, comm, exposed, compute
    plan.overlap = overlap and plan.ring > 1
    plan.memory = _memory(shape, job, topology, held)
    plan.fits = plan.memory["total"] <= topology.memory_gib


def _memory(shape: ModelShape, job: Job, topology: Topology, held: float) -> dict[str, float]:
    """GiB per GPU: `memory.estimate`'s terms for this rank's N/P tokens (states sharded over all GPUs in
    training; whole bf16 weights, one layer's activations and nothing else for a forward pass), plus `kv`:
    the K/V a layer holds beyond its own shard (the gathered sequence, replicated KV heads; a ring keeps no
    received shard), kept for backward by every layer without checkpointing, by one with it."""
    d = shape.dims
    tokens = job.batch * job.seq_len // topology.gpus
    precision = memory.Precision.of("bfloat16", "bf16")
    if job.train:
        est = memory.estimate(
            d,
            frozen=0,
            trainable=shape.parameters,
            outside_layers=shape.outside,
            precision=precision,
            shard=topology.gpus,
            work=memory.Workload(tokens=tokens, checkpointing=job.checkpointing, backprop=True, lm_loss=True),
            costs=shape.costs(job.seq_len),
        )
        terms = est.to_dict()
        terms.pop("total")
        layers_holding = 1 if job.checkpointing else d.layers
    else:
        terms = {
            "weights": shape.parameters * precision.compute / memory.GIB,
            "activations": tokens * d.layer_bytes(precision.compute) / memory.GIB,
            "logits": tokens * d.vocab * precision.compute / memory.GIB,
        }
        layers_holding = 1
    terms["kv"] = held * layers_holding / memory.GIB
    terms["total"] = sum(terms.values())
    return terms


# ---- the model and the whole plan ------------------------------------------------------------------


def shipped_configs() -> dict[str, Path]:
    """Shipped config names (file stems, lower case) -> paths."""
    return {p.stem.lower(): p for p in sorted(CONFIGS_DIR.glob("*.json"))}


def load_model_config(ref: str | Path) -> tuple[str, Any]:
    """(name, transformers config) of a shipped config name (e.g. Llama-3.1-8B), a config.json, or a
    local checkpoint directory; nothing is downloaded."""
    from transformers import AutoConfig

    path = Path(ref)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        configs = shipped_configs()
        if str(ref).lower() not in configs:
            raise PlannerError(
                f"model config {str(ref)!r} is not a local directory, a config.json or a shipped config; valid "
                f"shipped configs: {', '.join(configs) or 'none'}"
            )
        path = configs[str(ref).lower()]
    raw = json.loads(path.read_text())
    if "model_type" not in raw:
        raise PlannerError(f"model config {str(path)!r} has no model_type; valid: a transformers config.json")
    name = path.parent.name if path.name == "config.json" else path.stem
    return name, AutoConfig.for_model(raw.pop("model_type"), **raw)


def model_shape(model: nn.Module, name: str) -> ModelShape:
    """Widths, parameter counts and each layer's cp branches (`lcplug.cp.rules.plan_for`, the mapping the
    cp install uses) of a (meta) model, patched or not."""
    from ..patching import choose_adapter, patch_state

    state = patch_state(model)
    adapter = state.adapter if state is not None else choose_adapter(model)
    modules = [m for _, m in sorted(adapter.attention_modules(model).items())]
    installed = memory.installed_attention(model)
    layers = []
    for module, layer in zip(modules, installed):
        window = getattr(module, "sliding_window", None)
        rules = [StaticRule(FULL, window)] if layer is None else rules_of(plan_for(layer, window))
        layers.append(tuple(Branch.of(rule) for rule in rules))
    dims = memory.Dims.of(model)
    params = {id(p): p for p in model.parameters()}
    embed = {id(p): p for p in model.get_input_embeddings().parameters()}
    head = model.get_output_embeddings()
    outside = {**embed, **({id(p): p for p in head.parameters()} if head is not None else {})}
    return ModelShape(
        name=name,
        dims=dims,
        parameters=sum(p.numel() for p in params.values()),
        outside=sum(p.numel() for p in outside.values()),
        embedding=sum(p.numel() for p in embed.values()),
        layers=layers,
        installed=installed,
    )


def skeleton_shape(ref: str | Path, attention: Any = None) -> ModelShape:
    """`model_shape` of a config (`load_model_config`) built on the meta device, patched with `attention`."""
    from .. import patch
    from ..train.preflight import skeleton

    name, config = load_model_config(ref)
    with torch.device("meta"):
        model = skeleton(config, "bfloat16")
        if attention is not None:
            patch(model, attention=attention)
    return model_shape(model, name)


def recipe_shape(recipe: str | Path) -> tuple[ModelShape, int]:
    """`model_shape` of a recipe's model as its last stage trains it (`lcplug plan`'s meta model), and that
    stage's sequence length."""
    from ..train.plan import plan

    result = plan(recipe)
    return model_shape(result.model_instance, result.recipe), result.stages[-1].seq_len


@dataclass
class CPPlan:
    """Every strategy's estimate for one model, sequence and topology, and the recommendation."""

    model: str
    seq_len: int
    topology: Topology
    job: Job
    attention: list[tuple[str, int]]  # (what a layer kind runs, layers running it)
    strategies: list[StrategyPlan]
    recommended: str | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "seq_len": self.seq_len,
            "topology": asdict(self.topology),
            "job": asdict(self.job),
            "attention": [{"runs": label, "layers": n} for label, n in self.attention],
            "strategies": [s.to_dict() for s in self.strategies],
            "recommended": self.recommended,
            "reason": self.reason,
        }

    def table(self) -> str:
        return format_cp_plan(self)


def plan_cp(shape: ModelShape, topology: Topology, job: Job) -> CPPlan:
    """Estimate every strategy for `shape` on `topology` and recommend one (see `recommend`)."""
    try:
        check_seq_len(job.seq_len, topology.gpus, "zigzag")
    except CPConfigError as exc:
        raise PlannerError(str(exc)) from None
    if job.batch < 1 or job.dtype_bytes < 1:
        raise PlannerError(f"batch {job.batch} and dtype bytes {job.dtype_bytes} must be >= 1")
    plans = _candidates(topology, shape)
    for plan in plans:
        if plan.valid:
            _estimate(plan, shape, job, topology)
    best, reason = recommend(plans, topology)
    attention = [(" | ".join(b.describe() for b in branches), n) for branches, n in shape.distinct.items()]
    return CPPlan(shape.name, job.seq_len, topology, job, attention, plans, best, reason)


def recommend(plans: list[StrategyPlan], topology: Topology) -> tuple[str | None, str]:
    """Among valid strategies that fit the GPU's memory, those within `TIE` of the shortest estimated step
    are a tie at this model's accuracy: the one moving the fewest bytes wins (least exposed to a bandwidth
    the model got wrong). When none fits, the one needing the least memory. Returns it and why, in one line."""
    valid = [p for p in plans if p.valid]
    if not valid:
        return None, "no strategy can run this model at this degree"
    fitting = [p for p in valid if p.fits]
    if not fitting:
        best = min(valid, key=lambda p: p.memory["total"])
        return best.strategy, (
            f"nothing fits {topology.memory_gib:g} GiB per GPU; {best.strategy} needs the least "
            f"({best.memory['total']:.1f} GiB): add GPUs, shorten the sequence or turn on checkpointing"
        )
    fastest = min(fitting, key=lambda p: p.step_seconds)
    tied = [p for p in fitting if p.step_seconds <= fastest.step_seconds * (1 + TIE)]
    best = min(tied, key=lambda p: (p.step_bytes, p.step_seconds))
    hidden = f", {best.hidden:.0%} of its communication hidden" if best.comm_seconds else ""
    why = [f"estimated step {best.step_seconds:.2f} s, {_gb(best.step_bytes)} moved per GPU{hidden}"]
    if best is not fastest:
        why.append(f"within {TIE:.0%} of {fastest.strategy} ({fastest.step_seconds:.2f} s) with fewer bytes")
    others = sorted((p for p in fitting if p is not best and p is not fastest), key=lambda p: p.step_seconds)
    if others:
        why.append(f"next {others[0].strategy} at {others[0].step_seconds:.2f} s")
    if best.overlap:
        why.append("ring transfers hide behind attention")
    skipped = [p.strategy for p in plans if not p.valid]
    if skipped:
        why.append(f"{', '.join(skipped)} cannot run")
    unfit = [p.strategy for p in valid if not p.fits]
    if unfit:
        why.append(f"{', '.join(unfit)} exceed {topology.memory_gib:g} GiB")
    return best.strategy, "; ".join(why)


# ---- the table -------------------------------------------------------------------------------------


def _gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.3g} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.3g} MB"


def format_cp_plan(plan: CPPlan) -> str:
    """The human plan: set-up, attention per layer kind, one row per strategy, the recommendation."""
    t, j = plan.topology, plan.job
    nodes = math.ceil(t.gpus / t.gpus_per_node)
    mode = ("training step" + (", checkpointing" if j.checkpointing else "")) if j.train else "forward pass"
    lines = [
        f"model {plan.model}: {plan.seq_len:,} tokens x {j.batch} row(s), {mode}, {j.dtype_bytes}-byte elements",
        f"topology: {t.gpus} GPUs ({nodes} node(s) x {min(t.gpus, t.gpus_per_node)}), NVLink {t.intra_bw:g} GB/s, "
        f"inter-node {t.inter_bw:g} GB/s, {t.memory_gib:g} GiB and {t.tflops:g} TFLOP/s per GPU",
        "attention: " + "; ".join(f"{label} x{n}" for label, n in plan.attention),
        "",
    ]
    header = (
        f"{'strategy':<16} {'u x r':>7} {'steps':>5} {'layer fwd':>10} {'per step':>10} {'comm s':>7} "
        f"{'exposed':>7} {'hidden':>6} {'step s':>7} {'mem GiB':>8} {'kv GiB':>7} {'fits':>4}"
    )
    lines += [header, "-" * len(header)]
    for s in plan.strategies:
        if not s.valid:
            lines.append(f"{s.strategy:<16} invalid: {s.why}")
            continue
        steps = "/".join(str(n) for n in dict.fromkeys(s.ring_steps))
        lines.append(
            f"{s.strategy:<16} {f'{s.ulysses}x{s.ring}':>7} {steps:>5} {_gb(s.layer_bytes):>10} "
            f"{_gb(s.step_bytes):>10} {s.comm_seconds:>7.2f} {s.exposed_seconds:>7.2f} {s.hidden:>6.0%} "
            f"{s.step_seconds:>7.2f} {s.memory['total']:>8.1f} {s.memory['kv']:>7.1f} {'yes' if s.fits else 'NO':>4}"
        )
    lines += ["", f"recommended: {plan.recommended or 'none'}: {plan.reason}"]
    return "\n".join(lines)
