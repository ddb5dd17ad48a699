"""LoZA (per-layer gate, streaming sparse blocks) and DuoAttention (per-KV-head gate, sinks + recent).

Both run on `GatedAttention`. The sparse layers are checked against independent references: the
reference executor, and the *unpatched* model fed a hand-built 4D additive mask (per head for Duo's
split), so transformers' own attention computes the answer. fp32; small blocks so 40 tokens are sparse.
"""

from __future__ import annotations

import pytest
import torch

import lcplug
from lcplug.attention import NativeAttention, PatternAttention
from lcplug.attention.gated import GatedAttention, gated_layers
from lcplug.errors import ParamError, UnsupportedModelError
from lcplug.plugins.attention import duo, loza
from lcplug.testing import decode_prefill_gap, logits, padded_batch, tiny_model

FAMILIES = ["llama", "qwen3", "gemma3_text", "phi3"]
TOL = 1e-5
LOZA = {"name": "loza", "block": 4, "sink_blocks": 1, "local_blocks": 2}
HEADS = {"0": [1, 0], "1": [0, 0], "2": [0, 1]}  # a split layer, an all-streaming layer, the other split
DUO = {"name": "duo", "mode": "final", "sink": 4, "recent": 8, "block_size": 4, "heads": HEADS}


@pytest.fixture
def long_batch():
    """Two rows of 40 tokens; row 0 is left-padded by 5."""
    return padded_batch(40, seed=2)


def max_diff(a, b, mask):
    return (a - b)[mask.bool()].abs().max().item()


def modules(model) -> dict[int, torch.nn.Module]:
    return {i: m.lcplug_attention for i, m in lcplug.patch_state(model).adapter.attention_modules(model).items()}


# ---- (a) the SSA pattern --------------------------------------------------------------------------------


@pytest.mark.parametrize(("block", "sinks", "local"), [(4, 1, 2), (8, 0, 3), (16, 2, 1), (128, 1, 7)])
def test_streaming_pattern_intervals_cover_allows(block, sinks, local):
    pattern = loza.StreamingBlocksPattern(sinks, local, block)
    g = torch.Generator().manual_seed(block + sinks + local)
    for _ in range(30):
        q_lo = int(torch.randint(0, 40 * block, (), generator=g))
        q_hi = q_lo + int(torch.randint(0, 2 * block, (), generator=g))
        keys = torch.arange(0, q_hi + 3 * block)
        queries = torch.arange(q_lo, q_hi + 1)
        allowed = pattern.allows(queries[:, None], keys[None, :])
        covered = torch.zeros_like(allowed[0])
        for lo, hi in pattern.key_intervals(torch.tensor([q_lo]), torch.tensor([q_hi])):
            covered |= (keys >= lo) & (keys < hi)
        assert not (allowed & ~covered).any(), (q_lo, q_hi)


def test_streaming_pattern_keeps_1024_keys_at_block_128():
    """METHODS.md: 1 sink block + 7 local blocks of 128 => 1024 keys for a query at the end of a block."""
    pattern = loza.StreamingBlocksPattern()
    q = torch.tensor([128 * 20 - 1])
    keys = torch.arange(128 * 20)
    assert int(pattern.allows(q[:, None], keys[None, :]).sum()) == 1024
    assert bool(pattern.allows(torch.tensor(300), torch.tensor(100)))  # inside the 7-block local reach
    assert not bool(pattern.allows(torch.tensor(2000), torch.tensor(500)))


# ---- (b) sparse layers equal independent references ----------------------------------------------------


