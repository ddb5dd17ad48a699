"""What the comparison measures on a retrofitted model: retrieval, perplexity and the KV cache it holds.

Retrieval and perplexity are lcplug.eval's own probes. KV size is measured, not computed: the bytes
lcplug's device KV tier holds after a prefill, which keeps only what each layer's pattern can still read
(a window's blocks, compressed entries, the latent, one copy of shared K/V), divided by the tokens.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lcplug.eval import Haystack, PasskeyProbe, PerplexityProbe, evaluate, metrics
from lcplug.eval.tokens import Tokenizer
from lcplug.kv import TieredCache

DEPTHS = (0.0, 0.5, 1.0)
"""Start, middle, end: at 1024 tokens only the end is inside a 128-token window."""


def probes(lengths: Sequence[int], samples: int, ppl_length: int) -> list[Any]:
    """Passkey over depths x lengths (depth 0 of the longest is far beyond every window) and perplexity."""
    return [
        PasskeyProbe(lengths=list(lengths), depths=list(DEPTHS), samples=samples),
        PerplexityProbe(lengths=[ppl_length], samples=samples),
    ]


def retrieval(
    model: nn.Module, tokenizer: Tokenizer, probe_list: list[Any], haystack: Haystack, label: str
) -> dict[str, Any]:
    """Passkey accuracy per length and perplexity at the probe's length: lcplug.eval's flat metrics."""
    flat = metrics(evaluate(model, probe_list, tokenizer=tokenizer, haystack=haystack, label=label), prefix="")
    lengths = probe_list[0].lengths
    return {
        "passkey": {str(n): flat[f"passkey/accuracy@{n}"] for n in lengths},
        "passkey_digits": flat["passkey/digit_accuracy"],
        "ppl": flat[f"ppl@{probe_list[1].lengths[0]}"],
    }


def kv_bytes_per_token(model: nn.Module, tokenizer: Tokenizer, haystack: Haystack, length: int) -> float:
    """Bytes the device KV tier holds per token after a `length`-token prefill of haystack text."""
    ids = torch.tensor([haystack.window(tokenizer, length, random.Random(0))])
    with TieredCache(model, tier="device") as cache, torch.no_grad():
        model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        held = cache.stats()["resident_bytes"]
    return held / ids.shape[1]
