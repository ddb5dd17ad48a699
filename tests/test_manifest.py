"""The manifest in `config.lcplug`: written on save, re-applied by `lcplug.from_pretrained`."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import lcplug
from lcplug.errors import ManifestError
from lcplug.testing import logits, tiny_model

SPEC = {"attention": "sliding-window:window=5,sinks=1,learnable_sink=true", "rope": "yarn:factor=4", "layers": "0,2"}


@pytest.fixture
def saved(tmp_path):
    model = lcplug.patch(tiny_model("qwen3"), SPEC)
    with torch.no_grad():  # make the plugin weights non-default so the reload must really read them
        for name, p in model.named_parameters():
            if "sink_logit" in name:
                p.copy_(torch.linspace(-1, 1, p.numel()))
    lcplug.save_pretrained(model, tmp_path)
    return model, tmp_path


def test_manifest_content(saved):
    _, path = saved
    data = json.loads((path / "config.json").read_text())["lcplug"]
    assert data["spec"]["attention"] == {
        "name": "sliding-window",
        "window": 5,
        "sinks": 1,
        "learnable_sink": True,
        "sink_init": -20.0,
        "block_size": 64,
        "executor": "auto",
    }
    assert data["spec"]["layers"] == [0, 2]
    assert data["plugins"]["rope"] == {"name": "yarn", "distribution": "lcplug", "version": lcplug.__version__}
    assert data["lcplug_version"] == lcplug.__version__
    assert data["base"]["max_position_embeddings"] == 256
    assert data["base"]["rope_parameters"]["rope_type"] == "default"


def test_round_trip_gives_identical_logits(saved, batch):
    model, path = saved
    ids, mask = batch
    loaded = lcplug.from_pretrained(path)
    assert torch.equal(logits(loaded, ids, mask), logits(model, ids, mask))
    assert lcplug.manifest_of(loaded)["spec"] == lcplug.manifest_of(model)["spec"]
    # the rope was not extended a second time on reload
    assert loaded.config.max_position_embeddings == 1024
    assert loaded.config.rope_parameters["factor"] == 4
    # and saving the reloaded model again gives the same manifest
    assert lcplug.manifest_of(loaded)["base"] == lcplug.manifest_of(model)["base"]


def test_plain_transformers_still_loads(saved, batch):
    _, path = saved
    ids, mask = batch
    plain = AutoModelForCausalLM.from_pretrained(path)
    assert plain.config.rope_parameters["rope_type"] == "yarn"  # standard part is understood
    reference = lcplug.unpatch(lcplug.from_pretrained(path))
    reference_rope = lcplug.patch(reference, rope="yarn:factor=4")
    # plain transformers == the rope-only part of the patch (attention needs lcplug)
    assert torch.allclose(logits(plain, ids, mask), logits(reference_rope, ids, mask), atol=1e-6)


def test_missing_plugin_names_distribution(saved):
    _, path = saved
    config = json.loads((path / "config.json").read_text())
    config["lcplug"]["plugins"]["attention"] = {
        "name": "ring-sparse",
        "distribution": "lcplug-ringsparse",
        "version": "2.1",
    }
    config["lcplug"]["spec"]["attention"]["name"] = "ring-sparse"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ManifestError, match="needs attention plugin 'ring-sparse' from distribution 'lcplug-ringsparse'"
    ):
        lcplug.from_pretrained(path)


def test_newer_major_version_is_refused(saved):
    _, path = saved
    config = json.loads((path / "config.json").read_text())
    config["lcplug"]["lcplug_version"] = "7.0.0"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ManifestError, match="newer major version"):
        lcplug.from_pretrained(path)


def test_unpatched_checkpoint_loads_plain(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path)
    model = lcplug.from_pretrained(tmp_path)
    assert lcplug.patch_state(model) is None


def test_missing_plugin_weights_is_an_error(saved):
    _, path = saved
    from safetensors.torch import load_file, save_file

    weights = load_file(path / "model.safetensors")
    save_file(
        {k: v for k, v in weights.items() if "lcplug" not in k}, path / "model.safetensors", metadata={"format": "pt"}
    )
    with pytest.raises(ManifestError, match="lacks plugin weights"):
        lcplug.from_pretrained(path)