def loza_allowed(mask, block, sinks, local):
    """(B, L, L) boolean: causal & SSA on row positions (counted from each row's first real token) & padding."""
    length = mask.shape[1]
    pos = torch.arange(length)[None] - (mask == 0).sum(-1)[:, None]
    qb, kb = (pos[:, :, None] // block), (pos[:, None, :] // block)
    idx = torch.arange(length)
    causal = idx[:, None] >= idx[None, :]
    return causal & ((kb < sinks) | ((qb - kb >= 0) & (qb - kb < local))) & mask.bool()[:, None, :]


def streaming_allowed(mask, recent, sink):
    length = mask.shape[1]
    pos = torch.arange(length)[None] - (mask == 0).sum(-1)[:, None]
    idx = torch.arange(length)
    causal = idx[:, None] >= idx[None, :]
    window = ((pos[:, :, None] - pos[:, None, :]) < recent) | (pos[:, None, :] < sink)
    return causal & window & mask.bool()[:, None, :]


def additive(allowed):
    add = torch.zeros(allowed.shape, dtype=torch.float32)
    return add.masked_fill_(~allowed, torch.finfo(torch.float32).min)


def per_layer_type(model, allowed):
    """A 4D mask, or Gemma-3's dict per layer type (its sliding layers keep their own window)."""
    config = model.config
    if "sliding_attention" not in (getattr(config, "layer_types", None) or []):
        return additive(allowed)
    idx = torch.arange(allowed.shape[-1])
    own = (idx[:, None] - idx[None, :]) < config.sliding_window
    return {"full_attention": additive(allowed), "sliding_attention": additive(allowed & own)}


@pytest.mark.parametrize("family", FAMILIES)
def test_loza_sparse_matches_hand_built_mask_and_reference_executor(family, long_batch):
    ids, mask = long_batch
    model = tiny_model(family)
    dense = logits(model, ids, mask)
    allowed = loza_allowed(mask, block=4, sinks=1, local=2)[:, None]
    reference = logits(model, ids, per_layer_type(model, allowed))
    lcplug.patch(model, attention={**LOZA, "executor": "torch"})
    out = logits(model, ids, mask)
    assert max_diff(out, reference, mask) < TOL
    assert max_diff(out, dense, mask) > 1e-4, "the pattern must change something at length 40"
    oracle = logits(lcplug.patch(tiny_model(family), attention={**LOZA, "executor": "reference"}), ids, mask)
    assert max_diff(out, oracle, mask) < TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_duo_final_matches_reference_executor(family, long_batch):
    ids, mask = long_batch
    model = lcplug.patch(tiny_model(family), attention={**DUO, "executor": "torch"})
    oracle = lcplug.patch(tiny_model(family), attention={**DUO, "executor": "reference"})
    out = logits(model, ids, mask)
    assert max_diff(out, logits(oracle, ids, mask), mask) < TOL
    assert max_diff(out, logits(tiny_model(family), ids, mask), mask) > 1e-4


def test_duo_final_matches_per_head_hand_built_mask(long_batch):
    """Each query head sees full causal attention if its KV head is a retrieval head, else sinks + recent."""
    ids, mask = long_batch
    model = tiny_model("llama")
    full = streaming_allowed(mask, recent=10**6, sink=0)
    stream = streaming_allowed(mask, recent=8, sink=4)
    per_layer = []
    for layer in range(3):
        kv = torch.tensor(HEADS[str(layer)], dtype=torch.bool).repeat_interleave(2)  # 4 query heads, 2 KV heads
        per_layer.append(additive(torch.where(kv[None, :, None, None], full[:, None], stream[:, None])))
    # a different 4D mask per layer: run each decoder layer with its own mask through a forward hook
    hooks = [
        layer.register_forward_pre_hook(
            lambda _m, args, kwargs, m=m: (args, {**kwargs, "attention_mask": m}), with_kwargs=True
        )
        for layer, m in zip(model.model.layers, per_layer)
    ]
    reference = logits(model, ids, mask)
    for h in hooks:
        h.remove()
    lcplug.patch(model, attention=DUO)
    assert max_diff(logits(model, ids, mask), reference, mask) < TOL


# ---- (c) calibration starts at the unpatched model; only the gates learn --------------------------------


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_calibrate_starts_exactly_unpatched_and_trains_only_gates(family, long_batch):
    ids, mask = long_batch
    model = tiny_model(family)
    ref = logits(model, ids, mask)
    lcplug.patch(model, attention={**LOZA, "mode": "calibrate"})
    assert torch.equal(logits(model, ids, mask), ref)
    gates = loza.calibration_parameters(model, freeze_rest=True)
    assert [tuple(g.shape) for g in gates] == [(1,)] * 3
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        f"model.layers.{i}.self_attn.lcplug_attention.gate" for i in range(3)
    ]
    model(ids, attention_mask=mask, labels=ids).loss.backward()
    assert all(g.grad is not None and g.grad.abs().item() > 0 for g in gates)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_duo_gates_per_kv_head_start_unpatched_and_l1(long_batch):
    ids, mask = long_batch
    model = tiny_model("qwen3")
    ref = logits(model, ids, mask)
    lcplug.patch(model, attention={**DUO, "mode": "train", "heads": {}})
    assert torch.equal(logits(model, ids, mask), ref)
    gates = duo.gate_parameters(model, freeze_rest=True)
    assert [tuple(g.shape) for g in gates] == [(2,)] * 3
    loss = model(ids, attention_mask=mask, labels=ids).loss + duo.l1_loss(model)
    loss.backward()
    assert all((g.grad != 0).all() for g in gates)
    assert duo.l1_penalty(model).item() == 6.0
    assert duo.l1_loss(model).item() == pytest.approx(0.05 * 6)


