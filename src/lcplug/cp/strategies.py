"""Context-parallel strategies: how the keys a rank's queries need reach them.

- `HeadsThenRing(ulysses=u)`: an all-to-all inside groups of u ranks turns sequence shards into head
  shards (each rank: H/u heads of the group's u shards), then K/V rotate around a ring across the groups,
  each step's transfer overlapping the previous step's compute. u = 1 is ring attention, u = degree is
  DeepSpeed-Ulysses, anything between is the hybrid (USP; Megatron's a2a+p2p). A ring runs only as many
  steps as the furthest key span any rank's queries need (a sliding window over contiguous shards: one),
  and a step computes only the key blocks its queries keep. No rank keeps another's K/V for backward:
  the backward passes the shards round again and sends dK/dV back to their owners (`RingSets`).
- `AllGatherKV`: all-gather K/V, attend locally; the backward reduce-scatters dK/dV (Llama 3's CP).

Every strategy takes a `Rule` and returns this rank's (B, L_local, H, D) output, so any pattern runs
under any strategy; all data movement goes through `lcplug.cp.comm` (counted), and all attention through
`lcplug.cp.attend.key_set_attention` (one autograd node per layer and rule).
"""

from __future__ import annotations

import torch

from ..positions import ShardLayout
from .attend import key_set_attention, needs, span_backward, span_forward
from .comm import Comm, all_gather, all_to_all
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
        sets = RingSets(ring, ctx, rule, group_spans, scaling, softcap)
        out = key_set_attention(query, key, value, sink, sets)
        if u > 1:
            out = sequence_to_heads(out.transpose(1, 2), mesh.ulysses).transpose(1, 2)
        return out


class RingSets:
    """Key sets of a ring (`KeySets` over this rank's (key, value)): step s holds member (me - s)'s K/V, passed
    on one member per step.

    Forward, the transfer of step s + 1 overlaps step s's compute and each shard is dropped once used.
    Backward brings the shards round again the same way (a rank keeps only its own between the passes) and
    sends each step's dK/dV straight back to the shard's owner, overlapping the next step's compute.
    """

    def __init__(self, comm: Comm, ctx: ShardContext, rule: Rule, spans_of, scaling: float, softcap: float | None):
        self.comm, self.ctx, self.rule, self.spans_of = comm, ctx, rule, spans_of
        self.scaling, self.softcap = scaling, softcap
        me, size = comm.rank, comm.size
        self.mine = spans_of(me)
        self.local = [needs(ctx, rule, self.mine, spans_of((me - s) % size)) for s in range(size)]
        self.steps = _ring_steps(comm, ctx, rule, self.local)

    def _rotate(self, kv: torch.Tensor):
        """Yield (step, this step's stacked K/V), shifting the next one in meanwhile."""
        comm = self.comm
        for step in range(self.steps):
            if step + 1 < self.steps:
                incoming = torch.empty_like(kv)
                wait = comm.exchange(kv, (comm.rank + 1) % comm.size, incoming, (comm.rank - 1) % comm.size)
            yield step, kv
            if step + 1 < self.steps:
                wait()
                kv = incoming

    def forward(self, query, tensors):
        for step, kv in self._rotate(torch.stack(tensors)):
            if self.local[step]:
                spans = self.spans_of((self.comm.rank - step) % self.comm.size)
                yield span_forward(
                    self.ctx, self.rule, query, self.mine, kv[0], kv[1], spans, self.scaling, self.softcap
                )

    def backward(self, query, tensors, grad_out, out, total):
        comm = self.comm
        me, size = comm.rank, comm.size
        kv = torch.stack(tensors)
        dq = torch.zeros_like(query)
        mine = torch.zeros_like(kv)
        pending = None  # the previous step's dK/dV exchange: (sent, received, wait)
        for step, held in self._rotate(kv):
            grad = torch.zeros_like(kv)
            if self.local[step]:
                spans = self.spans_of((me - step) % size)
                gq, grad[0], grad[1] = span_backward(
                    self.ctx, self.rule, query, self.mine, held[0], held[1], spans,
                    self.scaling, self.softcap, grad_out, out, total,
                )  # fmt: skip
                dq += gq
            if step == 0:
                mine += grad
                continue
            received = torch.empty_like(kv)  # every rank exchanges every step, so sends and receives pair up
            wait = comm.exchange(grad, (me - step) % size, received, (me + step) % size)
            if pending is not None:
                pending[2]()
                mine += pending[1]
            pending = (grad, received, wait)
        if pending is not None:
            pending[2]()
            mine += pending[1]
        return dq, (mine[0], mine[1])


class WholeSet:
    """One key set (`KeySets` over the all-gathered (key, value)): the whole row, laid out as `spans`."""

    def __init__(self, ctx: ShardContext, rule: Rule, mine: list[Span], spans: list[Span], scaling, softcap):
        self.args = (ctx, rule, mine, spans, scaling, softcap)

    def forward(self, query, tensors):
        ctx, rule, mine, spans, scaling, softcap = self.args
        yield span_forward(ctx, rule, query, mine, *tensors, spans, scaling, softcap)

    def backward(self, query, tensors, grad_out, out, total):
        ctx, rule, mine, spans, scaling, softcap = self.args
        dq, dk, dv = span_backward(ctx, rule, query, mine, *tensors, spans, scaling, softcap, grad_out, out, total)
        return dq, (dk, dv)


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
        return key_set_attention(query, kv[0], kv[1], rule.sink, WholeSet(ctx, rule, mine, kv_spans, scaling, softcap))
