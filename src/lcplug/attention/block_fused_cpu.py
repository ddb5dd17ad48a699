"""Block-sparse attention through torch's fused CPU flash-attention kernels.

torch's CPU flash kernel (`aten._scaled_dot_product_flash_attention_for_cpu`) computes a masked
softmax-attention tile in one fused pass and returns the log-sum-exp; its backward op takes the output
and log-sum-exp. That is all a block-sparse executor needs: per chunk of query blocks, gather the kept
key blocks, run the fused kernel with the layout's token mask as an additive bias, and fold sink logits
in through the log-sum-exp. The backward calls the fused backward with the *final* output and
log-sum-exp (sinks included), which yields exact gradients, and scatters key/value gradients back to
their blocks. These are private aten ops, so everything touching them lives in this one module, and
`available()` lets callers fall back to the portable executor when a torch release drops them.
"""

from __future__ import annotations

import torch

_FWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def available(query: torch.Tensor, softcap: float | None) -> bool:
    """The fused path runs on CPU tensors of float32/bfloat16 without logit soft-capping."""
    return (
        _FWD is not None
        and _BWD is not None
        and query.device.type == "cpu"
        and softcap is None
        and query.dtype in (torch.float32, torch.bfloat16)
    )


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, U, NKB, BK, D), idx (B, U, nc, K) -> (B, U, nc, K*BK, D): whole-block row copies."""
    b, u, nkb, bk, d = x.shape
    _, _, nc, k = idx.shape
    base = (torch.arange(b * u, device=idx.device) * nkb).view(b, u, 1, 1)
    rows = torch.index_select(x.reshape(b * u * nkb, bk * d), 0, (idx + base).reshape(-1))
    return rows.view(b, u, nc, k * bk, d)


def _bias(bias: torch.Tensor, units: int) -> torch.Tensor:
    """Layout bias (B, G, nc, BQ, S) -> (B, U, nc, BQ, S), a view when G == 1."""
    return bias.expand(-1, units, -1, -1, -1) if bias.shape[1] == 1 else bias


def _flat(q_c, k_g, v_g, bias_c):
    """Fold (B, U, nc) into the kernel's batch; the P query heads of a unit share one key head."""
    b, u, p, nc, bq, d = q_c.shape
    n = b * u * nc
    q2 = q_c.permute(0, 1, 3, 2, 4, 5).reshape(n, p, bq, d)
    k2 = k_g.reshape(n, 1, -1, d).expand(-1, p, -1, -1)
    v2 = v_g.reshape(n, 1, -1, d).expand(-1, p, -1, -1)
    return q2, k2, v2, bias_c.reshape(n, 1, bq, -1)


class FusedBlockAttention(torch.autograd.Function):
    """q (B, U, P, NQ, BQ, D); k, v (B, U, NKB, BK, D); idx (B, U, NQ, K); bias (B, U or 1, NQ, BQ, K*BK)."""

    @staticmethod
    def forward(ctx, q, k, v, sink, idx, allowed, scaling: float, step: int):
        b, u, p, nq, bq, d = q.shape
        out = torch.empty_like(q)
        lse = torch.empty(b, u, p, nq, bq, dtype=torch.float32)
        for c0 in range(0, nq, step):
            c1 = min(nq, c0 + step)
            q2, k2, v2, bias = _flat(
                q[:, :, :, c0:c1],
                _gather(k, idx[:, :, c0:c1]),
                _gather(v, idx[:, :, c0:c1]),
                _bias(allowed[:, :, c0:c1], u),
            )
            o, l = _FWD(q2, k2, v2, attn_mask=bias, scale=scaling)
            nc = c1 - c0
            out[:, :, :, c0:c1] = o.view(b, u, nc, p, bq, d).permute(0, 1, 3, 2, 4, 5)
            lse[:, :, :, c0:c1] = l.view(b, u, nc, p, bq).permute(0, 1, 3, 2, 4).float()
        empty = ~torch.isfinite(lse)  # rows that see nothing: output 0
        if sink is not None:
            total = torch.logaddexp(lse, sink.float())
            out = out * torch.exp(lse - total).masked_fill(empty, 0.0).to(out.dtype)[..., None]
        else:
            total = lse
        # the backward recomputes P = exp(S - total): +inf for empty rows makes their P exactly 0
        total = total.masked_fill(~torch.isfinite(total), float("inf"))
        ctx.save_for_backward(q, k, v, sink, idx, allowed, out, total)
        ctx.scaling, ctx.step = scaling, step
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, sink, idx, allowed, out, total = ctx.saved_tensors
        b, u, p, nq, bq, d = q.shape
        grad_out = grad_out.contiguous()
        dq = torch.empty_like(q)
        dk = torch.zeros_like(k)
        dv = torch.zeros_like(v)
        for c0 in range(0, nq, ctx.step):
            c1 = min(nq, c0 + ctx.step)
            nc = c1 - c0
            idx_c = idx[:, :, c0:c1]
            q2, k2, v2, bias = _flat(
                q[:, :, :, c0:c1], _gather(k, idx_c), _gather(v, idx_c), _bias(allowed[:, :, c0:c1], u)
            )
            go2 = grad_out[:, :, :, c0:c1].permute(0, 1, 3, 2, 4, 5).reshape(-1, p, bq, d)
            o2 = out[:, :, :, c0:c1].permute(0, 1, 3, 2, 4, 5).reshape(-1, p, bq, d)
            l2 = total[:, :, :, c0:c1].permute(0, 1, 3, 2, 4).reshape(-1, p, bq).to(torch.float32)
            gq, gk, gv = _BWD(go2, q2, k2, v2, o2, l2, 0.0, False, attn_mask=bias, scale=ctx.scaling)
            dq[:, :, :, c0:c1] = gq.view(b, u, nc, p, bq, d).permute(0, 1, 3, 2, 4, 5)
            kk = idx_c.shape[-1]
            rows = (idx_c + (torch.arange(b * u) * k.shape[2]).view(b, u, 1, 1)).reshape(-1)
            dk.view(-1, k.shape[3] * d).index_add_(0, rows, gk.sum(1).reshape(-1, k.shape[3] * d))
            dv.view(-1, k.shape[3] * d).index_add_(0, rows, gv.sum(1).reshape(-1, k.shape[3] * d))
        dsink = None
        if sink is not None and ctx.needs_input_grad[3]:
            delta = (grad_out.float() * out.float()).sum(-1)  # (B, U, P, NQ, BQ)
            dsink = -(delta * torch.exp(sink.float() - total)).sum(dim=(0, 3, 4), keepdim=True).to(sink.dtype)
        return dq, dk, dv, dsink, None, None, None, None