def test_duo_all_retrieval_heads_is_the_unpatched_model(long_batch):
    ids, mask = long_batch
    model = tiny_model("llama")
    ref = logits(model, ids, mask)
    lcplug.patch(model, attention={**DUO, "heads": {str(i): [1, 1] for i in range(3)}})
    assert torch.equal(logits(model, ids, mask), ref)


def test_gate_mixes_outputs_and_clamps():
    """gate * full + (1 - gate) * sparse, per KV head broadcast to its query heads, gate clamped to [0, 1]."""
    full = torch.randn(1, 3, 4, 2)
    sparse = torch.randn(1, 3, 4, 2)
    branch = NativeAttention(lambda *a, **k: (sparse, None), "sdpa")
    layer = GatedAttention(lambda *a, **k: (full, None), "sdpa", branch, torch.tensor([0.25, 7.0]))
    out, _ = layer(None, torch.zeros(1, 4, 3, 2), torch.zeros(1, 2, 3, 2), None, None)
    assert torch.allclose(out[:, :, :2], 0.25 * full[:, :, :2] + 0.75 * sparse[:, :, :2])
    assert torch.equal(out[:, :, 2:], full[:, :, 2:])


# ---- (d) finalize ---------------------------------------------------------------------------------------


def test_loza_finalize_picks_lowest_alphas_and_records_them(long_batch):
    ids, mask = long_batch
    model = lcplug.patch(tiny_model("llama"), attention={**LOZA, "mode": "calibrate"}, rope="yarn:factor=2")
    rope_spec = lcplug.manifest_of(model)["spec"]["rope"]
    with torch.no_grad():
        for gate, alpha in zip(loza.calibration_parameters(model), [0.9, 0.1, 0.5]):
            gate.fill_(alpha)
    spec = loza.finalize(model)
    assert spec["attention"]["sparse_layers"] == [1, 2]  # round(0.5 * 3) = 2 lowest
    manifest = lcplug.manifest_of(model)["spec"]
    assert manifest["rope"] == rope_spec and manifest["layers"] == [0, 1, 2]
    assert manifest["attention"]["mode"] == "sparse"
    assert manifest["attention"]["calibration"] == pytest.approx({"0": 0.9, "1": 0.1, "2": 0.5})
    kinds = {i: type(m).__name__ for i, m in modules(model).items()}
    assert kinds == {0: "NativeAttention", 1: "PatternAttention", 2: "PatternAttention"}
    again = lcplug.patch(tiny_model("llama"), spec)
    assert torch.equal(logits(model, ids, mask), logits(again, ids, mask))


def test_loza_finalize_fraction_and_layer_selection():
    model = lcplug.patch(tiny_model("llama"), attention={**LOZA, "mode": "calibrate"}, layers="0,2")
    assert set(gated_layers(model)) == {0, 2}
    with torch.no_grad():
        loza.calibration_parameters(model)[0].fill_(-0.2)  # layer 0; clamped to 0 in the forward
    spec = loza.finalize(model, fraction=0.4)
    assert spec["attention"]["sparse_layers"] == [0] and spec["layers"] == [0, 2]
    assert isinstance(modules(model)[1], NativeAttention) and isinstance(modules(model)[2], NativeAttention)
    assert isinstance(modules(model)[0], PatternAttention)


def test_duo_finalize_thresholds_heads():
    model = lcplug.patch(tiny_model("qwen3"), attention={**DUO, "mode": "train", "heads": {}})
    with torch.no_grad():
        for gate, values in zip(duo.gate_parameters(model), [[0.9, 0.1], [0.5, 0.49], [0.0, 0.0]]):
            gate.copy_(torch.tensor(values))
    spec = duo.finalize(model)
    assert spec["attention"]["heads"] == {"0": [1, 0], "1": [1, 0], "2": [0, 0]}
    assert lcplug.manifest_of(model)["spec"]["attention"]["calibration"]["1"] == pytest.approx([0.5, 0.49])
    layer = modules(model)[0]
    assert isinstance(layer, GatedAttention) and not layer.trainable
    assert torch.equal(layer.gate, torch.tensor([1.0, 0.0]))


