"""LongRoPE search on a tiny pretrained model: at 4x its trained length it beats plain PI on held-out text.

The model is pretrained here (a 2-layer byte-level Llama, 64 positions, 300 steps on the standard
library's top-level modules: ~10 s on one core). Calibration text (asyncio/) and held-out text (email/)
are other parts of the standard library, never seen in training.
"""

from __future__ import annotations

import json
import math
import sysconfig
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lcplug
from lcplug.cli import main
from lcplug.rope_search import RopeSearchError, SearchSettings, load_samples, perplexity, search_longrope

STDLIB = Path(sysconfig.get_paths()["stdlib"])
TRAINED, TARGET = 64, 256
BUDGET = SearchSettings(population=8, generations=4, mutations=4, crossovers=4, seed=0)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A 2-layer, 64-wide model trains ~15x faster on one thread than on two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level Llama pretrained on 64-token windows; saved, so the CLI can load it too."""
    text = b"".join(p.read_bytes() for p in sorted(STDLIB.glob("*.py")))
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=TRAINED,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    steps, lr = 300, 3e-3
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    for step in range(steps):
        starts = torch.randint(0, data.numel() - TRAINED, (8,), generator=generator)
        batch = torch.stack([data[s : s + TRAINED] for s in starts.tolist()])
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * (step + 1) / steps))
    path = tmp_path_factory.mktemp("tiny-byte-llama")
    model.save_pretrained(path)
    return path


def load(path: Path) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def held_out_perplexity(model, spec, samples) -> float:
    lcplug.patch(model, rope=spec)
    try:
        return perplexity(model, samples)
    finally:
        lcplug.unpatch(model)


def test_search_beats_position_interpolation_at_4x(pretrained):
    model = load(pretrained)
    calibration = load_samples(STDLIB / "asyncio", TARGET, 4, seed=0)
    result = search_longrope(model, calibration, settings=BUDGET, progress=False)
    factors = result.spec["long_factor"]
    assert len(factors) == 8 and factors == sorted(factors)  # one per rotary pair, non-decreasing
    assert all(1.0 <= f <= 1.25 * 4 for f in factors)
    assert result.spec["factor"] == 4.0 and result.spec["original_max_position_embeddings"] == TRAINED
    assert result.history == sorted(result.history, reverse=True)
    assert result.perplexity < result.baselines["linear"]
    assert lcplug.patch_state(model) is None  # every candidate was unpatched again
    held_out = load_samples(STDLIB / "email", TARGET, 8, seed=1)
    found = held_out_perplexity(model, result.spec, held_out)
    pi = held_out_perplexity(model, "linear:factor=4", held_out)
    assert found < pi, (found, pi)
    # the same seed and budget give the same factors
    assert search_longrope(model, calibration, settings=BUDGET, progress=False).spec == result.spec


def test_cli_writes_a_spec_that_patches(pretrained, tmp_path, capsys):
    output = tmp_path / "longrope.json"
    argv = ["rope-search", str(pretrained), "--target-length", str(TARGET), "--data", str(STDLIB / "asyncio")]
    argv += ["--samples", "2", "--population", "4", "--generations", "1", "--mutations", "2", "--crossovers", "2"]
    assert main([*argv, "--output", str(output)]) == 0
    out, err = capsys.readouterr()
    assert "rope-search" in err and "eval" in err  # the progress bar
    report, printed = out.strip().splitlines()
    assert report.startswith(f"perplexity at {TARGET} tokens (2 samples): no extension ")
    spec = json.loads(output.read_text())
    assert json.loads(printed) == spec and spec["name"] == "longrope"
    model = lcplug.patch(load(pretrained), rope=json.loads(output.read_text()))
    assert lcplug.manifest_of(model)["spec"]["rope"]["long_factor"] == spec["long_factor"]
    assert model.config.max_position_embeddings == TARGET


def test_search_refuses_bad_input(pretrained, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    for argv, needle in [
        (["--target-length", "32"], "target length 32 must be above the original length 64"),
        (["--target-length", "256", "--data", str(short)], "found 0 document(s) of at least 256 tokens"),
        (["--target-length", "256", "--data", str(tmp_path / "missing")], "neither a file nor a directory"),
        (["--target-length", "256", "--generations", "-1"], "generations=-1 must be >= 0"),
        (["--target-length", "0"], "expected an integer >= 1, got 0"),
    ]:
        assert main(["rope-search", str(pretrained), "--no-progress", *argv]) == 2
        assert needle in capsys.readouterr().err
    model = lcplug.patch(load(pretrained), rope="linear:factor=2")
    with pytest.raises(RopeSearchError, match="needs an unpatched model"):
        search_longrope(model, load_samples(STDLIB / "asyncio", TARGET, 1))
