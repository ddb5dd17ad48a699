"""The Triton executor: block-sparse flash attention over a `BlockLayout`, forward and backward.

Same contract as `block_torch.block_attention` (GQA, head-dependent layouts, sink logits, soft-cap,
rows that see nothing give zeros), but no score block ever leaves the chip: one program owns the query
rows of one (query block, batch row, head) — a block taller than the tile budget is split over several
programs — and streams the kept key blocks of its layout row through an online softmax, reading each
block's token mask tile from `layout.mask`. Work is proportional to the kept
blocks, memory to N * D plus the layout itself.

The backward recomputes the probabilities from the saved log-sum-exp (the flash-attention recipe):
a small kernel forms delta = rowsum(dO * O); one kernel on the forward's grid walks the same
kept blocks, keeps dQ in registers and adds each block's dK / dV contribution into fp32 buffers with
atomics. Atomics are what the per-query-block layout makes simplest: no inverted (per key block)
layout has to be built, and dQ and dK / dV share one recomputation of the probabilities. The sink
gradient needs only the log-sum-exp and delta, so it is a torch reduction.

On the CPU the kernels run only under the Triton interpreter (TRITON_INTERPRET=1 set before this
module is imported), which is how the tests check them against the dense reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from .blocks import BlockLayout

MAX_TILE = 128
"""Largest block size and head dim supported (tiles are padded to powers of two >= 16)."""

DTYPES = (torch.float32, torch.bfloat16, torch.float16)

Q_TILE_BYTES = 32 * 1024
KV_TILE_BYTES = 16 * 1024
"""Register/shared-memory budgets of a query tile (BLOCK_M x D) and a key or value tile (BLOCK_N x D):
fp32 with D = 128 runs 64 x 32 tiles, 16-bit inputs 128 x 64; a larger block is covered by several
programs (query side) or several steps (key side)."""


@triton.jit
def _tanh(x):
    """tanh from one exp of a non-positive argument: no overflow, no cancellation for large |x|."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _program(H, q_per_kv, h_per_group, G, NQ, KSLOTS, q_len, BQ: tl.constexpr, BLOCK_M: tl.constexpr):
    """What program (pid0, pid1) owns: batch row, head, KV head, its layout row and its BLOCK_M query rows.

    pid0 enumerates (query block, row chunk): a query block larger than BLOCK_M is split over programs.
    """
    chunks: tl.constexpr = (BQ + BLOCK_M - 1) // BLOCK_M
    qb = tl.program_id(0) // chunks
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    layout_row = ((b * G + h // h_per_group) * NQ + qb) * KSLOTS
    rows = (tl.program_id(0) % chunks) * BLOCK_M + tl.arange(0, BLOCK_M)  # rows inside the query block
    q_idx = qb * BQ + rows
    row_ok = (rows < BQ) & (q_idx < q_len)
    return b, h, h // q_per_kv, bh.to(tl.int64), layout_row, rows, q_idx, row_ok


@triton.jit
def _key_tile(
    K, V, Mask, k_base, v_base, stride_kl, stride_vl, mask_tile, rows, row_ok, kb, sub, kv_len, dims, d_ok,
    BQ: tl.constexpr, BK: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Keys, values and token mask of columns [sub, sub + BLOCK_N) of key block `kb` (zeros outside)."""
    cols = sub + tl.arange(0, BLOCK_N)
    k_idx = kb * BK + cols
    col_ok = (cols < BK) & (k_idx < kv_len)
    kv_ok = col_ok[:, None] & d_ok[None, :]
    k = tl.load(K + k_base + k_idx[:, None] * stride_kl + dims[None, :], mask=kv_ok, other=0.0)
    v = tl.load(V + v_base + k_idx[:, None] * stride_vl + dims[None, :], mask=kv_ok, other=0.0)
    allowed = tl.load(
        Mask + mask_tile * (BQ * BK) + rows[:, None] * BK + cols[None, :],
        mask=row_ok[:, None] & col_ok[None, :],
        other=0,
    )
    return k, v, allowed != 0, k_idx, kv_ok


@triton.jit
def _scores(q, k, scaling, softcap, HAS_SOFTCAP: tl.constexpr):
    """Scaled (and soft-capped) logits; IEEE fp32 dots so fp32 inputs match torch to rounding."""
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * scaling
    if HAS_SOFTCAP:
        s = _tanh(s / softcap) * softcap
    return s


@triton.jit
def _fwd_kernel(
    Q, K, V, Out, Lse, KVB, Mask, Sink,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_ob, stride_oh, stride_ol,
    H, q_per_kv, h_per_group, G, NQ, KSLOTS, q_len, kv_len, scaling, softcap,
    BQ: tl.constexpr, BK: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_SINK: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
):  # fmt: skip
    """Output rows and their log-sum-exp: an online softmax over the kept key blocks of one layout row."""
    b, h, hk, bh, layout_row, rows, q_idx, row_ok = _program(
        H, q_per_kv, h_per_group, G, NQ, KSLOTS, q_len, BQ, BLOCK_M
    )
    dims = tl.arange(0, BLOCK_D)
    d_ok = dims < HEAD_DIM
    q_ok = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + q_idx[:, None] * stride_ql + dims[None, :], mask=q_ok, other=0.0)
    k_base = b * stride_kb + hk * stride_kh
    v_base = b * stride_vb + hk * stride_vh
    if HAS_SINK:  # the sink opens the running softmax: mass exp(sink - m) that carries no value
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.load(Sink + h)
        l_i = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    for slot in range(0, KSLOTS):
        kb = tl.load(KVB + layout_row + slot)
        if kb >= 0:
            for sub in tl.static_range(0, BK, BLOCK_N):
                k, v, allowed, _, _ = _key_tile(
                    K, V, Mask, k_base, v_base, stride_kl, stride_vl, layout_row + slot, rows, row_ok, kb, sub,
                    kv_len, dims, d_ok, BQ, BK, BLOCK_N,
                )  # fmt: skip
                s = tl.where(allowed, _scores(q, k, scaling, softcap, HAS_SOFTCAP), float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen nothing stays at 0
                alpha = tl.exp(m_i - m_safe)
                p = tl.exp(s - m_safe[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
                m_i = m_new

    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    o_ptr = Out + b * stride_ob + h * stride_oh + q_idx[:, None] * stride_ol + dims[None, :]
    tl.store(o_ptr, out.to(Out.dtype.element_ty), mask=q_ok)
    # +inf for a row that saw nothing: the backward's exp(s - lse) is then 0 everywhere
    lse = tl.where(seen, m_i + tl.log(tl.where(seen, l_i, 1.0)), float("inf"))
    tl.store(Lse + bh * q_len + q_idx, lse, mask=row_ok)


@triton.jit
def _delta_kernel(
    Out, DO, Delta,
    stride_ob, stride_oh, stride_ol,
    stride_db, stride_dh, stride_dl,
    H, q_len,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """delta = rowsum(dO * O): the softmax backward's correction term, shared by every key block."""
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    q_idx = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    ok = (q_idx < q_len)[:, None] & (dims < HEAD_DIM)[None, :]
    o = tl.load(Out + b * stride_ob + h * stride_oh + q_idx[:, None] * stride_ol + dims[None, :], mask=ok, other=0.0)
    do = tl.load(DO + b * stride_db + h * stride_dh + q_idx[:, None] * stride_dl + dims[None, :], mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + bh.to(tl.int64) * q_len + q_idx, delta, mask=q_idx < q_len)


@triton.jit
def _bwd_kernel(
    Q, K, V, DO, Lse, Delta, DQ, DK, DV, KVB, Mask,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_db, stride_dh, stride_dl,
    H, Hkv, q_per_kv, h_per_group, G, NQ, KSLOTS, q_len, kv_len, scaling, softcap,
    BQ: tl.constexpr, BK: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):  # fmt: skip
    """dQ of the program's query rows, and their share of dK / dV added atomically into fp32 buffers.

    DQ is laid out like Q; DK / DV are contiguous (B, Hkv, Lkv, D).
    """
    b, h, hk, bh, layout_row, rows, q_idx, row_ok = _program(
        H, q_per_kv, h_per_group, G, NQ, KSLOTS, q_len, BQ, BLOCK_M
    )
    dims = tl.arange(0, BLOCK_D)
    d_ok = dims < HEAD_DIM
    q_ok = row_ok[:, None] & d_ok[None, :]
    q_off = b * stride_qb + h * stride_qh + q_idx[:, None] * stride_ql + dims[None, :]
    q = tl.load(Q + q_off, mask=q_ok, other=0.0)
    do = tl.load(DO + b * stride_db + h * stride_dh + q_idx[:, None] * stride_dl + dims[None, :], mask=q_ok, other=0.0)
    lse = tl.load(Lse + bh * q_len + q_idx, mask=row_ok, other=float("inf"))
    delta = tl.load(Delta + bh * q_len + q_idx, mask=row_ok, other=0.0)
    k_base = b * stride_kb + hk * stride_kh
    v_base = b * stride_vb + hk * stride_vh
    dkv_base = (b * Hkv + hk) * kv_len * HEAD_DIM
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    for slot in range(0, KSLOTS):
        kb = tl.load(KVB + layout_row + slot)
        if kb >= 0:
            for sub in tl.static_range(0, BK, BLOCK_N):
                k, v, allowed, k_idx, kv_ok = _key_tile(
                    K, V, Mask, k_base, v_base, stride_kl, stride_vl, layout_row + slot, rows, row_ok, kb, sub,
                    kv_len, dims, d_ok, BQ, BK, BLOCK_N,
                )  # fmt: skip
                s = _scores(q, k, scaling, softcap, HAS_SOFTCAP)
                p = tl.where(allowed, tl.exp(s - lse[:, None]), 0.0)
                dp = tl.dot(do, tl.trans(v), input_precision="ieee")
                ds = p * (dp - delta[:, None])
                if HAS_SOFTCAP:  # d(c * tanh(x / c)) / dx = 1 - tanh^2 = 1 - (s / c)^2
                    ds = ds * (1.0 - (s / softcap) * (s / softcap))
                dq += tl.dot(ds.to(k.dtype), k, input_precision="ieee")
                dv = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision="ieee")
                dk = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision="ieee") * scaling
                dkv_off = dkv_base + k_idx[:, None] * HEAD_DIM + dims[None, :]
                tl.atomic_add(DV + dkv_off, dv, mask=kv_ok, sem="relaxed")
                tl.atomic_add(DK + dkv_off, dk, mask=kv_ok, sem="relaxed")

    tl.store(DQ + q_off, (dq * scaling).to(DQ.dtype.element_ty), mask=q_ok)


def _tile(n: int, budget: int, row_bytes: int) -> int:
    """A tile side covering n (a power of two, at least 16: the smallest `tl.dot` operand), capped so
    that tile side x row_bytes stays within `budget` bytes; a larger block is then split into tiles."""
    return max(16, min(triton.next_power_of_2(n), budget // row_bytes))


class _Launch:
    """Shapes, tile sizes and launch parameters shared by the forward and backward kernels of one call."""

    def __init__(self, query: torch.Tensor, key: torch.Tensor, layout: BlockLayout, scaling: float, softcap):
        self.b, self.h, self.q_len, self.d = query.shape
        self.hkv, self.kv_len = key.shape[1], key.shape[2]
        self.g, self.nq, self.kslots = layout.groups, layout.num_q_blocks, layout.kv_blocks.shape[-1]
        self.bq, self.bk = layout.block_q, layout.block_k
        self.scaling = float(scaling)
        self.softcap = float(softcap) if softcap is not None else 1.0
        self.has_softcap = softcap is not None
        self.block_d = max(16, triton.next_power_of_2(self.d))
        row_bytes = self.block_d * query.element_size()
        self.block_m = _tile(self.bq, Q_TILE_BYTES, row_bytes)
        self.block_n = _tile(self.bk, KV_TILE_BYTES, row_bytes)
        self.num_warps = 4 if self.block_m * max(self.block_n, self.block_d) <= 64 * 64 else 8

    @property
    def grid(self) -> tuple[int, int]:
        return (self.nq * triton.cdiv(self.bq, self.block_m), self.b * self.h)

    def shape_args(self) -> tuple:
        return (
            self.h // self.hkv,
            self.h // self.g,
            self.g,
            self.nq,
            self.kslots,
            self.q_len,
            self.kv_len,
            self.scaling,
            self.softcap,
        )

    def tile_args(self) -> dict:
        return {
            "BQ": self.bq,
            "BK": self.bk,
            "HEAD_DIM": self.d,
            "BLOCK_M": self.block_m,
            "BLOCK_N": self.block_n,
            "BLOCK_D": self.block_d,
            "HAS_SOFTCAP": self.has_softcap,
            "num_warps": self.num_warps,
        }


def _bhl(x: torch.Tensor) -> tuple[int, int, int]:
    """Batch, head and position strides of a (B, H, L, D) view."""
    return x.stride(0), x.stride(1), x.stride(2)


class _BlockAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, sink_logit, kv_blocks, mask, launch: _Launch):
        out = query.new_empty(launch.b, launch.q_len, launch.h, launch.d)  # (B, Lq, H, D), written per head
        out_bhl = out.transpose(1, 2)
        lse = torch.empty(launch.b, launch.h, launch.q_len, device=query.device, dtype=torch.float32)
        sink = None if sink_logit is None else sink_logit.detach().float().contiguous()
        _fwd_kernel[launch.grid](
            query, key, value, out, lse, kv_blocks, mask, lse if sink is None else sink,
            *_bhl(query), *_bhl(key), *_bhl(value), *_bhl(out_bhl),
            launch.h, *launch.shape_args(),
            HAS_SINK=sink is not None, **launch.tile_args(),
        )  # fmt: skip
        ctx.save_for_backward(query, key, value, sink, out, lse, kv_blocks, mask)
        ctx.launch = launch
        ctx.sink_dtype = None if sink_logit is None else sink_logit.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, sink, out, lse, kv_blocks, mask = ctx.saved_tensors
        launch: _Launch = ctx.launch
        grad_bhl = grad_out.contiguous().transpose(1, 2)
        out_bhl = out.transpose(1, 2)
        delta = torch.empty_like(lse)
        rows = 64
        _delta_kernel[(triton.cdiv(launch.q_len, rows), launch.b * launch.h)](
            out_bhl, grad_bhl, delta, *_bhl(out_bhl), *_bhl(grad_bhl),
            launch.h, launch.q_len, HEAD_DIM=launch.d, BLOCK_M=rows, BLOCK_D=launch.block_d,
        )  # fmt: skip
        dq = torch.empty_like(query)
        dk = torch.zeros(key.shape, device=key.device, dtype=torch.float32)
        dv = torch.zeros(value.shape, device=value.device, dtype=torch.float32)
        _bwd_kernel[launch.grid](
            query, key, value, grad_bhl, lse, delta, dq, dk, dv, kv_blocks, mask,
            *_bhl(query), *_bhl(key), *_bhl(value), *_bhl(grad_bhl),
            launch.h, launch.hkv, *launch.shape_args(), **launch.tile_args(),
        )  # fmt: skip
        dsink = None
        if sink is not None and ctx.needs_input_grad[3]:
            # dL/dsink_h = -sum_rows P(sink) * delta: the sink column's dP is 0 (it carries no value)
            dsink = -(torch.exp(sink.view(1, -1, 1) - lse) * delta).sum(dim=(0, 2)).to(ctx.sink_dtype)
        return dq, dk.to(key.dtype), dv.to(value.dtype), dsink, None, None, None


def triton_block_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: BlockLayout,
    scaling: float,
    *,
    sink_logit: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention of query (B, H, Lq, D) over key/value (B, Hkv, Lkv, D) restricted to `layout`.

    Returns (B, Lq, H, D). Differentiable w.r.t. query, key, value and sink_logit. Head h reads KV head
    h // (H / Hkv) and layout group h // (H / G), as in `block_attention`.
    """
    _check(query, key, value, layout, sink_logit)
    query, key, value = (x if x.stride(-1) == 1 else x.contiguous() for x in (query, key, value))
    kv_blocks = layout.kv_blocks.to(device=query.device, dtype=torch.int32).contiguous()
    mask = layout.mask.to(query.device).contiguous().view(torch.uint8)
    launch = _Launch(query, key, layout, scaling, softcap)
    return _BlockAttention.apply(query, key, value, sink_logit, kv_blocks, mask, launch)


def _check(query, key, value, layout: BlockLayout, sink_logit) -> None:
    if query.device.type != "cuda" and not isinstance(_fwd_kernel, InterpretedFunction):
        raise RuntimeError(
            f"the Triton block-attention kernel needs CUDA tensors, got {query.device.type}; on the CPU it runs "
            "only under the Triton interpreter (TRITON_INTERPRET=1 set before lcplug imports it) — use the "
            "'torch' executor instead"
        )
    if query.dtype not in DTYPES or key.dtype != query.dtype or value.dtype != query.dtype:
        raise TypeError(f"query/key/value must share one of {DTYPES}; got {query.dtype}, {key.dtype}, {value.dtype}")
    b, h, lq, d = query.shape
    hkv, g = key.shape[1], layout.groups
    if h % hkv or h % g:
        raise ValueError(f"{h} query heads must be a multiple of {hkv} KV heads and of {g} layout groups")
    if layout.kv_blocks.shape[0] != b or (layout.q_len, layout.kv_len) != (lq, key.shape[2]):
        raise ValueError("layout was built for another batch size or sequence length")
    if max(d, layout.block_q, layout.block_k) > MAX_TILE:
        raise ValueError(f"head dim and block sizes must be <= {MAX_TILE}; got {d}, {layout.block_q}, {layout.block_k}")
    if sink_logit is not None and sink_logit.numel() != h:
        raise ValueError(f"sink_logit needs one logit per query head ({h}); got {sink_logit.numel()}")