# ---- (e) save -> from_pretrained -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "attention",
    [
        {**LOZA, "mode": "sparse", "sparse_layers": [0, 2], "calibration": {"0": 0.1, "1": 0.8, "2": 0.3}},
        DUO,
        {**DUO, "mode": "train", "heads": {}},
        {**LOZA, "mode": "calibrate"},
    ],
    ids=["loza-sparse", "duo-final", "duo-train", "loza-calibrate"],
)
def test_round_trip(attention, long_batch, tmp_path):
    ids, mask = long_batch
    model = lcplug.patch(tiny_model("qwen3"), attention=attention, rope="yarn:factor=2")
    with torch.no_grad():  # trained gates are not the defaults: the reload must really read them
        for i, (name, p) in enumerate(model.named_parameters()):
            if name.endswith("lcplug_attention.gate"):
                p.copy_(torch.linspace(0.2, 0.8, p.numel()) + 0.05 * i)
    lcplug.save_pretrained(model, tmp_path)
    loaded = lcplug.from_pretrained(tmp_path)
    assert lcplug.manifest_of(loaded)["spec"] == lcplug.manifest_of(model)["spec"]
    assert torch.equal(logits(loaded, ids, mask), logits(model, ids, mask))
    gates = {n: t for n, t in model.state_dict().items() if "lcplug_attention" in n}
    assert gates.keys() == {n for n in loaded.state_dict() if "lcplug_attention" in n}
    assert all(torch.equal(loaded.state_dict()[n], t) for n, t in gates.items())


# ---- (f) decode equals prefill ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "attention"),
    [("llama", DUO), ("gemma3_text", {**LOZA, "sparse_layers": [0, 2]})],
    ids=["llama-duo", "gemma3_text-loza"],
)
def test_decode_equals_prefill(family, attention, long_batch):
    ids, mask = long_batch
    model = lcplug.patch(tiny_model(family), attention=attention)
    assert decode_prefill_gap(model, ids, mask, 8) < 2e-5


# ---- (g) bad params ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attention", "layers", "param"),
    [
        ("loza:block=3", None, "block"),
        ("loza:local_blocks=0", None, "local_blocks"),
        ("loza:sink_blocks=-1", None, "sink_blocks"),
        ("loza:sparse_fraction=0", None, "sparse_fraction"),
        ("loza:sparse_fraction=1.5", None, "sparse_fraction"),
        ("loza:mode=dense", None, "mode"),
        ("loza:sparse_layers=0 5", None, "sparse_layers"),
        ("loza:sparse_layers=1", "0,2", "sparse_layers"),
        ("loza:mode=calibrate,sparse_layers=1", None, "sparse_layers"),
        ({"name": "loza", "calibration": {"first": 0.5}}, None, "calibration"),
        ({"name": "loza", "calibration": {"9": 0.5}}, None, "calibration"),
        ("duo:sink=-1", None, "sink"),
        ("duo:recent=0", None, "recent"),
        ("duo:threshold=1.5", None, "threshold"),
        ("duo:l1=-0.1", None, "l1"),
        ("duo:block_size=6", None, "block_size"),
        ("duo:mode=final", None, "heads"),
        ({**DUO, "heads": {**HEADS, "2": [1, 0, 1]}}, None, "heads"),
        ({**DUO, "heads": {**HEADS, "2": [2, 0]}}, None, "heads"),
        ({**DUO, "heads": {**HEADS, "7": [1, 0]}}, None, "heads"),
        ({**DUO, "heads": HEADS}, "0,1", "heads"),
        ({**DUO, "mode": "train"}, None, "heads"),
        ({**DUO, "calibration": {"0": [0.5]}}, None, "calibration"),
    ],
)
def test_bad_params_name_the_param(attention, layers, param):
    model = tiny_model("llama")
    ref = logits(model, torch.tensor([[5, 6, 7]]), None)
    with pytest.raises(ParamError, match=f"'{param}'"):
        lcplug.patch(model, attention=attention, layers=layers)
    assert lcplug.patch_state(model) is None
    assert torch.equal(logits(model, torch.tensor([[5, 6, 7]]), None), ref)


def test_finalize_needs_the_training_mode():
    sparse = lcplug.patch(tiny_model("llama"), attention=LOZA)
    with pytest.raises(UnsupportedModelError, match="mode 'calibrate'"):
        loza.finalize(sparse)
    with pytest.raises(UnsupportedModelError, match="'duo'"):
        duo.finalize(sparse)
    calibrating = lcplug.patch(tiny_model("llama"), attention={**LOZA, "mode": "calibrate"})
    with pytest.raises(ParamError, match="'sparse_fraction'"):
        loza.finalize(calibrating, fraction=0)
    final = lcplug.patch(tiny_model("llama"), attention=DUO)
    with pytest.raises(UnsupportedModelError, match="mode 'train'"):
        duo.l1_penalty(final)
