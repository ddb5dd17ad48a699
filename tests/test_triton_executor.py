"""The Triton executor against the dense reference, run by the Triton interpreter on the CPU.

TRITON_INTERPRET must be set before the kernels are defined, so the checks run in child processes
(this file run as a script): the pytest process never imports triton, and no other test sees the
interpreter. One child computes every case's errors (one start-up for all); the tests read them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from importlib.util import find_spec

import pytest
import torch

from lcplug.attention.executors import choose

TOL = 1e-5
"""fp32 output and gradient tolerance (absolute): the kernel's dots are IEEE fp32, so only summation order differs."""

CASES: dict[str, dict] = {
    "gqa_left_padded": {"batch": 2, "pad": 7},
    "sink_softcap_odd_head_dim": {"head_dim": 24, "sink": True, "softcap": 5.0},
    "decode": {"batch": 2, "pad": 7, "q_len": 1, "sink": True},
    "chunked_prefill": {"q_len": 20, "block_q": 32, "softcap": 3.0},
    "head_groups": {"pad": 7, "kv_heads": 1, "groups": 2, "sink": True},
    # 128-token blocks of fp32 with head dim 128 run as 64 x 32 tiles: query chunks and key sub-steps
    "largest_tiles": {"heads": 1, "kv_heads": 1, "kv_len": 136, "head_dim": 128, "block_q": 128, "block_k": 128},
    # bf16 only on a GPU: the interpreter's tl.dot multiplies bf16 bit patterns (stored as uint16) as integers
    "fp16": {"dtype": "float16", "sink": True, "softcap": 5.0},
}
"""Small shapes (the interpreter runs every program in Python): kv_len 40, 4 heads over 2 KV heads,
16-token blocks, a 20-token window plus 3 sink tokens, unless a case says otherwise."""

needs_triton = pytest.mark.skipif(find_spec("triton") is None, reason="triton is not installed")


