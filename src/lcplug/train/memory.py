"""Per-device memory of a training stage, estimated from the model's dimensions before any weight exists.

The point is a pre-flight answer ("does stage 2 fit on an 80 GiB GPU at 128K with 8-way context
parallelism?"), so every term is a formula over counts the plan reads off a meta-device model:

- states: frozen weights in the dtype they load in; trainable weights, their gradients and AdamW's two
  moments in the master dtype (fp32 under bf16/fp16 mixed precision: Accelerate's FSDP2 upcasts
  trainable parameters to fp32 and casts to bf16 for compute); all divided by the FSDP shard degree.
  FSDP shards over every rank, context-parallel ranks included (the `dp_shard x cp` mesh of torchtitan
  and Accelerate), so the shard degree is the world size.
- gathered: the bf16 copies FSDP all-gathers while computing: the parameters outside the decoder layers
  (embeddings, LM head, final norm, kept gathered across the step) plus two decoder layers (the one
  running and the one prefetched).
- activations: what autograd keeps per token of this rank's share of the sequence (seq_len x batch / cp),
  counted tensor by tensor as transformers' decoder layers save them (the tests check the count against
  autograd's saved tensors on tiny Llama and Qwen3 models): every layer's without gradient
  checkpointing; with it, each layer's input plus one layer being recomputed. Nothing but the layers'
  inputs is kept when no trainable parameter sits behind their outputs (DSA's indexer reads detached
  states, so its warm-up backpropagates through none of the model).
- attention: what the attention module the patch installed keeps beyond dense attention's q, k, v,
  output and log-sum-exp: the block layout of a static sparse pattern (built once per forward pass,
  shared by the layers that run it), the second branch and the mix of gated layers, the indexer's
  activations while it trains, and one chunk of scores for the block executors and the indexer.
- logits: seq x vocab in bf16, the fp32 log-probabilities cross-entropy saves and their fp32 gradient
  (transformers upcasts logits to fp32 for the loss), the largest single tensor of long-context training.

Dense decoder models only: mixture-of-experts layers are counted as if every expert ran.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..attention import SUBMODULE, GatedAttention, NativeAttention, Pattern, PatternAttention
from ..attention.block_torch import CHUNK_ELEMENTS
from ..attention.indexer import LightningIndexer
from ..patching import choose_adapter, patch_state

GIB = 1 << 30
DEVICE_GIB = 80.0
"""Memory of the device the plan checks against (an 80 GiB H100/A100)."""

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
LSE_BYTES = 4
"""fp32 log-sum-exp per query and head, what flash-style kernels keep for the backward pass."""
LOGIT_BYTES = 2 + 4 + 4
"""Per logit of a trained LM loss: bf16 logits, fp32 log-probabilities saved by cross-entropy, fp32 gradient."""
CHUNK_BYTES = CHUNK_ELEMENTS * 4
"""fp32 scores of one chunk of query blocks, the scratch of the block executors and DSA's indexer."""


@dataclass(frozen=True)
class Precision:
    """Bytes per element: frozen weights as loaded, trainable (master) weights and their states, compute."""

    frozen: int
    master: int
    compute: int

    @classmethod
    def of(cls, dtype: str, precision: str) -> Precision:
        """`dtype` is base.dtype (what weights load as), `precision` the recipe's (fp32 | bf16 | fp16)."""
        loaded = DTYPE_BYTES[dtype]
        mixed = precision in ("bf16", "fp16")
        return cls(frozen=loaded, master=4 if mixed else loaded, compute=2 if mixed else loaded)


