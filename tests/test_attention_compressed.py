"""Compressed attention (ksa, csa, hca, nsa) on one mechanism (`lcplug.attention.compress`).

The block executor equals the dense reference of the same math (logits and every gradient, fp32), decode
equals prefill, the entries and pooling are what the docstrings say, the limiting cases are the plain
model or sliding-window attention, the KV bytes a cache must keep follow the geometry, and a few steps of
the distillation stage lower its loss. Tiny models, 40-token rows (one left-padded).
"""

from __future__ import annotations

import pytest
import torch

import lcplug
from lcplug.attention.compress import (
    ChunkWindowPattern,
    Compressor,
    Geometry,
    RawRetention,
    entry_visibility,
    find_entries,
)
from lcplug.attention.compressed import CompressedAttention, compressed_layers, distill_loss
from lcplug.testing import decode_prefill_gap, descend, logits, padded_batch, perturb_added, tiny_model
from lcplug.testing.conformance import check_pattern_coverage, check_plugin

TOL = 1e-5
SPECS = {
    "ksa": {"name": "ksa", "chunk": 4, "window": 2, "block_size": 4},
    "hca": {"name": "hca", "size": 8, "window": 6, "block_size": 4, "learnable_sink": True},
    "csa": {"name": "csa", "size": 4, "stride": 2, "window": 5, "topk": 3, "heads": 2, "dim": 8, "block_size": 4},
    "nsa": {"name": "nsa", "size": 4, "stride": 2, "select_block": 4, "select_count": 4, "window": 5, "block_size": 4},
}


@pytest.fixture
def rows():
    """Two rows of 40 tokens; row 0 is left-padded by 5."""
    return padded_batch(40, seed=3)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
@pytest.mark.parametrize("variant", list(SPECS))
def test_block_executor_equals_reference(variant, family, rows):
    ids, mask = rows
    real = mask.bool()
    results = {}
    for executor in ("torch", "reference"):
        model = perturb_added(lcplug.patch(tiny_model(family), attention={**SPECS[variant], "executor": executor}), 0.3)
        model.train()  # tiny models have no dropout; train mode exercises the training path
        out = model(ids, attention_mask=mask).logits
        params = [p for n, p in model.named_parameters() if ".lcplug_attention." in n or n.endswith("q_proj.weight")]
        grads = torch.autograd.grad((out[real] ** 2).mean(), params, allow_unused=True)
        results[executor] = (out.detach(), grads)
    (out_t, g_t), (out_r, g_r) = results["torch"], results["reference"]
    assert (out_t - out_r)[real].abs().max() < TOL
    compared = 0
    for a, b in zip(g_t, g_r):
        assert (a is None) == (b is None)
        if a is not None:
            assert (a - b).abs().max() < TOL * max(1.0, float(b.abs().max()))
            compared += int(b.abs().max() > 0)
    assert compared >= 3, "gradients must reach the pooling weights and the model"


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
@pytest.mark.parametrize("variant", list(SPECS))
def test_decode_equals_prefill(variant, family, rows):
    ids, mask = rows
    model = perturb_added(lcplug.patch(tiny_model(family), attention=SPECS[variant]), 0.3)
    # pooling scores and the indexer read post-RoPE states: prefill with the positions generate uses
    assert decode_prefill_gap(model, ids, mask, 6, generate_positions=True) < 2e-5


def test_entries_follow_positions_and_pool_to_the_mean():
    kv_pos = torch.stack([torch.arange(12) - 3, torch.arange(12)])  # row 0: 3 left pads
    entries = find_entries(kv_pos, size=4, stride=2)
    assert entries.valid.tolist() == [[True, True, True, False, False], [True] * 5]
    assert entries.start[0, :3].tolist() == [0, 2, 4] and entries.slots[0, :3].tolist() == [3, 5, 7]
    assert entries.start[1].tolist() == [0, 2, 4, 6, 8]
    packed = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]])  # two documents: no window crosses
    assert find_entries(packed, size=4, stride=2).start[0].tolist() == [0, 0, 2]
    key, value = torch.randn(2, 3, 12, 5), torch.randn(2, 3, 12, 5)
    ck, cv = Compressor(3, 5, 4, torch.float32)(key, value, entries)
    assert torch.allclose(ck[1, :, 2], key[1, :, 4:8].mean(1), atol=1e-6)
    assert torch.allclose(cv[0, :, 1], value[0, :, 5:9].mean(1), atol=1e-6)


