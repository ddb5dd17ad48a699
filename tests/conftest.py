"""Shared fixtures: tiny models and token batches (a left-padded row included)."""

from __future__ import annotations

import pytest
import torch

from lcplug.testing import tiny_model

# Tiny models gain nothing from intra-op threads and lose a lot when the two cores are shared.
torch.set_num_threads(1)


@pytest.fixture
def batch():
    """Two rows of 20 tokens; row 0 is left-padded by 5."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (2, 20), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    ids[0, :5] = 0
    return ids, mask


@pytest.fixture
def llama():
    return tiny_model("llama")
