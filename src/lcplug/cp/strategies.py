"""Context-parallel strategies: how the keys a rank's queries need reach them.

- `HeadsThenRing(ulysses=u)`: an all-to-all inside groups of u ranks turns sequence shards into head
  shards (each rank: H/u heads of the group's u shards), then K/V rotate around a ring across the groups,
  each step's transfer overlapping the previous step's compute. u = 1 is ring attention, u = degree is
  DeepSpeed-Ulysses, anything between is the hybrid (USP; Megatron's a2a+p2p). A ring runs only as many
  steps as the furthest key span any rank's queries need (a sliding window over contiguous shards: one),
  and a step computes only the key blocks its queries keep.
- `AllGatherKV`: all-gather K/V, attend locally; the backward reduce-scatters dK/dV (Llama 3's CP).

Every strategy takes a `Rule` and returns this rank's (B, L_local, H, D) output, so any pattern runs
under any strategy; all data movement goes through `lcplug.cp.comm` (counted, differentiable).
"""

from __future__ import annotations

import torch

from ..attention.merge import merge_partials
from ..positions import ShardLayout
from .attend import finish, needs, span_attention
from .comm import Comm, all_gather, all_to_all, ring_shift
from .errors import CPConfigError
from .mesh import CPMesh
from .rules import Rule
from .shard import ShardContext, Span, coalesce


class Strategy:
    """Base: the shard layout a strategy wants and its `attend`."""

    layout: ShardLayout = "contiguous"
    ulysses: int = 1

    def check_heads(self, heads: int, kv_heads: int, head_groups: int = 1) -> None:
        """Refuse, at patch time, head counts this strategy cannot split."""

    def attend(
        self, mesh: CPMesh, ctx: ShardContext, rule: Rule, query, key, value, scaling: float, softcap: float | None
    ) -> torch.Tensor:
        raise NotImplementedError  # abstract: each strategy defines it


class HeadsThenRing(Strategy):
    def __init__(self, ulysses: int = 1, layout: ShardLayout = "contiguous"):
        self.ulysses, self.layout = ulysses, layout

    def check_heads(self, heads: int, kv_heads: int, head_groups: int = 1) -> None:
        u = self.ulysses
        if u == 1:
            return
        if heads % u:
            valid = [d for d in range(1, heads + 1) if heads % d == 0]
            raise CPConfigError(
                f"cp ulysses degree {u} does not split the model's {heads} query heads; valid: "
                f"{', '.join(map(str, valid))} (use ring or hybrid for a larger cp degree)"
            )
        if kv_heads % u and u % kv_heads:
            raise CPConfigError(
                f"cp ulysses degree {u} neither divides nor is a multiple of the model's {kv_heads} KV heads; "
                f"valid: a divisor or multiple of {kv_heads} that divides {heads}"
            )
        if head_groups > 1:
            raise CPConfigError(
                f"cp ulysses degree {u} splits heads, and a head-dependent pattern ({head_groups} head groups) "
                "cannot run on a share of them; valid: ring or allgather for this attention"
            )

    def attend(self, mesh, ctx, rule, query, key, value, scaling, softcap):
        u = self.ulysses
        heads = query.shape[1]
        ring = mesh.ring

        def group_spans(ring_index: int) -> list[Span]:
            return coalesce([s for j in range(u) for s in ctx.spans(ring_index * u + j)])

        sink = rule.sink
        if u > 1:
            query, key, value = heads_to_sequence(query, key, value, mesh.ulysses)
            share = heads // u
            if sink is not None:
                sink = sink[mesh.ulysses.rank * share : (mesh.ulysses.rank + 1) * share]
        out, lse = ring_attention(ring, ctx, rule, query, key, value, group_spans, scaling, softcap)
        out = finish(out, lse, sink)  # (B, L, h, D)
        if u > 1:
            out = sequence_to_heads(out.transpose(1, 2), mesh.ulysses).transpose(1, 2)
        return out


