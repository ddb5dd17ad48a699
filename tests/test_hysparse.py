"""`hysparse`: full layers choose key blocks for the sparse layers after them, which read the full layer's K/V.

The block executor equals the dense reference of the same math (logits and every gradient, fp32, gates off
their start, a left-padded row), patching alone is sliding-window attention on the sparse layers and the
model's own attention on the full ones, decode equals prefill (DynamicCache and lcplug's device tier), a
KV tier keeps the shared K/V once and only the window per sparse layer, and the gate stages train.
"""

from __future__ import annotations

import pytest
import torch

import lcplug
from lcplug.attention.crosslayer import OracleAttention, ReaderAttention
from lcplug.attention.indexer import select_blocks
from lcplug.errors import ConflictError, ParamError, UnsupportedModelError
from lcplug.patching import patch_state
from lcplug.plugins.attention.hysparse import kv_bytes_per_token, reader_modules
from lcplug.testing import check_plugin, decode_prefill_gap, descend, logits, padded_batch, tiny_model
from lcplug.train.recipe import Recipe
from lcplug.train.trainables import plugin_groups

TOL = 1e-5
SPEC = {"name": "hysparse", "period": 2, "topk": 2, "block_size": 4, "window": 5, "sinks": 1}


@pytest.fixture
def rows():
    """Two rows of 40 tokens; row 0 is left-padded by 5."""
    return padded_batch(40, seed=3)


def hysparse_model(family: str = "llama", layers: int = 4, **params):
    return lcplug.patch(tiny_model(family, num_hidden_layers=layers), attention={**SPEC, **params})