def test_visibility_rules():
    kv_pos = torch.arange(16)[None]
    q_pos = torch.tensor([[7, 8, 15]])
    ksa = Geometry(4, 4, 2, chunk=4, disjoint=True)  # raw: the query's chunk and the one before
    seen = entry_visibility(q_pos, find_entries(kv_pos, 4, 4), ksa)
    assert seen[0].int().tolist() == [[0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0]]
    hca = Geometry(4, 4, 2)  # every complete entry at or before the query
    assert entry_visibility(q_pos, find_entries(kv_pos, 4, 4), hca)[0].int().tolist() == [
        [1, 1, 0, 0],
        [1, 1, 0, 0],
        [1, 1, 1, 1],
    ]
    check_pattern_coverage(ChunkWindowPattern(3, chunk=4, block_size=4))
    check_pattern_coverage(ChunkWindowPattern(5, block_size=4))


@pytest.mark.parametrize(
    "geometry", [Geometry(4, 4, 2, chunk=4, disjoint=True), Geometry(8, 4, 5), Geometry(16, 16, 6)]
)
def test_raw_retention_keeps_the_window_and_every_open_entry_window(geometry):
    """What a KV tier keeps raw once `n` tokens are stored: every key the next query's raw window reads, and
    every token of an entry not complete yet (pooled when its last token arrives), nothing older."""
    retention = RawRetention(geometry, block_size=4)
    check_pattern_coverage(retention)
    for n in range(60):
        complete = find_entries(torch.arange(n)[None], geometry.size, geometry.stride)
        assert int(geometry.complete(torch.tensor(n))) == complete.count == geometry.entries_at(n)
        open_starts = [s for s in range(0, n, geometry.stride) if s + geometry.size > n]
        window = int(geometry.raw_pattern(4).window_start(torch.tensor(n)))
        kept = int(retention.start(torch.tensor(n)))
        assert kept == min([window, *open_starts]), n


def test_limits_plain_model_sliding_window_and_all_entries(rows):
    ids, mask = rows
    real = mask.bool()
    plain = logits(tiny_model("llama"), ids, mask)
    wide_ksa = lcplug.patch(tiny_model("llama"), attention="ksa:chunk=4,window=16,block_size=4")
    assert (logits(wide_ksa, ids, mask) - plain)[real].abs().max() < TOL  # window covers all: full attention
    ksa = lcplug.patch(tiny_model("llama"), attention=SPECS["ksa"])
    assert (logits(ksa, ids, mask) - plain)[real].abs().max() > 1e-3
    nsa = lcplug.patch(tiny_model("llama"), attention=SPECS["nsa"])
    swa = lcplug.patch(tiny_model("llama"), attention="sliding-window:window=5,sinks=0,block_size=4")
    assert (logits(nsa, ids, mask) - logits(swa, ids, mask))[real].abs().max() < TOL  # gates start (0, 0, 1)
    every = {**SPECS["csa"], "size": 4, "stride": 4, "topk": 64}
    hca = {"name": "hca", "size": 4, "window": 5, "block_size": 4}
    csa_all = logits(lcplug.patch(tiny_model("llama"), attention=every), ids, mask)
    assert (csa_all - logits(lcplug.patch(tiny_model("llama"), attention=hca), ids, mask))[real].abs().max() < TOL


