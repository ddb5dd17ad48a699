"""`linear` and `yarn` on every family equal a model transformers builds with the same rope_parameters.

The reference is independent of lcplug's rope code path: transformers constructs a fresh model from a
config holding the standard parameters lcplug wrote, and the original weights are loaded into it.
Partial rotary (Phi-3, GPT-NeoX) and per-layer-type rope (Gemma-3) included. fp32, logits within 1e-6,
at a length past the original context.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import lcplug
from lcplug.testing import FAMILIES, tiny_model
from lcplug.testing.models import NATIVE_ATTENTION

SPECS = {
    "linear": "linear:factor=2",
    "yarn": "yarn:factor=4",
    "yarn-all-params": "yarn:factor=8,original_max_position_embeddings=128,beta_fast=16,beta_slow=2,"
    "mscale=1.2,mscale_all_dim=0.8,truncate=false",
}


def transformers_twin(patched):
    config = copy.deepcopy(patched.config)
    del config.lcplug
    twin = AutoModelForCausalLM.from_config(
        config, attn_implementation=NATIVE_ATTENTION.get(config.model_type, "sdpa"), dtype=torch.float32
    ).eval()
    missing, unexpected = twin.load_state_dict(patched.state_dict(), strict=False)
    assert not missing and not unexpected
    return twin


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("which", list(SPECS))
def test_rope_equals_transformers(family, which):
    model = tiny_model(family)
    base_params = copy.deepcopy(model.config.rope_parameters)
    lcplug.patch(model, rope=SPECS[which])
    params = model.config.rope_parameters
    sub = params.get("full_attention", params) if "rope_type" not in params else params
    assert sub["rope_type"] == which.split("-")[0]
    twin = transformers_twin(model)
    ids = torch.randint(3, 128, (1, 300), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out, ref = model(ids).logits, twin(ids).logits
    assert (out - ref).abs().max() <= 1e-6
    lcplug.unpatch(model)
    assert model.config.rope_parameters == base_params


def test_rope_changes_long_positions_only_as_expected():
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
        lcplug.patch(model, rope="linear:factor=4")
        after = model(ids).logits
    assert not torch.allclose(before, after, atol=1e-4)
    assert model.config.max_position_embeddings == 4 * 256
