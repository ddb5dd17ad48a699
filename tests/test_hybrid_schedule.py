"""`hybrid` schedules of several attention variants (DeepSeek-V4: window-only lead layers, then CSA and HCA
alternating) on a tiny 6-layer Llama: each layer runs its variant; the model equals a reference assembled
from single-variant patches, each layer range on its own, run by the dense reference executor (logits and
gradients, fp32, 1e-5); decode equals prefill, also through the device KV tier; save/reload keeps the logits;
a distillation stage over both compressed variants lowers its loss; restaging keeps trained weights; bad
schedules fail with errors naming the value and what is valid, leaving the model untouched."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import lcplug
from lcplug.attention import NativeAttention, PatternAttention
from lcplug.attention.compressed import CompressedAttention, distill_loss
from lcplug.plugins.attention.hybrid import DEEPSEEK_V4_FLASH
from lcplug.spec import PatchSpec
from lcplug.testing import decode_prefill_gap, descend, logits, padded_batch, perturb_added, tiny_model
from lcplug.train.plan import plan
from lcplug.train.recipe import Recipe, StageConfig
from lcplug.train.stages import configure, enter, finalize
from lcplug.train.trainables import Trainee

TOL = 1e-5
LAYERS = 6
SWA = {"name": "sliding-window", "window": 5, "sinks": 0, "block_size": 4, "learnable_sink": True}
CSA = {"name": "csa", "size": 4, "stride": 2, "window": 5, "topk": 3, "heads": 2, "dim": 8, "block_size": 4}
HCA = {"name": "hca", "size": 8, "window": 6, "block_size": 4, "learnable_sink": True}
SCHEDULE = {"name": "hybrid", "pinned": {"0-1": SWA}, "sparse": [CSA, HCA], "ratio": "1:0"}
"""DeepSeek-V4-Flash's schedule at tiny scale."""
RANGES = {"sliding-window": [0, 1], "csa": [2, 4], "hca": [3, 5]}
"""What SCHEDULE means on 6 layers: two window layers, then CSA and HCA in turn."""


@pytest.fixture
def rows():
    """Two rows of 40 tokens; row 0 is left-padded by 5."""
    return padded_batch(40, seed=3)


def model(spec=SCHEDULE, **kinds):
    return lcplug.patch(tiny_model("llama", num_hidden_layers=LAYERS), attention=spec, **kinds)


def layer_modules(m):
    return lcplug.patch_state(m).adapter.attention_modules(m)


def per_range_reference(executor: str):
    """Each variant patched alone on its layer range, the layers then assembled into one model."""
    spec = {"sliding-window": SWA, "csa": CSA, "hca": HCA}
    singles = {name: model({**spec[name], "executor": executor}, layers=RANGES[name]) for name in spec}
    ref = singles["sliding-window"]
    for name in ("csa", "hca"):
        for idx in RANGES[name]:
            layer_modules(ref)[idx]._modules["lcplug_attention"] = layer_modules(singles[name])[idx].lcplug_attention
    return ref


def test_each_layer_runs_its_variant():
    m = model()
    layers = [mod.lcplug_attention for mod in layer_modules(m).values()]
    assert [type(a) for a in layers] == [PatternAttention] * 2 + [CompressedAttention] * 4
    assert all(a.pattern.window == 5 and a.sink_logit is not None for a in layers[:2])
    assert [a.indexer is not None for a in layers[2:]] == [True, False, True, False]  # csa, hca, csa, hca
    assert [a.geometry.size for a in layers[2:]] == [4, 8, 4, 8]
    assert lcplug.manifest_of(m)["state"]["attention"] == {
        "full_layers": [],
        "layers": {"pinned[0-1]": RANGES["sliding-window"], "sparse[0]": RANGES["csa"], "sparse[1]": RANGES["hca"]},
    }
    # ratio groups the layers `pinned` leaves; the spec's `layers` narrows where the schedule applies
    mixed = model({**SCHEDULE, "ratio": "1:1"}, layers="0-4")
    kinds = [type(mod.lcplug_attention) for mod in layer_modules(mixed).values()]
    window, compressed, native = PatternAttention, CompressedAttention, NativeAttention
    assert kinds == [window, window, compressed, native, compressed, native]  # layer 5: outside `layers`
    state = lcplug.manifest_of(mixed)["state"]["attention"]
    assert state["full_layers"] == [3, 5] and state["layers"]["sparse[0]"] == [2]
    assert state["layers"]["sparse[1]"] == [4]


