"""A published repo is an ordinary transformers checkpoint for its standard parts."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

import lcplug
from lcplug.testing import logits


def test_plain_transformers_loads_weights_and_standard_rope(hub, saved, patched, batch):
    lcplug.publish(saved, "me/plain")
    plain = AutoModelForCausalLM.from_pretrained("me/plain")
    assert plain.config.rope_parameters["rope_type"] == "yarn" and plain.config.rope_parameters["factor"] == 4
    # plain transformers == the model with the rope patch only: the sparse attention needs lcplug
    rope_only = lcplug.patch(lcplug.unpatch(patched), rope="yarn:factor=4")
    ids, mask = batch
    assert torch.allclose(logits(plain, ids, mask), logits(rope_only, ids, mask), atol=1e-6)
    card = hub.repos["me/plain"].files()["README.md"].decode()
    assert "The sparse attention and other runtime patches need lcplug" in card
