"""ntk, dynamic, longrope, llama3 and selfextend on every family, their composition, bookkeeping and errors.

- dynamic, longrope, llama3 write standard `rope_parameters`: the patched model equals a model transformers
  builds from them with the same weights (fp32, logits within 1e-6), past the original length and below it.
- ntk is checked against a reference written here: rope_theta * s^(d/(d-2)) computed by hand, put into
  the original config, built by transformers.
- selfextend is checked against a reference written here: an attention function that undoes RoPE with
  explicit cos/sin and scores every (query, key) pair at a relative position from a position matrix
  (exact inside the window, grouped beyond it), run on the unpatched model.
"""

from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch
from transformers import AttentionInterface, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
from transformers.masking_utils import AttentionMaskInterface, eager_mask

import lcplug
from lcplug.errors import ConflictError, ParamError, UnknownPluginError, UnsupportedModelError
from lcplug.patching import choose_adapter
from lcplug.testing import (
    FAMILIES,
    check_manifest_round_trip,
    check_params,
    check_plugin,
    check_round_trip,
    logits,
    tiny_model,
)
from lcplug.testing.models import NATIVE_ATTENTION

LONG, SHORT = 300, 100
"""The tiny models are trained (configured) for 256 positions: one length past it, one below."""


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one torch thread; more only contend for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tokens(length, batch=1, seed=0):
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def slots(params):
    """The parameter dicts of a config: one, or one per layer type (Gemma-3)."""
    return [p for p in params.values() if p is not None] if "rope_type" not in params else [params]


