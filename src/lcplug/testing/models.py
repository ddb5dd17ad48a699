"""Tiny random models of every supported family, built from configs (no download).

Plugin authors use these through the pytest plugin's fixtures; lcplug's own tests use them too. Each
model is fp32, seeded, a few layers deep, with GQA where the family has it, and small enough that a
forward pass takes milliseconds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

COMMON: dict[str, Any] = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}

FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "gemma2": {"head_dim": 16, "sliding_window": 8, "query_pre_attn_scalar": 16},
    "gemma3_text": {
        "head_dim": 16,
        "sliding_window": 8,
        "query_pre_attn_scalar": 16,
        "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
    },
    "phi3": {"partial_rotary_factor": 0.5},
    "gpt_neox": {"num_key_value_heads": None, "rotary_pct": 0.5, "use_parallel_residual": True},
    "olmo2": {},
    "qwen2_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 32,
        "decoder_sparse_step": 1,
    },
}
"""model_type -> overrides of COMMON. Gemma keeps its own sliding layers, so parity covers masks it builds."""

NATIVE_ATTENTION = {"gemma2": "eager"}
"""Families whose own attention needs a backend other than sdpa (Gemma-2's logit soft-capping)."""


def tiny_config(family: str, **overrides: Any):
    """A transformers config for a tiny model of `family` (a model_type)."""
    from transformers import AutoConfig

    if family not in FAMILIES:
        raise KeyError(f"unknown family {family!r}; valid: {', '.join(FAMILIES)}")
    kwargs = {**COMMON, **FAMILIES[family], **overrides}
    kwargs = {k: v for k, v in kwargs.items() if v is not None or k == "sliding_window"}
    return AutoConfig.for_model(family, **kwargs)


def tiny_model(family: str = "llama", seed: int = 0, attn_implementation: str | None = None, **overrides: Any):
    """A seeded, fp32, eval-mode tiny causal LM of `family` (sdpa unless the family needs another backend)."""
    from transformers import AutoModelForCausalLM

    attn_implementation = attn_implementation or NATIVE_ATTENTION.get(family, "sdpa")
    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    return model.eval()


def padded_batch(
    length: int, seed: int, *, vocab: int = 128, pad: int = 5, pad_row: int = 0, pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of `length` seeded token ids (>= 3, so no special tokens) and their attention mask; row
    `pad_row` is left-padded by `pad` tokens of `pad_id`, so every check also covers left padding."""
    ids = torch.randint(3, vocab, (2, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[pad_row, :pad] = 0
    ids[pad_row, :pad] = pad_id
    return ids, mask


def logits(model: Any, ids: torch.Tensor, mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
    """The model's logits without autograd (the comparison every parity check makes)."""
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kwargs).logits


def decode_prefill_gap(
    model: Any, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int = 6, *, generate_positions: bool = False
) -> float:
    """Max |logit| gap between greedy `generate` (one token at a time through the cache) and one prefill
    forward of the generated sequence: a patched model must compute the same function both ways.

    `generate_positions` passes the prefill the position ids `generate` uses (counted from each row's first
    real token), for plugins that see absolute positions.
    """
    with torch.no_grad():
        gen = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        full_mask = torch.cat([mask, torch.ones(mask.shape[0], new_tokens, dtype=mask.dtype)], dim=1)
        kwargs = {}
        if generate_positions:
            kwargs["position_ids"] = (full_mask.cumsum(-1) - 1).masked_fill(full_mask == 0, 1)
        prefill = logits(model, gen.sequences, full_mask, **kwargs)
    steps = torch.stack(gen.logits, dim=1)
    return float((steps - prefill[:, ids.shape[1] - 1 : -1]).abs().max())


def descend(
    loss_of: Callable[[], torch.Tensor], params: Iterable[torch.nn.Parameter], steps: int, lr: float
) -> list[float]:
    """`steps` Adam steps on `loss_of()` (which runs the forward and returns the loss); the losses seen.

    What a plugin's training test needs to show its parameters and losses are wired: the loss goes down.
    """
    opt = torch.optim.Adam(list(params), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_of()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def perturb_added(model: torch.nn.Module, scale: float, seed: int = 1) -> torch.nn.Module:
    """Add seeded noise of std `scale` to every parameter an attention plugin added (pooling, sinks, gates) but
    the indexers, which keep their random init; returns the model.

    Those parameters start neutral (patching alone changes nothing), so a parity or cache test on a freshly
    patched model would not see them used; moved off zero, a wrong path shows up in the logits.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lcplug_attention." in name and "indexer" not in name:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return model
