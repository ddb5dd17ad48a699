"""The patch engine: per-instance, transactional, idempotent, reversible, with clear errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lcplug
from lcplug.attention import NativeAttention
from lcplug.errors import ParamError, SpecError, UnknownPluginError, UnsupportedModelError
from lcplug.hookspecs import hookimpl
from lcplug.testing import logits, tiny_model


def snapshot(model):
    """Everything that could change: state dict (incl. non-persistent buffers), config, attention backend."""
    tensors = {k: v.clone() for k, v in model.state_dict().items()}
    tensors.update({f"buffer:{k}": v.clone() for k, v in model.named_buffers()})
    return tensors, model.config.to_json_string(), model.config._attn_implementation


def assert_same_snapshot(a, b):
    assert a[0].keys() == b[0].keys()
    for k in a[0]:
        assert torch.equal(a[0][k], b[0][k]), k
    assert a[1] == b[1]
    assert a[2] == b[2]


def test_patch_returns_same_object_and_two_models_coexist(batch):
    ids, mask = batch
    patched, plain = tiny_model("llama"), tiny_model("llama")
    ref = logits(plain, ids, mask)
    assert lcplug.patch(patched, attention="sliding-window:window=3,sinks=0") is patched
    out = logits(patched, ids, mask)
    assert not torch.allclose(out, ref, atol=1e-4)
    # the unpatched twin is untouched, in the same process, interleaved
    assert torch.equal(logits(plain, ids, mask), ref)
    assert plain.config._attn_implementation == "sdpa"
    assert torch.equal(logits(patched, ids, mask), out)


def test_unpatch_restores_bit_identical_everything(batch):
    ids, mask = batch
    model = tiny_model("phi3")
    before = snapshot(model)
    ref = logits(model, ids, mask)
    lcplug.patch(model, attention="sliding-window:window=4,learnable_sink=true", rope="yarn:factor=4")
    assert model.config.max_position_embeddings == 1024
    lcplug.unpatch(model)
    assert_same_snapshot(before, snapshot(model))
    assert torch.equal(logits(model, ids, mask), ref)
    assert lcplug.manifest_of(model) is None
    assert lcplug.unpatch(model) is model  # unpatching an unpatched model is a no-op


def test_same_spec_is_noop_and_other_spec_repatches_cleanly(batch):
    ids, mask = batch
    model = tiny_model("llama")
    lcplug.patch(model, attention="sliding-window:window=4")
    state = lcplug.patch_state(model)
    lcplug.patch(model, attention={"name": "sliding-window", "window": 4})
    assert lcplug.patch_state(model) is state, "same spec in another form must be a no-op"
    lcplug.patch(model, attention="sliding-window:window=6", rope="linear:factor=2")
    fresh = lcplug.patch(tiny_model("llama"), attention="sliding-window:window=6", rope="linear:factor=2")
    assert torch.equal(logits(model, ids, mask), logits(fresh, ids, mask))
    assert lcplug.manifest_of(model)["spec"]["attention"]["window"] == 6


class ExplodingLayer(NativeAttention):
    pass


class Exploding(lcplug.AttentionPlugin):
    """Raises while installing layer 1, after layers 0 and rope were already applied."""

    name = "exploding"

    def layer_attention(self, layer_idx, attn_module, adapter, *, native_fn, native_impl):
        if layer_idx == 1:
            raise RuntimeError("boom at layer 1")
        return ExplodingLayer(native_fn, native_impl)


class ExplodingModule:
    @hookimpl
    def lcplug_register(self, register):
        register(Exploding)


@pytest.fixture
def exploding():
    registry = lcplug.get_registry()
    module = ExplodingModule()
    registry.register_module(module, distribution="test-exploding")
    yield
    registry.unregister("attention", "exploding")
    registry.pm.unregister(module)


def test_plugin_raising_halfway_leaves_model_bit_identical(batch, exploding):
    ids, mask = batch
    model = tiny_model("qwen3")
    before = snapshot(model)
    ref = logits(model, ids, mask)
    with pytest.raises(RuntimeError, match="boom at layer 1"):
        lcplug.patch(model, attention="exploding", rope="yarn:factor=2")
    assert_same_snapshot(before, snapshot(model))
    assert torch.equal(logits(model, ids, mask), ref)
    assert lcplug.patch_state(model) is None


def test_failed_repatch_keeps_previous_patch(batch, exploding):
    ids, mask = batch
    model = lcplug.patch(tiny_model("llama"), attention="sliding-window:window=4")
    out = logits(model, ids, mask)
    manifest = copy.deepcopy(lcplug.manifest_of(model))
    with pytest.raises(RuntimeError):
        lcplug.patch(model, attention="exploding")
    assert lcplug.manifest_of(model) == manifest
    assert torch.equal(logits(model, ids, mask), out)


def test_unknown_plugin_lists_close_matches(llama):
    with pytest.raises(UnknownPluginError) as err:
        lcplug.patch(llama, attention="slidng-window")
    msg = str(err.value)
    assert "'slidng-window'" in msg and "did you mean 'sliding-window'" in msg
    assert llama.config._attn_implementation == "sdpa"


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("sliding-window:window=0", "parameter 'window' got 0; valid: an integer >= 1"),
        ("sliding-window:window=abc", "parameter 'window' got 'abc'; expected int"),
        ("sliding-window:windw=4", "unknown parameter 'windw'; did you mean 'window'"),
        ("sliding-window:block_size=48", "parameter 'block_size' got 48; valid: a power of two"),
        ("sliding-window:executor=cuda", "parameter 'executor' got 'cuda'"),
    ],
)
def test_bad_attention_params(llama, spec, needle):
    with pytest.raises(ParamError, match=needle.replace("(", r"\(")):
        lcplug.patch(llama, attention=spec)


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("yarn", "parameter 'factor' is required"),
        ("yarn:factor=0.5", "parameter 'factor' got 0.5; valid: a number >= 1"),
        ("yarn:factor=4,original_max_position_embeddings=4096", "above the model's current max_position_embeddings"),
        ("yarn:factor=4,beta_fast=1,beta_slow=2", "beta_slow=2.0 must be smaller than beta_fast=1.0"),
    ],
)
def test_bad_rope_params(llama, spec, needle):
    with pytest.raises(ParamError, match=needle):
        lcplug.patch(llama, rope=spec)


def test_bad_specs(llama):
    with pytest.raises(SpecError, match="unknown plugin kind 'atention'"):
        lcplug.patch(llama, {"atention": "full"})
    with pytest.raises(SpecError, match="layer 7 is out of range for a model with 3 layers"):
        lcplug.patch(llama, attention="full", layers=[0, 7])
    with pytest.raises(SpecError, match="cannot parse"):
        lcplug.patch(llama, attention="sliding-window:window")


def test_unsupported_model_names_what_is_missing():
    class NotAModel(nn.Module):
        pass

    with pytest.raises(UnsupportedModelError, match=r"NotAModel is not supported.*PreTrainedModel"):
        lcplug.patch(NotAModel(), attention="full")


def test_model_without_rotary_embedding_is_refused_for_rope():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match=r"no rope_parameters|no rotary"):
        lcplug.patch(model, rope="linear:factor=2")
    assert lcplug.patch_state(model) is None


def test_spec_from_yaml_file_and_dict(tmp_path, batch):
    ids, mask = batch
    path = tmp_path / "patch.yaml"
    path.write_text("attention:\n  name: sliding-window\n  window: 5\nrope: linear:factor=2\nlayers: '0-1'\n")
    a = lcplug.patch(tiny_model("llama"), path)
    b = lcplug.patch(
        tiny_model("llama"),
        {"attention": {"sliding-window": {"window": 5}}, "rope": "linear:factor=2", "layers": "0-1"},
    )
    assert lcplug.manifest_of(a)["spec"] == lcplug.manifest_of(b)["spec"]
    assert lcplug.manifest_of(a)["spec"]["layers"] == [0, 1]
    assert torch.equal(logits(a, ids, mask), logits(b, ids, mask))


def test_hooks_fire(llama):
    seen = []

    class Watcher:
        @hookimpl
        def lcplug_patched(self, model, manifest):
            seen.append(("patched", manifest["spec"]["attention"]["name"]))

        @hookimpl
        def lcplug_unpatched(self, model):
            seen.append(("unpatched", None))

    registry = lcplug.get_registry()
    watcher = Watcher()
    registry.pm.register(watcher)
    try:
        lcplug.patch(llama, attention="full")
        lcplug.unpatch(llama)
    finally:
        registry.pm.unregister(watcher)
    assert seen == [("patched", "full"), ("unpatched", None)]