def rotary_pairs(config, params):
    """Rotated pairs per head, by hand: head_dim * partial_rotary_factor / 2."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return int(head_dim * params.get("partial_rotary_factor", 1.0)) // 2


def transformers_model(config, weights_from):
    """A model transformers builds from `config` (no lcplug manifest) with the weights of `weights_from`."""
    config = copy.deepcopy(config)
    if hasattr(config, "lcplug"):
        del config.lcplug
    impl = NATIVE_ATTENTION.get(config.model_type, "sdpa")
    model = AutoModelForCausalLM.from_config(config, attn_implementation=impl, dtype=torch.float32).eval()
    missing, unexpected = model.load_state_dict(weights_from.state_dict(), strict=False)
    assert not missing and not unexpected
    return model


def standard_spec(which, config):
    pairs = rotary_pairs(config, slots(config.rope_parameters)[0])
    return {
        "dynamic": "dynamic:factor=4",
        "llama3": "llama3:factor=8,low_freq_factor=1,high_freq_factor=4,original_max_position_embeddings=64",
        "longrope": {
            "name": "longrope",
            "factor": 4,
            "long_factor": [1 + 5 * i / (pairs - 1) for i in range(pairs)],
            "short_factor": [1 + 0.3 * i / (pairs - 1) for i in range(pairs)],
        },
    }[which]


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("which", ["dynamic", "longrope", "llama3"])
def test_standard_types_equal_transformers(family, which):
    model = tiny_model(family)
    base = copy.deepcopy(model.config.rope_parameters)
    ref = {n: logits(model, tokens(n)) for n in (LONG, SHORT)}
    refused = family == "phi3" and which != "longrope"  # Phi3Config only takes default and longrope
    with pytest.warns(UserWarning, match="Phi3Config refuses") if refused else contextlib.nullcontext():
        lcplug.patch(model, rope=standard_spec(which, model.config))
    assert {p["rope_type"] for p in slots(model.config.rope_parameters)} == {which}
    twin = transformers_model(model.config, model)
    for n in (LONG, SHORT, LONG):  # long, then short (longrope's short factors, dynamic's reset), long again
        ids = tokens(n)
        assert (logits(model, ids) - logits(twin, ids)).abs().max() <= 1e-6, n
    assert not torch.allclose(logits(model, tokens(LONG)), ref[LONG], atol=1e-4)
    lcplug.unpatch(model)
    assert model.config.rope_parameters == base
    for n in (LONG, SHORT):
        assert torch.equal(logits(model, tokens(n)), ref[n])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_ntk_equals_hand_computed_theta(family):
    """Reference: theta' = theta * s^(d/(d-2)) by hand in the original config, built by transformers."""
    model = tiny_model(family)
    reference_config = copy.deepcopy(model.config)
    expected_inv_freq = []
    for params in slots(reference_config.rope_parameters):
        d = 2 * rotary_pairs(reference_config, params)
        params["rope_theta"] = params["rope_theta"] * 4.0 ** (d / (d - 2))
        expected_inv_freq.append(1.0 / params["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    reference = transformers_model(reference_config, model)
    lcplug.patch(model, rope="ntk:factor=4")
    assert {p["rope_type"] for p in slots(model.config.rope_parameters)} == {"default"}
    assert lcplug.manifest_of(model)["spec"]["rope"] == {"name": "ntk", "factor": 4.0}
    assert model.config.max_position_embeddings == 1024
    (rotary,) = choose_adapter(model).rotary_modules(model)
    params = reference_config.rope_parameters
    prefixes = [f"{lt}_" for lt in params] if "rope_type" not in params else [""]
    for prefix, expected in zip(prefixes, expected_inv_freq):
        torch.testing.assert_close(getattr(rotary, f"{prefix}inv_freq").double(), expected, rtol=1e-6, atol=0)
    ids = tokens(LONG)
    assert (logits(model, ids) - logits(reference, ids)).abs().max() <= 1e-6


def test_selfextend_follows_the_layer_selection():
    model = lcplug.patch(tiny_model("llama"), rope="selfextend:group=4,window=16", layers="0")
    kinds = [type(m.self_attn.lcplug_attention).__name__ for m in model.model.layers]
    assert kinds == ["SelfExtendAttention", "NativeAttention", "NativeAttention"]
    assert lcplug.manifest_of(model)["spec"]["layers"] == [0]


@pytest.mark.parametrize(
    "spec",
    [
        "ntk:factor=2",
        "dynamic:factor=2",
        "llama3:factor=4",
        {"name": "longrope", "factor": 4, "long_factor": [2.0] * 4},
    ],
    ids=["ntk", "dynamic", "llama3", "longrope"],
)
def test_conformance_kit_passes(spec):
    """GPT-NeoX: partial rotary, no GQA; the kit also saves, reloads, and rebuilds the config from JSON."""
    check_plugin("rope", spec, "gpt_neox")


# ---- selfextend ---------------------------------------------------------------------------------------

REFERENCE = "lcplug_test_selfextend_reference"


def hand_inv_freq(config, layer_idx):
    params = config.rope_parameters
    if "rope_type" not in params:
        params = params[config.layer_types[layer_idx]]
    d = 2 * rotary_pairs(config, params)
    return 1.0 / params["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float32) / d)


def selfextend_reference(config, group, window):
    """An attention function for transformers' AttentionInterface: SelfExtend from a position matrix.

    Undo RoPE on q and k with explicit cos/sin (positions 0..L-1, no padding), then score each pair with
    the pre-RoPE q^T R(-r) k, r = p - k inside the window, else (p // G + W - W // G) - k // G.
    """

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **kwargs):
        inv = hand_inv_freq(config, module.layer_idx)
        half = inv.numel()
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        lq, lkv = query.shape[2], key.shape[2]
        p, k = torch.arange(lkv - lq, lkv), torch.arange(lkv)

        def unrotate(x, pos):
            a = pos[:, None].float() * inv
            c, s = a.cos(), a.sin()
            x1, x2 = x[..., :half], x[..., half : 2 * half]
            return x1 * c + x2 * s, x2 * c - x1 * s, x[..., 2 * half :]

        (q1, q2, q_pass), (k1, k2, k_pass) = unrotate(query, p), unrotate(key, k)
        rel = p[:, None] - k[None, :]
        grouped = (p // group + window - window // group)[:, None] - (k // group)[None, :]
        r = torch.where(rel < window, rel, grouped).float()
        cos, sin = (r[..., None] * inv).cos(), (r[..., None] * inv).sin()
        pair = "bhif,bhjf,ijf->bhij"
        scores = (
            torch.einsum(pair, q1, k1, cos)
            + torch.einsum(pair, q2, k2, cos)
            + torch.einsum(pair, q1, k2, sin)
            - torch.einsum(pair, q2, k1, sin)
            + q_pass @ k_pass.transpose(-1, -2)
        ) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        probs = torch.softmax(scores + attention_mask, dim=-1)
        return (probs @ value).transpose(1, 2).contiguous(), probs

    return attention


@pytest.mark.parametrize("family", list(FAMILIES))
def test_selfextend_equals_position_matrix_reference(family):
    model = tiny_model(family)
    reference = copy.deepcopy(model)
    AttentionInterface.register(REFERENCE, selfextend_reference(model.config, group=4, window=16))
    AttentionMaskInterface.register(REFERENCE, eager_mask)
    reference.set_attn_implementation(REFERENCE)
    ids = tokens(200)
    plain = logits(model, ids)
    lcplug.patch(model, rope="selfextend:group=4,window=16,query_chunk=64")
    out = logits(model, ids)
    assert (out - logits(reference, ids)).abs().max() <= 1e-6
    assert not torch.allclose(out, plain, atol=1e-4)  # it does change far attention
    torch.testing.assert_close(out[:, :16], plain[:, :16], rtol=0, atol=1e-5)  # inside the window: as trained
    lcplug.unpatch(model)
    assert torch.equal(logits(model, ids), plain)


def test_selfextend_passes_the_kit_checks_that_apply():
    """The kit's rope oracle (a transformers model from the written parameters) cannot see an attention-side
    remap; the position-matrix reference above is its oracle. Params, unpatch and save/reload still apply."""
    spec = "selfextend:group=4,window=16"
    for result in (check_params("rope", spec), check_round_trip("rope", spec), check_manifest_round_trip("rope", spec)):
        assert result.status == "pass", result


def test_selfextend_group_one_is_the_model_itself():
    model = tiny_model("qwen3")
    ids = tokens(LONG)
    plain = logits(model, ids)
    lcplug.patch(model, rope="selfextend:group=1,window=8")
    torch.testing.assert_close(logits(model, ids), plain, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "phi3"])
def test_selfextend_decode_equals_prefill_and_padding_is_invisible(family):
    model = lcplug.patch(tiny_model(family), rope="selfextend:group=3,window=10,query_chunk=32")
    ids = tokens(90, batch=2, seed=3)
    full = logits(model, ids)
    # decode: prefill 60 tokens, then one token at a time from the cache
    with torch.no_grad():
        out = model(ids[:, :60], use_cache=True)
        cache, steps = out.cache, [out.logits]
        for t in range(60, 90):
            out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)
    # left padding is invisible when position ids count real tokens, as generate's do
    padded = torch.cat([torch.zeros(2, 7, dtype=torch.long), ids], dim=1)
    padded[1] = torch.cat([ids[1], torch.full((7,), 5)])  # row 1 unpadded: its own tokens, then 7 more
    mask = torch.ones_like(padded)
    mask[0, :7] = 0
    got = logits(model, padded, mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    torch.testing.assert_close(got[0, 7:], full[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(got[1, :90], full[1], rtol=0, atol=1e-5)
    # without ids the model counts the pads as positions: SelfExtend follows the positions RoPE used
    got = logits(model, padded, mask)
    shifted = logits(model, ids[:1], position_ids=torch.arange(7, 97)[None])
    torch.testing.assert_close(got[0, 7:], shifted[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(got[1, :90], full[1], rtol=0, atol=1e-5)


def snapshot(model):
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    attrs = {name: sorted(vars(m)) for name, m in model.named_modules()}
    return buffers, attrs, model.config.to_json_string(), model.config._attn_implementation


@pytest.mark.parametrize(
    "spec",
    ["selfextend:group=4,window=16", "dynamic:factor=4", {"name": "longrope", "factor": 2, "long_factor": [2.0] * 8}],
)
def test_unpatch_restores_after_long_runs(spec):
    """Runs past the original length make transformers cache state on the rotary module; unpatch drops it."""
    model = tiny_model("gemma3_text")
    before = snapshot(model)
    ids = tokens(LONG)
    ref = logits(model, ids)
    lcplug.patch(model, rope=spec)
    logits(model, ids)
    logits(model, tokens(SHORT))
    logits(model, ids)
    lcplug.unpatch(model)
    after = snapshot(model)
    assert before[1:] == after[1:]
    assert before[0].keys() == after[0].keys() and all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert torch.equal(logits(model, ids), ref)


def test_repatching_longrope_uses_the_new_factors():
    """transformers caches the long-factor frequencies on the rotary module: a second spec must not reuse them."""
    a = {"name": "longrope", "factor": 4, "long_factor": [1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 4.0, 4.0]}
    b = {**a, "long_factor": [1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0]}
    ids = tokens(LONG)
    model = lcplug.patch(tiny_model("llama"), rope=a)
    logits(model, ids)
    lcplug.patch(model, rope=b)
    assert torch.equal(logits(model, ids), logits(lcplug.patch(tiny_model("llama"), rope=b), ids))


# ---- composition and bookkeeping -------------------------------------------------------------------------


def extended_model(rope_parameters, **overrides):
    return tiny_model("llama", rope_parameters=rope_parameters, **overrides)


def test_linear_on_linear_multiplies_factors():
    model = extended_model({"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    lcplug.patch(model, rope="linear:factor=3")
    assert model.config.rope_parameters == {"rope_theta": 10000.0, "rope_type": "linear", "factor": 6.0}
    assert model.config.max_position_embeddings == 768
    twin = transformers_model(model.config, model)
    assert (logits(model, tokens(LONG)) - logits(twin, tokens(LONG))).abs().max() <= 1e-6
    lcplug.unpatch(model)
    assert model.config.rope_parameters["factor"] == 2.0 and model.config.max_position_embeddings == 256


def test_ntk_on_linear_scales_theta_under_pi():
    model = extended_model({"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    lcplug.patch(model, rope="ntk:factor=2")
    params = model.config.rope_parameters
    assert params["rope_type"] == "linear" and params["factor"] == 2.0
    assert math.isclose(params["rope_theta"], 10000.0 * 2.0 ** (16 / 14))
    twin = transformers_model(model.config, model)
    assert (logits(model, tokens(LONG)) - logits(twin, tokens(LONG))).abs().max() <= 1e-6


@pytest.mark.parametrize(
    ("base", "spec", "needles"),
    [
        (
            {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
            "yarn:factor=2",
            ("'yarn'", "'llama3'"),
        ),
        ({"rope_type": "yarn", "factor": 2.0}, "ntk:factor=2", ("NTK", "'yarn'")),
        ({"rope_type": "dynamic", "factor": 2.0}, "linear:factor=2", ("'linear'", "'dynamic'")),
        ({"rope_type": "dynamic", "factor": 2.0}, "selfextend:group=2,window=8", ("fixed", "'dynamic'")),
        (
            {"rope_type": "longrope", "factor": 2.0, "short_factor": [1.0] * 8, "long_factor": [2.0] * 8},
            "selfextend:group=2,window=8",
            ("fixed", "'longrope'"),
        ),
        ({"rope_type": "linear", "factor": 2.0}, "llama3:factor=2", ("'llama3'", "'linear'")),
    ],
)
def test_second_extension_without_a_composition_is_a_conflict(base, spec, needles):
    original = {"original_max_position_embeddings": 128} if base["rope_type"] in ("llama3", "yarn", "longrope") else {}
    model = extended_model({"rope_theta": 10000.0, **base, **original})
    before = copy.deepcopy(model.config.rope_parameters)
    with pytest.raises(ConflictError) as err:
        lcplug.patch(model, rope=spec)
    for needle in needles:
        assert needle in str(err.value)
    assert lcplug.patch_state(model) is None and model.config.rope_parameters == before


@pytest.mark.parametrize(
    ("spec", "max_len", "original"),
    [
        ("linear:factor=2", 512, None),
        ("ntk:factor=4", 1024, None),
        ("dynamic:factor=4", 256, None),  # transformers reads L from max_position_embeddings
        ("yarn:factor=4,original_max_position_embeddings=128", 512, 128),
        ("llama3:factor=8,original_max_position_embeddings=64", 512, 64),
        (
            {"name": "longrope", "factor": 2, "long_factor": [1.0] * 4, "original_max_position_embeddings": 128},
            256,
            128,
        ),
        ("selfextend:group=4,window=16", (256 - 16) * 4 + 16, None),
    ],
)
def test_lengths_stay_consistent(spec, max_len, original):
    model = tiny_model("phi3")  # keeps the original length as a config attribute too (4096 here)
    lcplug.patch(model, rope=spec)
    config = model.config
    assert config.max_position_embeddings == max_len
    if original is not None:
        assert config.rope_parameters["original_max_position_embeddings"] == original
        assert config.original_max_position_embeddings == original  # transformers prefers the attribute
        logits(model, tokens(LONG))  # transformers re-standardises the parameters at run time
        assert config.rope_parameters["original_max_position_embeddings"] == original
    lcplug.unpatch(model)
    assert config.max_position_embeddings == 256 and config.original_max_position_embeddings == 4096


@pytest.mark.parametrize(
    "spec",
    [
        "ntk:factor=4",
        "dynamic:factor=2",
        "llama3:factor=4",
        {"name": "longrope", "factor": 4, "long_factor": [3.0] * 8},
    ],
)
def test_saved_checkpoint_loads_in_plain_transformers(spec, tmp_path):
    model = lcplug.patch(tiny_model("llama"), rope=spec)
    lcplug.save_pretrained(model, tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    reloaded = lcplug.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = tokens(LONG)
    out = logits(model, ids)
    assert (logits(plain, ids) - out).abs().max() <= 1e-6
    assert (logits(reloaded, ids) - out).abs().max() <= 1e-6
    assert lcplug.manifest_of(reloaded)["spec"]["rope"] == lcplug.manifest_of(model)["spec"]["rope"]


def test_selfextend_reloads_with_lcplug(tmp_path):
    model = lcplug.patch(tiny_model("qwen2"), rope="selfextend:group=4,window=32")
    lcplug.save_pretrained(model, tmp_path)
    reloaded = lcplug.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = tokens(LONG)
    assert (logits(reloaded, ids) - logits(model, ids)).abs().max() <= 1e-6
    assert reloaded.config.rope_parameters == {"rope_theta": 10000.0, "rope_type": "default"}


# ---- bad input -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "error", "needle"),
    [
        ("ntk:factor=0.5", ParamError, "parameter 'factor' got 0.5; valid: a number >= 1"),
        ("dynamic:factor=0.9", ParamError, "parameter 'factor' got 0.9; valid: a number >= 1"),
        ("llama3:factor=0", ParamError, "parameter 'factor' got 0.0; valid: a number >= 1"),
        ({"name": "longrope", "factor": 0.5, "long_factor": [1.0] * 8}, ParamError, "valid: a number >= 1"),
        ({"name": "longrope", "factor": 2, "long_factor": [1.0, -1.0]}, ParamError, "numbers > 0"),
        ({"name": "longrope", "factor": 2, "long_factor": [1.0] * 3}, ParamError, "has 3 values.*needs 8"),
        ({"name": "longrope", "factor": 2}, ParamError, "parameter 'long_factor' is required"),
        ("llama3:factor=4,original_max_position_embeddings=4096", ParamError, "above the model's current"),
        (
            {"name": "longrope", "factor": 2, "long_factor": [1.0] * 8, "original_max_position_embeddings": 512},
            ParamError,
            "original_max_position_embeddings=512 is above the model's current max_position_embeddings=256",
        ),
        ("llama3:factor=4,low_freq_factor=4,high_freq_factor=1", ParamError, "must be larger than low_freq_factor"),
        ("selfextend:group=0", ParamError, "parameter 'group' got 0"),
        ("selfextend:window=256", ParamError, "window=256 must be below the model's max_position_embeddings=256"),
        ("ntkk:factor=2", UnknownPluginError, "unknown rope plugin 'ntkk'; did you mean 'ntk'"),
        ("longrop", UnknownPluginError, "did you mean 'longrope'"),
    ],
)
def test_bad_input_is_refused_clearly(spec, error, needle):
    model = tiny_model("llama")
    with pytest.raises(error, match=needle):
        lcplug.patch(model, rope=spec)
    assert lcplug.patch_state(model) is None and model.config.rope_parameters["rope_type"] == "default"


def test_selfextend_owns_attention():
    with pytest.raises(ConflictError, match=r"rope:selfextend .* cannot be combined with attention:sliding-window"):
        lcplug.patch(tiny_model("llama"), rope="selfextend:window=16", attention="sliding-window:window=8")


@pytest.mark.parametrize(
    "spec",
    [
        "ntk:factor=2",
        "dynamic:factor=2",
        "llama3:factor=2",
        {"name": "longrope", "factor": 2, "long_factor": [1.0]},
        "selfextend:window=4",
    ],
)
def test_model_without_rotary_embedding_is_refused(spec):
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match="no rope_parameters"):
        lcplug.patch(model, rope=spec)
    assert lcplug.patch_state(model) is None


@pytest.mark.parametrize(
    "spec",
    [
        "ntk:factor=2",
        "dynamic:factor=2",
        "llama3:factor=4,original_max_position_embeddings=64",
        "longrope:long_factor=1 1 1.5 2 2 3 3 4,factor=4,original_max_position_embeddings=64",
        "selfextend:group=4,window=8",
    ],
)
def test_every_rope_plugin_passes_the_conformance_kit(spec):
    from lcplug.testing.conformance import check_plugin

    check_plugin("rope", spec, family="llama")