def test_deepseek_v4_flash_spec():
    m = lcplug.patch(tiny_model("llama", num_hidden_layers=8), attention=copy.deepcopy(DEEPSEEK_V4_FLASH))
    assert lcplug.manifest_of(m)["state"]["attention"]["layers"] == {
        "pinned[0-1]": [0, 1],
        "sparse[0]": [2, 4, 6],
        "sparse[1]": [3, 5, 7],
    }
    layers = [mod.lcplug_attention for mod in layer_modules(m).values()]
    assert all(a.pattern.window == 128 and a.pattern.sinks == 0 for a in layers[:2])
    assert all(a.geometry.window == 128 and a.sink_logit is not None for a in layers[2:])
    assert [a.topk if a.indexer is not None else a.geometry.size for a in layers[2:]] == [512, 128] * 3


def test_the_recipe_patches_the_deepseek_v4_flash_schedule_and_plans(monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # recipes name their configs from the repository root
    path = "recipes/retrofit-deepseek-v4.yaml"
    recipe = Recipe.from_yaml(path)
    assert recipe.patch["attention"] == PatchSpec.build(attention=DEEPSEEK_V4_FLASH).to_dict()["attention"]
    stages = plan(path, world_size=8).stages
    assert [set(s.trainable) for s in stages] == [{"indexer"}, {"compress"}, {"model", "sinks", "compress", "indexer"}]


def test_equals_single_variants_per_layer_range_on_the_reference_executor(rows):
    ids, mask = rows
    real = mask.bool()
    hybrid = perturb_added(model(), 0.3)
    hybrid.train()  # tiny models have no dropout; train mode exercises the training path
    ref = per_range_reference("reference")
    ref.load_state_dict(hybrid.state_dict())
    ref.train()
    results = []
    names = [n for n, _ in hybrid.named_parameters() if ".lcplug_attention." in n or n.endswith("q_proj.weight")]
    for m in (hybrid, ref):
        out = m(ids, attention_mask=mask).logits
        params = [p for n, p in m.named_parameters() if ".lcplug_attention." in n or n.endswith("q_proj.weight")]
        results.append((out.detach(), torch.autograd.grad((out[real] ** 2).mean(), params, allow_unused=True)))
    (out_h, g_h), (out_r, g_r) = results
    assert (out_h - out_r)[real].abs().max() < TOL
    compared = 0
    for a, b in zip(g_h, g_r):
        assert (a is None) == (b is None)
        if a is not None:
            assert (a - b).abs().max() < TOL * max(1.0, float(b.abs().max()))
            compared += int(b.abs().max() > 0)
    # the indexers' inputs are detached: every other parameter (pooling, sinks, the model) gets a gradient
    assert compared == sum(".indexer." not in n for n in names)
    plain = logits(tiny_model("llama", num_hidden_layers=LAYERS), ids, mask)
    assert (out_h - plain)[real].abs().max() > 1e-3  # the schedule does change the model


def test_decode_equals_prefill_and_the_device_kv_tier_equals_the_default_cache(rows):
    ids, mask = rows
    # pooling scores and the indexer read post-RoPE states: prefill with the positions generate uses
    assert decode_prefill_gap(perturb_added(model(), 0.3), ids, mask, 6, generate_positions=True) < 2e-5
    outs = []
    for kinds in ({}, {"kv": "device"}):
        m = perturb_added(model(**kinds), 0.3)
        with torch.no_grad():
            outs.append(
                m.generate(
                    ids,
                    attention_mask=mask,
                    max_new_tokens=8,
                    do_sample=False,
                    return_dict_in_generate=True,
                    output_scores=True,
                )
            )
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    assert max((a - b).abs().max().item() for a, b in zip(outs[0].scores, outs[1].scores)) < 2e-5


def test_save_reload_round_trip(tmp_path, rows):
    ids, mask = rows
    m = perturb_added(model(), 0.3)
    lcplug.save_pretrained(m, tmp_path)
    reloaded = lcplug.from_pretrained(tmp_path).eval()
    assert lcplug.manifest_of(reloaded)["state"] == lcplug.manifest_of(m)["state"]
    assert [type(x.lcplug_attention) for x in layer_modules(reloaded).values()] == [
        type(x.lcplug_attention) for x in layer_modules(m).values()
    ]
    assert (logits(reloaded, ids, mask) - logits(m, ids, mask))[mask.bool()].abs().max() < 1e-6


def test_groups_join_across_variants_and_distillation_lowers_its_loss():
    m = model()
    plugin = lcplug.patch_state(m).plugins["attention"]
    groups = plugin.trainable_groups(m)
    sinks = {id(mod.lcplug_attention.sink_logit) for i, mod in layer_modules(m).items() if i not in RANGES["csa"]}
    assert {id(p) for p in groups["sinks"]} == sinks  # window and hca sinks in one group (csa has none here)
    assert len(groups["indexer"]) == len({id(p) for p in groups["indexer"]}) > 0
    assert set(plugin.aux_losses()) == {"distill", "indexer_kl"}
    plan = configure(Trainee(m), StageConfig(name="distill", train="compress", losses={"distill": 1.0}), "stages[0]")
    trained_layers = {int(name.split(".layers.")[1].split(".")[0]) for name in plan.params}
    assert trained_layers == set(RANGES["csa"] + RANGES["hca"]) and all("compressor" in n for n in plan.params)
    ids = torch.randint(3, 128, (2, 48), generator=torch.Generator().manual_seed(0))

    def distill():
        m(ids)
        return plan.aux["distill"](m)

    losses = descend(distill, plan.params.values(), steps=8, lr=0.05)
    assert plan.aux["distill"] is distill_loss
    assert losses[-1] < 0.97 * losses[0]  # random tiny models attend near-uniformly: mean pooling starts close


def test_restage_keeps_trained_weights_while_each_layer_keeps_its_variant():
    dsa = "dsa:topk=8,block_size=4,heads=2,dim=8,stage=warmup"
    m = model({"name": "hybrid", "pinned": {"0-1": SWA}, "sparse": [dsa, HCA], "ratio": "1:0"})
    perturb_added(m, 0.3)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if ".indexer." in name:
                p.add_(1.0)
    before = {n: p.detach().clone() for n, p in m.named_parameters() if ".lcplug_attention." in n}
    change = {"attention": {"name": "hybrid", "sparse": [dsa.replace("warmup", "sparse"), HCA]}}
    enter(m, StageConfig(name="sparse", patch=change), "stages[1]")
    assert [mod.lcplug_attention.stage for i, mod in layer_modules(m).items() if i in (2, 4)] == ["sparse"] * 2
    after = dict(m.named_parameters())
    assert before.keys() == {n for n in after if ".lcplug_attention." in n}
    assert all(torch.equal(after[n], t) for n, t in before.items())
    # another schedule re-patches: the trained weights are gone
    enter(m, StageConfig(name="full", patch={"attention": {"name": "hybrid", "ratio": "1:1"}}), "stages[2]")
    assert lcplug.manifest_of(m)["state"]["attention"]["full_layers"] == [3, 5]
    sink = "model.layers.0.self_attn.lcplug_attention.sink_logit"
    assert not torch.equal(dict(m.named_parameters())[sink], before[sink])


def test_a_nested_calibration_refuses_to_finalize():
    m = model({"name": "hybrid", "sparse": "loza:mode=calibrate,block=4,local_blocks=2", "ratio": "2:1"})
    with pytest.raises(lcplug.UnsupportedModelError, match="patched with attention plugin 'loza'; this model runs"):
        finalize(m)


def test_clashing_losses_are_refused():
    dsa = "dsa:topk=8,block_size=4,heads=2,dim=8"
    m = model({"name": "hybrid", "sparse": [dsa, CSA], "ratio": "1:0"})
    plugin = lcplug.patch_state(m).plugins["attention"]
    with pytest.raises(lcplug.ConflictError, match=r"sparse\[1\] \(csa\) and sparse\[0\] \(dsa\) both offer a loss"):
        plugin.aux_losses()


@pytest.mark.parametrize(
    ("change", "error", "needle"),
    [
        ({"sparse": [CSA, "hybrid"]}, lcplug.ConflictError, r"sparse\[1\]='hybrid' is not a sparse variant; valid"),
        ({"pinned": {"0": "full"}}, lcplug.ConflictError, r"pinned\[0\]='full' is not a sparse variant"),
        ({"sparse": []}, lcplug.ParamError, r"'sparse' got \[\]; valid: a spec or a non-empty list"),
        ({"sparse": [CSA, 5]}, lcplug.ParamError, r"'sparse' got .*; expected str \| dict \| list"),
        ({"sparse": [CSA, "hcaa"]}, lcplug.UnknownPluginError, "did you mean 'hca'"),
        ({"pinned": {"0-2": SWA, "2": SWA}}, lcplug.SpecError, "layer 2 is pinned twice, by '0-2' and '2'"),
        ({"full_layers": [1]}, lcplug.SpecError, r"full_layers names layer 1, which pinned\[0-1\] also assigns"),
        ({"pinned": {"4-9": SWA}}, lcplug.SpecError, "layer 9 is out of range for a model with 6 layers"),
        ({"pinned": {0: SWA}}, lcplug.ParamError, "'pinned' got .*; valid: a mapping with string keys"),
    ],
)
def test_bad_schedules(change, error, needle):
    m = tiny_model("llama", num_hidden_layers=LAYERS)
    with pytest.raises(error, match=needle):
        lcplug.patch(m, attention={**SCHEDULE, **change})
    assert lcplug.patch_state(m) is None and "lcplug" not in m.config.to_dict()