def test_kv_bytes_per_token_against_dense():
    length = 128 * 1024
    model = tiny_model("llama", num_hidden_layers=4)
    lcplug.patch(model, attention={"name": "hybrid", "sparse": "ksa", "ratio": "3:1"})
    layers = compressed_layers(model)
    assert len(layers) == 3  # KSA's 3:1 summary:full schedule
    dense = layers[0].dense_kv_bytes_per_token()
    assert dense == 2 * 2 * 16 * 2  # K and V, 2 KV heads, head dim 16, bf16
    ratios = {"ksa": layers[0].kv_bytes_per_token(length) / dense}
    for name in ("csa", "hca", "nsa"):
        layer = compressed_layers(lcplug.patch(tiny_model("llama"), attention=name))[0]
        ratios[name] = layer.kv_bytes_per_token(length) / dense
    assert ratios["ksa"] == pytest.approx((1024 + (length - 1024) // 8) / length)
    assert ratios["hca"] == pytest.approx((128 + 127 + (length - 128) // 128 + 1) / length)
    indexer_share = 1 + 16 * 2 / dense  # each CSA entry also keeps its bf16 indexer key (dim capped at 16)
    assert ratios["csa"] == pytest.approx((128 + 7 + ((length - 8) // 4 + 1) * indexer_share) / length)
    assert ratios["nsa"] > 1  # the selection branch reads any raw block: no saving


@pytest.mark.parametrize("variant", ["ksa", "nsa"])
def test_distillation_stage_lowers_its_loss(variant):
    from lcplug.train.recipe import StageConfig
    from lcplug.train.stages import configure
    from lcplug.train.trainables import Trainee

    model = lcplug.patch(tiny_model("llama"), attention=SPECS[variant])
    stage = StageConfig(name="distill", train="gates" if variant == "nsa" else "compress", losses={"distill": 1.0})
    plan = configure(Trainee(model), stage, "stages[0]")
    assert set(plan.aux) == {"distill"} and plan.params
    assert all(".lcplug_attention." in name for name in plan.params)
    ids = torch.randint(3, 128, (2, 48), generator=torch.Generator().manual_seed(0))

    def distill():
        model(ids)
        return distill_loss(model)

    losses = descend(distill, plan.params.values(), steps=8, lr=0.05)
    assert losses[-1] < 0.97 * losses[0]  # random tiny models attend near-uniformly: mean pooling starts close


def test_csa_indexer_warmup_stage():
    from lcplug.train.recipe import StageConfig
    from lcplug.train.stages import configure
    from lcplug.train.trainables import Trainee

    model = lcplug.patch(tiny_model("llama"), attention=SPECS["csa"])
    stage = StageConfig(name="warmup", train="indexer", losses={"indexer_kl": 1.0})
    plan = configure(Trainee(model), stage, "stages[0]")
    ids = torch.randint(3, 128, (2, 48), generator=torch.Generator().manual_seed(0))

    def indexer_kl():
        model(ids)
        return plan.aux["indexer_kl"](model)

    losses = descend(indexer_kl, plan.params.values(), steps=6, lr=1e-2)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("variant", list(SPECS))
def test_conformance_kit(variant):
    check_plugin("attention", SPECS[variant], family="llama")


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("ksa:chunk=0", "'chunk' got 0; valid: an integer >= 1"),
        ("csa:size=8,stride=9", "stride=9 exceeds size=8"),
        ("csa:topk=0", "'topk' got 0"),
        ("hca:window=0", "'window' got 0"),
        ("nsa:select_block=40,stride=16", "select_block=40 must be a multiple of stride=16"),
        ("nsa:select_count=2", "'select_count' got 2; valid: an integer >= 3"),
        ("ksa:block_size=3", "'block_size' got 3"),
    ],
)
def test_bad_params(spec, needle):
    with pytest.raises(lcplug.ParamError, match=needle):
        lcplug.patch(tiny_model("llama"), attention=spec)


def test_layers_are_compressed_attention_and_save_their_weights(tmp_path):
    model = lcplug.patch(tiny_model("llama"), attention=SPECS["csa"])
    layer = lcplug.patch_state(model).adapter.attention_modules(model)[0].lcplug_attention
    assert isinstance(layer, CompressedAttention)
    names = {n for n, _ in model.named_parameters() if ".lcplug_attention." in n}
    assert any(n.endswith("compressor.score") for n in names) and any(".indexer." in n for n in names)
