"""Shared fixtures: tiny models and token batches (a left-padded row included)."""

from __future__ import annotations

import pytest
import torch

from lcplug.testing import padded_batch, tiny_model

# Tiny models gain nothing from intra-op threads and lose a lot when the two cores are shared.
torch.set_num_threads(1)


@pytest.fixture
def batch():
    """Two rows of 20 tokens; row 0 is left-padded by 5."""
    return padded_batch(20, seed=1)


@pytest.fixture
def llama():
    return tiny_model("llama")