@dataclass(frozen=True)
class Dims:
    """What the activation formulas need from a decoder: its config's widths, and whether attention
    normalises q and k per head (Qwen3, OLMo2, Gemma3 keep two more RMSNorms per layer)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    qk_norm: bool = False

    @classmethod
    def of(cls, model: nn.Module) -> Dims:
        config = model.config.get_text_config()
        heads = config.num_attention_heads
        return cls(
            layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            vocab=config.vocab_size,
            qk_norm=any(hasattr(m, "q_norm") and hasattr(m, "k_norm") for m in model.modules()),
        )

    def layer_bytes(self, compute: int) -> int:
        """Bytes per token one decoder layer keeps for backward, activations in `compute` bytes.

        As transformers' pre-norm layers save them (tests check the count against autograd's saved
        tensors): each RMSNorm its fp32 upcast input, its normalised value and its output (the next
        projection's input) plus an fp32 rsqrt; attention q, k, v, its output and an fp32 log-sum-exp per
        head; the gated MLP gate, activation, up and their product; per-head q/k norms their fp32 upcast
        input, normalised value and rsqrt.
        """
        h, i = self.hidden, self.intermediate
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        norms = 2 * (4 * h + 2 * compute * h + 4)
        attention = compute * (2 * q + 2 * kv) + LSE_BYTES * self.heads
        mlp = 4 * compute * i
        per_head_norms = (4 + compute) * (q + kv) + 4 * (self.heads + self.kv_heads) if self.qk_norm else 0
        return norms + attention + mlp + per_head_norms


@dataclass(frozen=True)
class AttentionCost:
    """One layer's attention in a stage: how far its queries read, and what it keeps per token."""

    label: str
    keys: int  # keys the last query block of a row reads: the span that sets its compute
    saved: float  # bytes per token kept for backward beyond the dense attention `Dims.layer_bytes` counts
    layout: tuple | None = None  # identity of a static layout shared by all layers running the pattern
    layout_bytes: float = 0.0  # bytes per token of that layout
    chunked: bool = False  # runs a block executor or an indexer (one CHUNK_BYTES scratch)


def pattern_keys(pattern: Pattern, seq_len: int) -> int:
    """Keys the last query block of a `seq_len` row may read under `pattern` (the largest head group)."""
    q_lo = torch.tensor([max(0, seq_len - pattern.block_size)], device="cpu")
    q_hi = torch.tensor([seq_len - 1], device="cpu")
    best = 0
    for group in range(pattern.head_groups):
        spans = sorted((max(0, int(lo)), min(seq_len, int(hi))) for lo, hi in pattern.key_intervals(q_lo, q_hi, group))
        covered, end = 0, 0
        for lo, hi in spans:
            lo = max(lo, end)
            if hi > lo:
                covered, end = covered + hi - lo, hi
        best = max(best, covered)
    return best


def attention_costs(
    layers: list[nn.Module | None], dims: Dims, seq_len: int, compute: int, trainable: set[int]
) -> list[AttentionCost]:
    """The cost of each layer's installed `lcplug_attention` module (None: the model's own attention)."""
    return [_cost(layer, dims, seq_len, compute, trainable) for layer in layers]


def installed_attention(model: nn.Module) -> list[nn.Module | None]:
    """Each attention module's `lcplug_attention` submodule, in layer order (None where unpatched)."""
    state = patch_state(model)
    adapter = state.adapter if state is not None else choose_adapter(model)
    return [module._modules.get(SUBMODULE) for _, module in sorted(adapter.attention_modules(model).items())]


def _cost(layer: nn.Module | None, dims: Dims, seq_len: int, compute: int, trainable: set[int]) -> AttentionCost:
    """What `layer` keeps beyond the dense attention `Dims.layer_bytes` counts (q, k, v, output, lse)."""
    if layer is None or isinstance(layer, NativeAttention):
        return AttentionCost("full", seq_len, 0)
    if isinstance(layer, PatternAttention):
        pattern = layer.pattern
        keys = pattern_keys(pattern, seq_len)
        blocks = -(-keys // pattern.block_size)
        mask_bytes = blocks * pattern.block_size + 8 * blocks / pattern.block_size  # token mask + block ids
        return AttentionCost(pattern.describe(), keys, 0, pattern.key(), mask_bytes, chunked=True)
    if isinstance(layer, GatedAttention):
        sparse = _cost(layer.sparse, dims, seq_len, compute, trainable)
        # the sparse branch's output and log-sum-exp, and the mix (the output projection's input)
        extra = 2 * dims.heads * dims.head_dim * compute + LSE_BYTES * dims.heads
        label = f"gated full | {sparse.label}"
        return AttentionCost(label, seq_len, sparse.saved + extra, sparse.layout, sparse.layout_bytes, True)
    indexer = getattr(layer, "indexer", None)
    if isinstance(indexer, LightningIndexer):
        return _indexed_cost(layer, indexer, dims, seq_len, compute, trainable)
    return AttentionCost(f"{type(layer).__name__} (counted as full)", seq_len, 0)


def _indexed_cost(
    layer: nn.Module, indexer: LightningIndexer, dims: Dims, seq_len: int, compute: int, trainable: set[int]
) -> AttentionCost:
    """DSA-style layers: dense attention in warm-up, `topk` keys when sparse. While the indexer trains it
    keeps its inputs (the attention's q and k, heads concatenated), q^I, k^I (and its LayerNorm's input)
    and the head weights; its scores and the selection are recomputed chunk by chunk."""
    sparse = getattr(layer, "stage", None) == "sparse"
    keys = min(int(layer.topk), seq_len) if sparse else seq_len
    saved = 0
    if any(id(p) in trainable for p in indexer.parameters()):
        widths = dims.heads * dims.head_dim + dims.kv_heads * dims.head_dim
        widths += indexer.heads * indexer.dim + 2 * indexer.dim + indexer.heads
        saved = widths * compute
    label = f"indexer top-{keys}" if sparse else "full + indexer"
    return AttentionCost(label, keys, saved, chunked=True)


@dataclass(frozen=True)
class MemoryEstimate:
    """GiB per device, by term (see the module docstring for each formula)."""

    weights: float
    grads: float
    optimizer: float
    gathered: float
    activations: float
    attention: float
    logits: float

    @property
    def total(self) -> float:
        return sum(asdict(self).values())

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "total": self.total}


@dataclass(frozen=True)
class Workload:
    """What one optimizer micro-step holds on one rank."""

    tokens: int  # this rank's tokens per micro-batch: seq_len x batch / cp
    checkpointing: bool
    backprop: bool  # whether autograd keeps the layers' activations (something trainable sits behind them)
    lm_loss: bool  # whether the LM loss is trained (else logits are a forward-only bf16 tensor)


def estimate(
    dims: Dims,
    *,
    frozen: int,
    trainable: int,
    outside_layers: int,
    precision: Precision,
    shard: int,
    work: Workload,
    costs: list[AttentionCost],
) -> MemoryEstimate:
    """Per-device memory of one stage; `frozen` + `trainable` are all parameters (LoRA adapters included),
    `outside_layers` those not in a decoder layer (embeddings, LM head, final norm)."""
    per_layer = (frozen + trainable - outside_layers) / dims.layers
    gathered = (outside_layers + 2 * per_layer) * precision.compute if shard > 1 else 0.0
    base = dims.layer_bytes(precision.compute) if work.backprop else 0
    saved = [c.saved for c in costs]
    if work.checkpointing:
        activations = work.tokens * (dims.layers * dims.hidden * precision.compute + base)
        attention = work.tokens * max(saved, default=0)
    else:
        activations = work.tokens * dims.layers * base
        attention = work.tokens * sum(saved)
    layouts = {c.layout: c.layout_bytes for c in costs if c.layout is not None}
    attention += work.tokens * sum(layouts.values()) + (CHUNK_BYTES if any(c.chunked for c in costs) else 0)
    logits = work.tokens * dims.vocab * (LOGIT_BYTES if work.lm_loss else precision.compute)
    return MemoryEstimate(
        weights=(frozen * precision.frozen + trainable * precision.master) / shard / GIB,
        grads=trainable * precision.master / shard / GIB,
        optimizer=2 * trainable * precision.master / shard / GIB,
        gathered=gathered / GIB,
        activations=activations / GIB,
        attention=attention / GIB,
        logits=logits / GIB,
    )
