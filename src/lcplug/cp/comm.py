"""Collectives of one process group, counted in bytes and differentiable.

Every byte a context-parallel strategy moves goes through a `Comm`: it runs the real
`torch.distributed` collective, adds what this rank sent and received to a `CommStats` (per collective
kind), and turns a failure (a dead rank, a timeout) into a `CPCommError` that says which group and what
to check. The autograd Functions here give each collective its adjoint: all-gather <-> reduce-scatter,
all-to-all <-> the inverse all-to-all. Ring exchanges (`Comm.exchange`) have no autograd of their own:
ring attention runs its backward itself (`lcplug.cp.attend.KeySetAttention`).

Byte accounting is per rank and logical (what the algorithm must move, not what a backend's wire
protocol adds): all-gather and reduce-scatter of an n-byte shard count n (P-1) each way, an all-to-all
of n bytes n (P-1) / P, a point-to-point exchange n, an all-reduce of n bytes 2 n (P-1) / P.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from .errors import CPCommError

KINDS = ("all_gather", "reduce_scatter", "all_to_all", "send_recv", "all_reduce")


@dataclass
class CommStats:
    """Bytes this rank sent and received, and calls made, per collective kind, since the last `reset`."""

    sent: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    received: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    calls: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))

    def add(self, kind: str, sent: float, received: float) -> None:
        self.sent[kind] += int(sent)
        self.received[kind] += int(received)
        self.calls[kind] += 1

    def reset(self) -> None:
        for table in (self.sent, self.received, self.calls):
            for kind in table:
                table[kind] = 0

    def total(self) -> dict[str, int]:
        return {"sent": sum(self.sent.values()), "received": sum(self.received.values())}

    def to_dict(self) -> dict[str, Any]:
        return {
            kind: {"sent": self.sent[kind], "received": self.received[kind], "calls": self.calls[kind]}
            for kind in KINDS
        }


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Comm:
    """One process group (ranks `ranks`, this rank's index `rank`), its byte counter and timeout."""

    def __init__(self, group: Any, stats: CommStats, timeout_s: float):
        self.group = group
        self.stats = stats
        self.timeout_s = timeout_s
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.ranks = dist.get_process_group_ranks(group)

    def _run(self, kind: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except (RuntimeError, dist.DistBackendError) as exc:
            raise CPCommError(
                f"cp {kind} over ranks {self.ranks} failed on rank {dist.get_rank()} (a rank died, disagreed on "
                f"shapes, or did not answer within the {self.timeout_s:g}s cp timeout): "
                f"{str(exc).splitlines()[0][:200]}"
            ) from exc

    # ---- plain collectives (no autograd) ---------------------------------------------------------------

    def all_gather(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's `x` (same shape on all ranks), in group-rank order."""
        x = x.contiguous()
        out = torch.empty(self.size * x.numel(), dtype=x.dtype, device=x.device)
        self._run("all_gather", lambda: dist.all_gather_into_tensor(out, x.view(-1), group=self.group))
        out = out.view(self.size, *x.shape)
        n = _nbytes(x) * (self.size - 1)
        self.stats.add("all_gather", n, n)
        return list(out.unbind(0))

    def reduce_scatter(self, parts: torch.Tensor) -> torch.Tensor:
        """Sum over ranks of `parts` (P, ...), this rank's part."""
        parts = parts.contiguous()
        out = torch.empty(parts[0].numel(), dtype=parts.dtype, device=parts.device)
        self._run("reduce_scatter", lambda: dist.reduce_scatter_tensor(out, parts.view(-1), group=self.group))
        out = out.view(parts.shape[1:])
        n = _nbytes(out) * (self.size - 1)
        self.stats.add("reduce_scatter", n, n)
        return out

    def all_to_all(self, x: torch.Tensor) -> torch.Tensor:
        """x (P, ...): part j goes to rank j; returns (P, ...), part j from rank j."""
        x = x.contiguous()
        out = torch.empty_like(x)
        self._run("all_to_all", lambda: dist.all_to_all_single(out, x, group=self.group))
        n = _nbytes(x) * (self.size - 1) // self.size
        self.stats.add("all_to_all", n, n)
        return out

    def all_reduce(self, x: torch.Tensor, op: Any = dist.ReduceOp.SUM) -> torch.Tensor:
        x = x.clone()
        self._run("all_reduce", lambda: dist.all_reduce(x, op=op, group=self.group))
        n = 2 * _nbytes(x) * (self.size - 1) // self.size
        self.stats.add("all_reduce", n, n)
        return x

    def exchange(self, send: torch.Tensor, to: int, recv: torch.Tensor, source: int) -> Callable[[], None]:
        """Start sending `send` to group rank `to` and receiving `recv` from `source`; returns `wait`."""
        send = send.contiguous()
        ops = [
            dist.P2POp(dist.isend, send, self.ranks[to], group=self.group),
            dist.P2POp(dist.irecv, recv, self.ranks[source], group=self.group),
        ]
        works = self._run("send_recv", lambda: dist.batch_isend_irecv(ops))
        self.stats.add("send_recv", _nbytes(send), _nbytes(recv))

        def wait() -> None:
            for work in works:
                self._run("send_recv", work.wait)

        return wait


# ---- differentiable collectives ------------------------------------------------------------------------


class _AllGather(torch.autograd.Function):
    """(...) on each rank -> (P, ...); backward: reduce-scatter of the gradient (each rank's share summed)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Comm) -> torch.Tensor:
        ctx.comm = comm
        return torch.stack(comm.all_gather(x))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.comm.reduce_scatter(grad), None


class _AllToAll(torch.autograd.Function):
    """(P, ...) parts exchanged; the adjoint of an all-to-all is the all-to-all of the gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Comm) -> torch.Tensor:
        ctx.comm = comm
        return comm.all_to_all(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.comm.all_to_all(grad), None


def all_gather(x: torch.Tensor, comm: Comm) -> torch.Tensor:
    """Differentiable all-gather: (P, *x.shape); gradients are reduce-scattered back to their owners."""
    return _AllGather.apply(x, comm)


def all_to_all(x: torch.Tensor, comm: Comm) -> torch.Tensor:
    """Differentiable all-to-all of x (P, ...)."""
    return _AllToAll.apply(x, comm)
