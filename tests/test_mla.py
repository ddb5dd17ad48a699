"""`mla`: latent K/V retrofit. Exact at full rank with every rotary dim kept, exact against a partial-RoPE
reference at full rank, executor parity, decode equals prefill, a latent cache, healing, save/load."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import lcplug
from lcplug.attention.latent import rotate_half
from lcplug.errors import ParamError, UnsupportedModelError
from lcplug.plugins.attention.mla import kv_bytes_per_token, latent_layers, latent_parameters
from lcplug.testing import decode_prefill_gap, logits, tiny_model
from lcplug.train import StageConfig
from lcplug.train.trainables import Trainee, select_trainables

FULL = {"name": "mla", "rank": 32, "rope_dims": 16}  # tiny models: Hkv=2, head_dim=16, every dim rotary
LOSSY = {"name": "mla", "rank": 24, "rope_dims": 4}
WINDOW = {"name": "sliding-window", "window": 6, "sinks": 1, "block_size": 4}


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
def test_full_rank_with_every_rope_dim_is_exact_and_unpatch_restores(family, batch):
    ids, mask = batch
    model = tiny_model(family)
    before = logits(model, ids, mask)
    lcplug.patch(model, attention=FULL)
    real = mask.bool()
    assert (logits(model, ids, mask) - before)[real].abs().max() < 1e-5
    lcplug.unpatch(model)
    assert torch.equal(logits(model, ids, mask), before)


def test_latent_keys_and_values_equal_partial_rope_at_full_rank():
    """rope_dims < rotary dims: K (nope dims through the latent) and V equal the projections with RoPE kept
    on the selected dims only, which is the function the conversion approximates below full rank."""
    model = lcplug.patch(tiny_model("qwen2"), attention={"name": "mla", "rank": 56, "rope_dims": 4})
    attn = model.model.layers[1].self_attn
    latent = attn.lcplug_attention.latent
    hidden = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(0))
    cos, sin = model.model.rotary_emb(hidden, torch.arange(9)[None].expand(2, -1))
    key, value = latent.expand(*latent.compress(hidden, cos, sin))
    with torch.no_grad():
        k = attn.k_proj(hidden).view(2, 9, 2, 16).transpose(1, 2)
        v = attn.v_proj(hidden).view(2, 9, 2, 16).transpose(1, 2)
    k = k.gather(-1, latent.order[None, :, None, :].expand_as(k))
    idx = latent.order[:, :4]
    c, s = cos[..., idx].transpose(1, 2), sin[..., idx].transpose(1, 2)
    rope = k[..., :4] * c + rotate_half(k[..., :4]) * s
    assert (key - torch.cat((rope, k[..., 4:]), -1)).abs().max() < 1e-5
    assert (value - v).abs().max() < 1e-5


def test_svd_error_falls_with_rank_and_is_recorded():
    errors = []
    for rank in (8, 24, 56):
        model = lcplug.patch(tiny_model("llama"), attention={"name": "mla", "rank": rank, "rope_dims": 4})
        recorded = model.config.lcplug["state"]["attention"]["svd_error"]
        assert recorded["0"] == round(latent_layers(model)[0].init_error, 6) and set(recorded) == {"0", "1", "2"}
        errors.append(latent_layers(model)[0].init_error)
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-6


def test_cache_holds_the_latent_and_bytes_per_token():
    model = lcplug.patch(tiny_model("llama"), attention=LOSSY)
    ids = torch.randint(3, 128, (1, 11))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
    layer = cache.layers[0]
    assert layer.keys.shape == (1, 2, 11, 4) and layer.values.shape == (1, 1, 11, 24)
    latent, dense = kv_bytes_per_token(model, torch.bfloat16)
    assert (latent, dense) == (3 * (24 + 2 * 4) * 2, 3 * 2 * 2 * 16 * 2)


@pytest.mark.parametrize("family", ["llama", "qwen2_moe"])
@pytest.mark.parametrize("inner", ["full", "window"])
def test_decode_equals_prefill(family, inner, batch):
    ids, mask = batch
    spec = {**LOSSY, "attention": WINDOW if inner == "window" else "full"}
    model = lcplug.patch(tiny_model(family), attention=spec)
    assert decode_prefill_gap(model, ids, mask, 6) < 2e-5


def test_torch_executor_equals_reference_over_the_latent(batch):
    ids, mask = batch
    results = {}
    for executor in ("torch", "reference"):
        model = lcplug.patch(tiny_model("llama"), attention={**LOSSY, "attention": {**WINDOW, "executor": executor}})
        out = model(ids, attention_mask=mask).logits
        loss = (out[mask.bool()] ** 2).mean()
        results[executor] = (out.detach(), torch.autograd.grad(loss, latent_parameters(model)))
    (out_t, g_t), (out_r, g_r) = results["torch"], results["reference"]
    assert (out_t - out_r)[mask.bool()].abs().max() < 1e-5
    for a, b in zip(g_t, g_r):
        assert (a - b).abs().max() < 1e-4 * max(1.0, float(b.abs().max()))


def test_heal_stage_trains_the_latent_and_lowers_the_distillation_loss():
    """A few steps of `train: latent` pull the truncated conversion back towards the model it came from."""
    ids = torch.randint(3, 128, (4, 24), generator=torch.Generator().manual_seed(3))
    model = tiny_model("llama")
    teacher = logits(model, ids)
    lcplug.patch(model, attention={"name": "mla", "rank": 12, "rope_dims": 4})
    trainee = Trainee(model)
    selected = select_trainables(trainee, StageConfig(name="heal", train="latent", steps=1), "stages[0]")
    assert {id(p) for p in selected.values()} == {id(p) for p in latent_parameters(model)}
    optimizer = torch.optim.Adam(selected.values(), lr=3e-3)

    def loss() -> torch.Tensor:
        return (model(ids).logits - teacher).pow(2).mean()

    start = loss().item()
    for _ in range(30):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert loss().item() < 0.6 * start


def test_save_and_reload_keep_the_healed_latent(tmp_path):
    model = lcplug.patch(tiny_model("llama"), attention=LOSSY)
    with torch.no_grad():
        for p in latent_parameters(model):
            p.add_(0.01 * torch.randn_like(p))
    ids = torch.randint(3, 128, (2, 12))
    lcplug.save_pretrained(model, tmp_path)
    reloaded = lcplug.from_pretrained(tmp_path).eval()
    assert torch.allclose(logits(reloaded, ids), logits(model, ids), atol=1e-6)


def test_bad_params_and_models_are_refused_untouched():
    model = tiny_model("llama")
    with pytest.raises(ParamError, match=r"rank=80 .* valid: 1 to 56"):
        lcplug.patch(model, attention={"name": "mla", "rank": 80, "rope_dims": 4})
    with pytest.raises(ParamError, match="'rope_dims' got 3; valid: an even integer"):
        lcplug.patch(model, attention={"name": "mla", "rope_dims": 3})
    with pytest.raises(UnsupportedModelError, match="q_norm"):
        lcplug.patch(tiny_model("qwen3"), attention="mla")
    nested = lcplug.patch(tiny_model("llama"), attention={"name": "hybrid", "sparse": LOSSY, "ratio": "2:1"})
    with pytest.raises(UnsupportedModelError, match="runs its own forward"):
        logits(nested, torch.randint(3, 128, (1, 5)))
    assert "lcplug" not in model.config.to_dict() and not hasattr(model.model.layers[0].self_attn, "lcplug_attention")


def test_mla_patches_a_shapes_only_model_like_a_real_one():
    """`lcplug plan` and a run's pre-flight rehearse the patch on the meta device: no SVD, same shapes."""
    real = lcplug.patch(tiny_model("llama"), attention="mla")
    with torch.device("meta"):  # as the rehearsal does: model and patch under the meta device
        skeleton = lcplug.patch(tiny_model("llama"), attention="mla")
    shapes = {n: p.shape for n, p in real.named_parameters()}
    assert {n: p.shape for n, p in skeleton.named_parameters()} == shapes
    assert all(p.is_meta for p in skeleton.parameters())
