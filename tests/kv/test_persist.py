"""Save and reopen: a saved cache continues a session exactly, opens only against the model that wrote it,
and a damaged or failed save ends in a `KVCacheError` naming the file."""

from __future__ import annotations

import errno

import pytest
import torch

import lcplug
from lcplug.kv import KVCacheError, TieredCache, persist
from lcplug.testing import padded_batch, tiny_model

ATTENTION = {
    "dense": None,
    "loza": "loza:block=32,local_blocks=3,sparse_layers=0;2",  # pattern layers 0, 2 drop blocks; layer 1 dense
    "dsa": "dsa:stage=sparse,topk=64,block_size=32,heads=2,dim=8",  # index keys are saved too
}
FIRST, THEN = 6, 6
SLIDING = "sliding-window:window=96,sinks=4,block_size=32"
PROMPT = torch.randint(3, 128, (1, 300), generator=torch.Generator().manual_seed(5))


def _model(attention: str | None, seed: int = 0):
    model = tiny_model("llama", seed=seed, max_position_embeddings=1024)
    return lcplug.patch(model, attention=attention) if attention else model


def _greedy(model, ids, mask, new_tokens, **kwargs):
    return model.generate(
        ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **kwargs
    )


def _saved(model, path, tier="host"):
    """A cache of PROMPT (a plain forward), saved to `path`."""
    with TieredCache(model, tier=tier, hot_tokens=192) as cache, torch.no_grad():
        model(input_ids=PROMPT, cache=cache)
        cache.save(path)


@pytest.mark.parametrize(("variant", "reopen"), [("dense", None), ("loza", None), ("loza", "host"), ("dsa", "device")])
def test_reopened_cache_continues_the_session(variant, reopen, tmp_path):
    """prefill + FIRST tokens, save, reopen, THEN more tokens == FIRST + THEN tokens with the default cache."""
    model = _model(ATTENTION[variant])
    ids, mask = padded_batch(300, seed=3, pad=7)
    expected = _greedy(model, ids, mask, FIRST + THEN)
    (tmp_path / "tier").mkdir()
    lcplug.patch(model, attention=ATTENTION[variant], kv=f"disk:hot_tokens=192,path={tmp_path / 'tier'}")
    first = _greedy(model, ids, mask, FIRST, return_dict_in_generate=True)
    first.cache.save(tmp_path / "saved")
    before = first.cache.stats()
    first.cache.close()
    assert before["spilled"] > 0, before  # spilled blocks are read back into the saved files
    saved_layers = persist.read_index(tmp_path / "saved")["layers"]
    if variant == "loza":  # a pattern layer saves only the blocks it still holds
        assert len(saved_layers[0]["blocks"]) < saved_layers[0]["length"] // 32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved", "tier"]  # no staging directory left
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == [
        "index.json",
        "layer000.safetensors",
        "layer001.safetensors",
        "layer002.safetensors",
    ]

    cache = TieredCache.open(model, tmp_path / "saved", tier=reopen, path=tmp_path / "tier")
    assert cache.tier == (reopen or "disk")
    after = cache.stats()
    if reopen is None:  # the same tier and settings: the same state, dropped blocks still dropped
        assert {k: after[k] for k in ("hot", "spilled", "dropped")} == {
            k: before[k] for k in ("hot", "spilled", "dropped")
        }
    assert after["dropped"] == before["dropped"]
    mask = torch.cat([mask, torch.ones_like(first.sequences[:, ids.shape[1] :])], dim=1)
    out = _greedy(model, first.sequences, mask, THEN, cache=cache)
    cache.close()
    assert torch.equal(out, expected)
    assert list((tmp_path / "tier").iterdir()) == []


def test_open_refuses_another_model(tmp_path):
    model = _model(SLIDING)
    _saved(model, tmp_path / "saved")
    others = {
        "weights (input embeddings, layer 0 attention k_proj.weight": _model(SLIDING, seed=1),
        "lcplug patch attention.window (saved 96, model 64)": _model(SLIDING.replace("96", "64")),
        "lcplug patch attention (saved {": _model(None),
        "config field num_key_value_heads (saved 2, model 4)": lcplug.patch(
            tiny_model("llama", num_key_value_heads=4, max_position_embeddings=1024), attention=SLIDING
        ),
    }
    for message, other in others.items():
        with pytest.raises(KVCacheError, match="belongs to another model") as info:
            TieredCache.open(other, tmp_path / "saved")
        assert message in str(info.value)
    TieredCache.open(model, tmp_path / "saved").close()  # the model that wrote it opens it


def test_open_refuses_another_block_size(tmp_path):
    model = _model(None)
    _saved(model, tmp_path / "saved")
    with pytest.raises(KVCacheError, match="saved with blocks of 64 tokens but this cache uses 32"):
        TieredCache.open(model, tmp_path / "saved", block_size=32)


def test_damaged_saved_cache_is_refused(tmp_path):
    model = _model(None)
    _saved(model, tmp_path / "saved")
    (tmp_path / "tier").mkdir()
    layer_file = tmp_path / "saved" / "layer001.safetensors"
    data = bytearray(layer_file.read_bytes())
    data[-5] ^= 0xFF
    layer_file.write_bytes(bytes(data))
    with pytest.raises(KVCacheError, match=r"saved layer file .*layer001\.safetensors is corrupted \(checksum"):
        TieredCache.open(model, tmp_path / "saved", tier="disk", path=tmp_path / "tier")
    assert list((tmp_path / "tier").iterdir()) == []  # the half-built cache was closed
    (tmp_path / "saved" / "index.json").unlink()
    with pytest.raises(KVCacheError, match=r"is not a saved cache: index\.json is missing"):
        TieredCache.open(model, tmp_path / "saved")


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    model = _model(None)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    with pytest.raises(KVCacheError, match="exists and is not an empty directory"):
        _saved(model, tmp_path / "taken")
    real_open, calls = open, []

    def disk_full_on_second_file(file, mode="r", *args, **kwargs):
        calls.append(file)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(persist, "open", disk_full_on_second_file, raising=False)
    with pytest.raises(KVCacheError, match=r"cannot write .*layer001\.safetensors: No space left on device"):
        _saved(model, tmp_path / "saved")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