def open_gates(model, seed: int = 1):
    """Gates off their start, different per KV head, so both branches count."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in reader_modules(model).values():
            layer.gate.copy_(torch.rand(layer.gate.shape, generator=g) * 0.6 + 0.2)
    return model


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_block_executor_equals_reference(family, rows):
    ids, mask = rows
    real = mask.bool()
    results = {}
    for executor in ("torch", "reference"):
        model = open_gates(hysparse_model(family, executor=executor)).train()
        out = model(ids, attention_mask=mask).logits
        named = {n: p for n, p in model.named_parameters() if ".lcplug_attention." in n or "_proj.weight" in n}
        grads = torch.autograd.grad((out[real] ** 2).mean(), list(named.values()), allow_unused=True)
        results[executor] = (out.detach(), dict(zip(named, grads)))
    (out_t, g_t), (out_r, g_r) = results["torch"], results["reference"]
    assert (out_t - out_r)[real].abs().max() < TOL
    for name, b in g_r.items():
        a = g_t[name]
        assert (a is None) == (b is None), name
        if a is not None:
            assert (a - b).abs().max() < TOL * max(1.0, float(b.abs().max())), name
    # the sparse layers' shared branch sends gradient into the full layer's key projection, and to the gates
    assert float(g_t["model.layers.0.self_attn.k_proj.weight"].abs().max()) > 0
    assert all(float(g_t[f"model.layers.{i}.self_attn.lcplug_attention.gate"].abs().max()) > 0 for i in (1, 3))


def test_patch_alone_is_sliding_window_on_sparse_layers(rows):
    ids, mask = rows
    model = hysparse_model()
    kinds = [type(layer.self_attn.lcplug_attention) for layer in model.model.layers]
    assert kinds == [OracleAttention, ReaderAttention, OracleAttention, ReaderAttention]
    window = {"name": "sliding-window", "window": 5, "sinks": 1, "block_size": 4}
    swa = lcplug.patch(tiny_model("llama", num_hidden_layers=4), attention=window, layers=[1, 3])
    assert torch.equal(logits(model, ids, mask), logits(swa, ids, mask))
    assert patch_state(model).manifest["state"]["attention"] == {"groups": {"0": [1], "2": [3]}}


def test_groups_follow_the_selected_layers():
    model = lcplug.patch(tiny_model("llama", num_hidden_layers=6), attention={**SPEC, "period": 3}, layers="1-5")
    kinds = [type(layer.self_attn.lcplug_attention).__name__ for layer in model.model.layers]
    # layers 1..5 in groups of 3: (1: full, 2, 3), (4: full, 5); layer 0 unselected
    assert kinds == [
        "NativeAttention",
        "OracleAttention",
        "ReaderAttention",
        "ReaderAttention",
        "OracleAttention",
        "ReaderAttention",
    ]


@pytest.mark.parametrize("kv", [None, "device"])
def test_decode_equals_prefill(kv, rows):
    ids, mask = rows
    model = open_gates(lcplug.patch(tiny_model("llama", num_hidden_layers=4), attention=SPEC, kv=kv))
    assert decode_prefill_gap(model, ids, mask, 6) < 2e-5


def test_blocks_are_chosen_by_attention_mass():
    # one query, 8 keys in 4 blocks of 2; block 1 has the largest single score, block 2 the largest mass
    scores = torch.tensor([[[0.05, 0.05, 0.30, 0.00, 0.20, 0.20, 0.10, 0.10]]])
    visible = torch.ones(1, 1, 8, dtype=torch.bool)
    kv_block = (torch.arange(8) // 2)[None]
    own = torch.tensor([[3]])
    by_mass = select_blocks(scores, visible, own, kv_block, 4, 2, reduce="sum")
    by_max = select_blocks(scores, visible, own, kv_block, 4, 2)
    assert by_mass[0, 0].tolist() == [False] * 4 + [True] * 4  # block 2 (0.4) and its own block 3
    assert by_max[0, 0].tolist() == [False, False, True, True, False, False, True, True]


def test_kv_tier_keeps_shared_kv_once_and_windows():
    ids, mask = padded_batch(40, seed=3)
    model = open_gates(lcplug.patch(tiny_model("llama", num_hidden_layers=4), attention=SPEC, kv="device"))
    cache = patch_state(model).plugins["kv"].make_cache(model)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, cache=cache)
    length, rows_ = cache.layers[0].length, out.shape[0]  # the last token generated is never cached
    per_token_layer = 2 * 2 * 16 * 4  # K and V, 2 KV heads, head dim 16, fp32
    resident = [layer.resident_bytes() for layer in cache.layers]
    assert resident[0] == resident[2] == rows_ * length * per_token_layer  # full layers: every token
    # sparse layers: the window (5) and sink (1) tokens in whole blocks of 4 plus the open tail, nothing more
    block_bound = (-(-5 // 4) + 1 + 1) * 4 + 4  # window blocks + one straddled + the sink block + tail
    assert resident[1] == resident[3] <= rows_ * block_bound * per_token_layer
    assert all(cache.layers[i].stats()["dropped"] > 0 for i in (1, 3))
    sparse, dense = kv_bytes_per_token(model, length, torch.float32)
    assert dense == 4 * per_token_layer
    assert sparse == pytest.approx(2 * per_token_layer + 2 * per_token_layer * 6 / length)
    measured = sum(resident) / (rows_ * length)
    assert sparse < measured < 0.7 * dense  # block granularity costs a little over the token-exact formula
    # at long lengths only the full layers remain: 1 / period of dense
    assert kv_bytes_per_token(model, 1 << 20)[0] / kv_bytes_per_token(model, 1 << 20)[1] == pytest.approx(0.5, 1e-4)


@pytest.mark.parametrize("group", ["gates", "shared"])
def test_gate_stages_lower_the_loss(group, rows):
    ids, mask = rows
    model = hysparse_model().train()
    params = plugin_groups(model)[group]
    assert len(params) == (2 if group == "gates" else 2 + 2 * 2)  # gates (+ q_proj, o_proj of layers 1, 3)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    labels = ids.masked_fill(mask == 0, -100)
    losses = descend(lambda: model(ids, attention_mask=mask, labels=labels).loss, params, steps=8, lr=0.05)
    assert losses[-1] < losses[0]
    assert any(float(layer.gate.detach().abs().max()) > 0 for layer in reader_modules(model).values())  # gates left 0


def test_retrofit_stages_parse_in_a_recipe():
    recipe = Recipe.from_dict(
        {
            "base": {"model": "tiny"},
            "patch": {"attention": "hysparse:period=4,topk=16,window=128"},
            "data": {"seq_len": 64, "batch_size": 1, "sources": {"code": "code"}},
            "stages": [
                {"name": "calibrate", "train": "gates", "steps": 10, "lr": 0.05},
                {"name": "heal", "train": "shared", "steps": 10, "lr": 1e-4},
            ],
        }
    )
    assert [s.train for s in recipe.stages] == ["gates", "shared"]


@pytest.mark.parametrize(
    ("params", "words"),
    [
        ({"period": 1}, ["'period'", "1", ">= 2"]),
        ({"topk": 0}, ["'topk'", "0", ">= 1"]),
        ({"block_size": 48}, ["'block_size'", "48", "power of two"]),
        ({"gate_init": 1.5}, ["'gate_init'", "1.5", "from 0 to 1"]),
    ],
)
def test_bad_params_name_value_and_range(params, words):
    with pytest.raises(ParamError) as err:
        hysparse_model(**params)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_refuses_mixed_layer_types():
    with pytest.raises(UnsupportedModelError, match="mixes layer types"):
        lcplug.patch(tiny_model("gemma3_text"), attention=SPEC)


def test_conflicts_with_context_parallelism():
    with pytest.raises(ConflictError, match="cannot run under cp"):
        lcplug.patch(tiny_model("llama"), attention=SPEC, cp="ring:degree=2")


def test_conformance_round_trip_manifest_and_reference():
    """Params, patch/unpatch bit-identity, save/load through lcplug, and executor parity (kit's checks)."""
    check_plugin("attention", {**SPEC, "gate_init": 0.5}, family="llama")
