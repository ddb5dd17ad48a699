"""The Hub tests' fixtures: a fake Hub that huggingface_hub really talks to, and a patched tiny checkpoint.

huggingface_hub reads HF_ENDPOINT, HF_HUB_DISABLE_XET and HF_HUB_CACHE once, when it is imported, into
`huggingface_hub.constants`; by the time a fixture runs it has long been imported (by transformers). So
the `hub` fixture sets the environment variables (for anything that reads them later, e.g. a
subprocess) and also patches those constants for this process, and drops transformers' cached HfApi
(made with the endpoint of its day). lcplug itself passes no endpoint: it goes wherever huggingface_hub
goes, so the same redirection covers lcplug's calls and plain transformers' calls alike.
"""

from __future__ import annotations

import pytest
import torch

import lcplug
from lcplug.testing import tiny_model
from lcplug.testing.hub_server import FakeHub

TOKEN = "hf_lcplugTestToken0123456789abcdef"
SPEC = {"attention": "sliding-window:window=5,sinks=1,learnable_sink=true", "rope": "yarn:factor=4", "layers": "0,2"}


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A running FakeHub (requiring TOKEN for writes) that every huggingface_hub call in the test goes to."""
    import transformers.utils.hub
    from huggingface_hub import constants

    with FakeHub(token=TOKEN) as server:
        for name, value in {
            "HF_ENDPOINT": server.url,
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_CACHE": str(tmp_path / "hf-cache"),
            "HF_TOKEN": TOKEN,
        }.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-token"))
        monkeypatch.setattr(transformers.utils.hub, "_hf_api", None)
        yield server


@pytest.fixture
def tokenizer():
    """A word-level tokenizer over the tiny models' 128 ids, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({f"w{i}": i for i in range(128)}, unk_token="w3"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="w3", pad_token="w0", eos_token="w2")


@pytest.fixture
def patched():
    """A tiny Qwen3 with sliding-window attention (learned sinks, made non-default) on layers 0 and 2 and YaRN."""
    model = lcplug.patch(tiny_model("qwen3"), SPEC)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "sink_logit" in name:
                p.copy_(torch.linspace(-1, 1, p.numel()))
    return model


@pytest.fixture
def saved(patched, tokenizer, tmp_path):
    """The patched model and its tokenizer saved to a directory, as a user would before publishing."""
    directory = tmp_path / "checkpoint"
    lcplug.save_pretrained(patched, directory)
    tokenizer.save_pretrained(directory)
    return directory