@pytest.fixture(scope="module")
def children() -> dict[str, tuple[int, str, str]]:
    """(returncode, stdout, stderr) of this file run as `cases` (interpreted) and `guard` (not), run side
    by side: each pays the torch/transformers/triton start-up, so overlapping them halves the wait."""
    base = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = {
        mode: subprocess.Popen(
            [sys.executable, __file__, mode], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for mode, env in (("cases", {**base, "TRITON_INTERPRET": "1"}), ("guard", base))
    }
    results = {}
    for mode, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        results[mode] = (proc.returncode, out, err)
    return results


@pytest.fixture(scope="module")
def case_errors(children) -> dict:
    code, out, err = children["cases"]
    assert code == 0, err[-4000:]
    return json.loads(out.splitlines()[-1])


@needs_triton
@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_reference(case_errors, case):
    """Output and dq/dk/dv/dsink of the kernel equal the dense reference on the layout's own mask."""
    errors = case_errors[case]
    assert "error" not in errors, errors.get("error")
    if case == "fp16":  # rounding differs from the torch executor's, but must be no larger than it
        for name, err in errors["triton"].items():
            assert err <= 2 * errors["torch"][name] + 1e-3, (name, errors)
    else:
        assert max(errors.values()) < TOL, errors


@needs_triton
def test_cpu_tensors_need_the_interpreter(children):
    code, out, err = children["guard"]
    assert code == 0, err[-4000:]
    assert "TRITON_INTERPRET=1" in out


def test_choose_falls_back_to_torch_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.warns(UserWarning, match="cannot run on cpu"):
        assert choose("triton", torch.device("cpu")) == "torch"


def _inputs(
    *,
    batch: int = 1,
    heads: int = 4,
    kv_heads: int = 2,
    kv_len: int = 40,
    q_len: int | None = None,
    head_dim: int = 16,
    block_q: int = 16,
    block_k: int = 16,
    groups: int = 1,
    pad: int = 0,
    sink: bool = False,
    softcap: float | None = None,
    dtype: str = "float32",
):
    """Random q/k/v (and sink logits), a sliding-window layout and the attention kwargs for one case.

    Queries are the last `q_len` slots (q_offset = kv_len - q_len: decode and chunked prefill); row 0 is
    left-padded by `pad` tokens. With groups=2 the layout stacks two different windows along the group
    dim, padding the shorter block lists with -1 / False.
    """
    from transformers.masking_utils import causal_mask_function

    from lcplug.attention.blocks import BlockLayout, static_layout
    from lcplug.attention.mask import LazyMask
    from lcplug.attention.pattern import SlidingWindowPattern

    q_len = kv_len if q_len is None else q_len
    padding = torch.ones(batch, kv_len, dtype=torch.bool)
    padding[0, :pad] = False
    mask = LazyMask(
        batch_size=batch,
        q_length=q_len,
        kv_length=kv_len,
        q_offset=kv_len - q_len,
        kv_offset=0,
        mask_function=causal_mask_function,
        attention_mask=padding,
        device=torch.device("cpu"),
    )
    windows = [(20, 3), (8, 0)][:groups]
    layouts = [
        static_layout(SlidingWindowPattern(w, s, block_k), mask, None, block_q=block_q, block_k=block_k)
        for w, s in windows
    ]
    k_max = max(lay.kv_blocks.shape[-1] for lay in layouts)

    def widen(x: torch.Tensor, dim: int, fill) -> torch.Tensor:
        extra = list(x.shape)
        extra[dim] = k_max - x.shape[dim]
        return torch.cat([x, torch.full(extra, fill, dtype=x.dtype)], dim=dim)

    first = layouts[0]
    layout = BlockLayout(
        first.block_q,
        first.block_k,
        q_len,
        kv_len,
        torch.cat([widen(lay.kv_blocks, 3, -1) for lay in layouts], dim=1),
        torch.cat([widen(lay.mask, 3, False) for lay in layouts], dim=1),
    )
    gen = torch.Generator().manual_seed(0)
    dt = getattr(torch, dtype)
    tensors = [
        torch.randn(batch, heads, q_len, head_dim, generator=gen).to(dt),
        torch.randn(batch, kv_heads, kv_len, head_dim, generator=gen).to(dt),
        torch.randn(batch, kv_heads, kv_len, head_dim, generator=gen).to(dt),
    ]
    if sink:
        tensors.append(torch.randn(heads, generator=gen))
    kwargs = {"scaling": head_dim**-0.5, "softcap": softcap}
    return tensors, layout, kwargs


def _run(executor, tensors, layout, kwargs) -> list[torch.Tensor]:
    """Output and gradients of every input under a fixed random output gradient."""
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    sink = leaves[3] if len(leaves) > 3 else None
    out = executor(*leaves[:3], layout, kwargs["scaling"], sink_logit=sink, softcap=kwargs["softcap"])
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    return [out, *torch.autograd.grad(out, leaves, grad)]


def _reference(layout):
    """The dense reference on the layout's own token mask, expanded to one mask per query head."""
    from lcplug.attention.reference import reference_attention

    dense = layout.to_dense()

    def executor(query, key, value, _layout, scaling, *, sink_logit, softcap):
        heads = query.shape[1]
        allowed = dense[:, torch.arange(heads) // (heads // dense.shape[1])]
        return reference_attention(query, key, value, allowed, scaling, sink_logit=sink_logit, softcap=softcap)[0]

    return executor


def _errors(got: list[torch.Tensor], want: list[torch.Tensor]) -> dict[str, float]:
    names = ["out", "dq", "dk", "dv", "dsink"]
    return {n: (g.float() - w.float()).abs().max().item() for n, g, w in zip(names, got, want)}


def _case_errors(spec: dict) -> dict:
    from lcplug.attention.block_torch import block_attention
    from lcplug.attention.block_triton import triton_block_attention

    tensors, layout, kwargs = _inputs(**spec)
    got = _run(triton_block_attention, tensors, layout, kwargs)
    if tensors[0].dtype == torch.float32:
        return _errors(got, _run(_reference(layout), tensors, layout, kwargs))
    # low precision: both fast executors against the fp32 reference on the same (rounded) inputs
    want = _run(_reference(layout), [t.float() for t in tensors], layout, kwargs)
    return {
        "triton": _errors(got, want),
        "torch": _errors(_run(block_attention, tensors, layout, kwargs), want),
    }


def _main(mode: str) -> None:
    if mode == "cases":
        results = {}
        for name, spec in CASES.items():
            try:
                results[name] = _case_errors(spec)
            except Exception:
                results[name] = {"error": traceback.format_exc()}
        print(json.dumps(results))
    elif mode == "guard":
        from lcplug.attention.block_triton import triton_block_attention

        tensors, layout, kwargs = _inputs()
        try:
            triton_block_attention(*tensors, layout, kwargs["scaling"])
        except RuntimeError as err:
            print(err)


if __name__ == "__main__":
    _main(sys.argv[1])
