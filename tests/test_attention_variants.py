"""Every attention variant on every family adapter: the fast executor equals the reference executor
(logits and gradients, fp32, 1e-5), and greedy decode with the default cache equals prefill."""

from __future__ import annotations

import pytest
import torch

import lcplug
from lcplug.testing import FAMILIES, decode_prefill_gap, tiny_model

TOL = 1e-5
VARIANTS = {
    "sliding-window": {"name": "sliding-window", "window": 7, "sinks": 2, "block_size": 4, "learnable_sink": True},
    "s2": {"name": "s2", "group": 8, "block_size": 4},
    "hybrid": {"name": "hybrid", "sparse": {"name": "sliding-window", "window": 5, "block_size": 4}, "ratio": "2:1"},
}
TRAINING_ONLY = {"s2"}


def run(model, ids, mask):
    return model(ids, attention_mask=mask).logits


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_torch_executor_equals_reference_on_family(family, variant, batch):
    ids, mask = batch
    results = {}
    for executor in ("torch", "reference"):
        model = tiny_model(family)
        spec = dict(VARIANTS[variant])
        target = spec["sparse"] if variant == "hybrid" else spec
        target["executor"] = executor
        lcplug.patch(model, attention=spec)
        if variant in TRAINING_ONLY:
            model.train()
        with torch.no_grad():  # make learnable sinks non-trivial
            for name, p in model.named_parameters():
                if "sink_logit" in name:
                    p.copy_(torch.linspace(-1.0, 1.0, p.numel()))
        out = run(model, ids, mask)
        loss = (out[mask.bool()] ** 2).mean()
        grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
        results[executor] = (out.detach(), grads)
    (out_t, g_t), (out_r, g_r) = results["torch"], results["reference"]
    real = mask.bool()
    assert (out_t - out_r)[real].abs().max() < TOL
    for a, b in zip(g_t, g_r):
        assert (a - b).abs().max() < 1e-4 * max(1.0, float(b.abs().max()))


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "phi3", "qwen2_moe"])
@pytest.mark.parametrize("variant", [v for v in VARIANTS if v not in TRAINING_ONLY])
def test_decode_equals_prefill(family, variant, batch):
    ids, mask = batch
    model = lcplug.patch(tiny_model(family), attention=VARIANTS[variant])
    assert decode_prefill_gap(model, ids, mask, 6) < 2e-5


def test_s2_is_full_attention_at_inference(batch):
    ids, mask = batch
    plain = tiny_model("llama")
    model = lcplug.patch(tiny_model("llama"), attention="s2:group=8,block_size=4")
    with torch.no_grad():
        assert torch.equal(run(model, ids, mask), run(plain, ids, mask))
        model.train()
        plain.train()
        assert not torch.allclose(run(model, ids, mask), run(plain, ids, mask), atol=1e-4)


def test_hybrid_schedule_and_manifest():
    model = lcplug.patch(tiny_model("llama", num_hidden_layers=6), attention=VARIANTS["hybrid"])
    kinds = [
        type(m.lcplug_attention).__name__ for m in lcplug.patch_state(model).adapter.attention_modules(model).values()
    ]
    assert kinds == ["PatternAttention", "PatternAttention", "NativeAttention"] * 2
    assert lcplug.manifest_of(model)["state"]["attention"] == {"full_layers": [2, 5]}
    explicit = lcplug.patch(
        tiny_model("llama", num_hidden_layers=6), attention={**VARIANTS["hybrid"], "full_layers": [0]}
    )
    assert lcplug.manifest_of(explicit)["state"]["attention"] == {"full_layers": [0]}


@pytest.mark.parametrize(
    ("spec", "error", "needle"),
    [
        ("sliding-window:window=0", lcplug.ParamError, "'window' got 0"),
        ("sliding-window:block_size=3", lcplug.ParamError, "'block_size' got 3"),
        ("s2:group=7", lcplug.ParamError, "'group' got 7; valid: an even integer"),
        ({"name": "hybrid", "sparse": "slidingwindow"}, lcplug.UnknownPluginError, "did you mean 'sliding-window'"),
        ({"name": "hybrid", "sparse": "full"}, lcplug.ConflictError, "not a sparse variant"),
        ({"name": "hybrid", "ratio": "x"}, lcplug.SpecError, "cannot parse"),
        ({"name": "hybrid", "full_layers": [9]}, lcplug.SpecError, "out of range"),
    ],
)
def test_bad_variant_params(spec, error, needle):
    with pytest.raises(error, match=needle):
        lcplug.patch(tiny_model("llama"), attention=spec)


@pytest.mark.parametrize(
    "spec",
    [
        "s2:group=8,block_size=4",
        {"name": "hybrid", "sparse": {"name": "sliding-window", "window": 5, "block_size": 4}, "ratio": "2:1"},
        "loza:block=4,local_blocks=2",
        "loza:mode=calibrate,block=4,local_blocks=2",
        "duo:sink=2,recent=6,block_size=4",
        "dsa:topk=8,block_size=4,heads=2,dim=8,stage=sparse",
    ],
)
def test_every_variant_passes_the_conformance_kit(spec):
    from lcplug.testing.conformance import check_plugin

    check_plugin("attention", spec, family="llama")


@pytest.mark.parametrize("spec", ["sliding-window:window=32,sinks=4,block_size=16", "loza:block=16"])
def test_bf16_autocast_training_step_matches_fp32(spec):
    """Under CPU autocast (what `precision: bf16` gives) the fused executor gets q, k, v in one dtype and trains."""
    model = tiny_model("llama", vocab_size=256)
    lcplug.patch(model, attention=spec)
    ids = torch.randint(0, 256, (2, 128), generator=torch.Generator().manual_seed(0))
    position_ids = torch.cat([torch.arange(64), torch.arange(64)]).expand(2, -1)  # two packed documents
    fp32 = model(input_ids=ids, labels=ids, position_ids=position_ids, use_cache=False).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = model(input_ids=ids, labels=ids, position_ids=position_ids, use_cache=False).loss
    bf16.backward()
    assert abs(bf16.item() - fp32.item()) < 2e-2  # bf16 rounding of a loss near ln(256)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