def ring_attention(comm: Comm, ctx: ShardContext, rule: Rule, query, key, value, spans_of, scaling, softcap):
    """Queries of ring member `comm.rank` over every member's keys; (out, lse) before the sink."""
    size, me = comm.size, comm.rank
    mine = spans_of(me)
    local = [needs(ctx, rule, mine, spans_of((me - s) % size)) for s in range(size)]
    steps = _ring_steps(comm, ctx, rule, local)
    kv = torch.stack([key, value])
    parts, unused = [], []
    for step in range(steps):
        if step + 1 < steps:
            incoming, wait = ring_shift(kv, comm)  # overlaps this step's compute
        if local[step]:
            source = spans_of((me - step) % size)
            parts.append(span_attention(ctx, rule, query, mine, kv[0], kv[1], source, scaling, softcap))
        elif step:
            unused.append(kv)
        if step + 1 < steps:
            wait()
            kv = incoming
    out, lse = merge_partials(parts, query)
    if unused and torch.is_grad_enabled():
        # every rank must run every shift's backward (it is a send/recv pair): a shard this rank passed on
        # without reading still gets a (zero) gradient
        out = out + sum(u.sum() for u in unused).mul(0).to(out.dtype)
    return out, lse


def _ring_steps(comm: Comm, ctx: ShardContext, rule: Rule, local: list[bool]) -> int:
    """1 + the last step any ring member needs (one tiny all-reduce, shared by layers of the same rule)."""
    if comm.size == 1:
        return 1
    key = ("ring_steps", comm.ranks[0], rule.cache_key)
    if rule.cache_key is not None and key in ctx.cache:
        return ctx.cache[key]
    flags = torch.tensor(local, dtype=torch.int32)
    wanted = comm.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    steps = int(wanted.nonzero().max()) + 1 if bool(wanted.any()) else 1
    ctx.cache[key] = steps
    return steps


def heads_to_sequence(query, key, value, comm: Comm):
    """(B, H, L, D) shards of the sequence -> (B, H/u, u*L, D) shards of the heads, one all-to-all for q, k, v.

    KV heads are replicated first when u exceeds them, so each rank's query heads find their KV head.
    """
    u = comm.size
    b, h, n, d = query.shape
    hkv = key.shape[1]
    if u > hkv:
        key, value = key.repeat_interleave(u // hkv, dim=1), value.repeat_interleave(u // hkv, dim=1)
        hkv = u
    q = query.reshape(b, u, h // u, n, d)
    kv = torch.stack([key, value], 1).reshape(b, 2, u, hkv // u, n, d).transpose(1, 2).reshape(b, u, -1, n, d)
    packed = torch.cat([q, kv], dim=2).transpose(0, 1)  # (u, B, h/u + 2 hkv/u, n, d): part j goes to rank j
    got = all_to_all(packed, comm)  # part j came from rank j: its tokens
    whole = got.permute(1, 2, 0, 3, 4).reshape(b, -1, u * n, d)
    hq, hk = h // u, hkv // u
    return whole[:, :hq], whole[:, hq : hq + hk], whole[:, hq + hk :]


def sequence_to_heads(out: torch.Tensor, comm: Comm) -> torch.Tensor:
    """(B, H/u, u*L, D) -> (B, H, L, D): the inverse re-partition of the attention output."""
    u = comm.size
    b, hq, total, d = out.shape
    parts = out.reshape(b, hq, u, total // u, d).permute(2, 0, 1, 3, 4)  # part j: rank j's tokens
    got = all_to_all(parts, comm)  # part j: rank j's heads of my tokens
    return got.transpose(0, 1).reshape(b, u * hq, total // u, d)


class AllGatherKV(Strategy):
    def attend(self, mesh, ctx, rule, query, key, value, scaling, softcap):
        comm = mesh.cp
        gathered = all_gather(torch.stack([key, value]), comm)  # (P, 2, B, Hkv, L_local, D)
        kv = gathered.permute(1, 2, 3, 0, 4, 5).flatten(3, 4)  # rank order along the sequence
        kv_spans = coalesce([s for r in range(comm.size) for s in ctx.spans(r)])
        mine = ctx.spans(comm.rank)
        out, lse = span_attention(ctx, rule, query, mine, kv[0], kv[1], kv_spans, scaling, softcap)
        return finish(out, lse, rule.sink)
