"""Faults of the disk tier end in a `KVCacheError` naming the file and block, never in other tokens, and
the cache directory goes away however the cache ends."""

from __future__ import annotations

import errno
import gc
import os
import stat

import pytest
import torch

import lcplug
from lcplug.kv import KVCacheError, TieredCache
from lcplug.testing import tiny_model

PROMPT = torch.randint(3, 128, (1, 300), generator=torch.Generator().manual_seed(5))


@pytest.fixture
def model():
    return tiny_model("llama", max_position_embeddings=1024)


def _prefilled(model, path, prefetch: bool = False) -> TieredCache:
    """A disk cache holding the prompt, spilled. Read-ahead off unless asked: a block read ahead before a
    test corrupts the file was read intact, and the fault would show one step later."""
    cache = TieredCache(model, tier="disk", hot_tokens=192, path=path, prefetch=prefetch)
    with torch.no_grad():
        model(input_ids=PROMPT, cache=cache)
    assert cache.stats()["spilled"] > 0
    return cache


def _decode(model, cache) -> None:
    with torch.no_grad():
        model(input_ids=PROMPT[:, -1:], cache=cache)


def test_corrupted_block_raises(model, tmp_path):
    with _prefilled(model, tmp_path) as cache:
        block_file = cache.directory / "layer000.kv"
        with open(block_file, "r+b") as f:
            f.seek(5)
            byte = f.read(1)
            f.seek(5)
            f.write(bytes([byte[0] ^ 0xFF]))
        with pytest.raises(KVCacheError, match=r"block 1 of .*layer000\.kv is corrupted"):
            _decode(model, cache)


def test_corrupted_block_raises_through_read_ahead(model, tmp_path):
    with _prefilled(model, tmp_path, prefetch=True) as cache:
        with open(cache.directory / "layer001.kv", "r+b") as f:
            f.write(b"\xff" * 8)
        with pytest.raises(KVCacheError, match=r"block 1 of .*layer001\.kv is corrupted"):
            for _ in range(2):  # layer 1 was read ahead during the prefill; the next step's read sees it
                _decode(model, cache)


def test_missing_block_raises(model, tmp_path):
    with _prefilled(model, tmp_path) as cache:
        os.truncate(cache.directory / "layer001.kv", 100)
        with pytest.raises(KVCacheError, match=r"block 1 of .*layer001\.kv is missing"):
            _decode(model, cache)


def test_disk_full_during_generate(model, tmp_path, monkeypatch):
    """ENOSPC on a spill mid-generation: a KVCacheError naming the block and file, no tokens, no files left."""
    real_pwrite, writes = os.pwrite, []

    def disk_full_after_prefill(fd, data, offset):
        writes.append(offset)
        if len(writes) > 12:  # the prefill spills blocks 1 and 2 of each of the 3 layers (K and V each)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", disk_full_after_prefill)
    lcplug.patch(model, kv=f"disk:hot_tokens=192,path={tmp_path}")
    with pytest.raises(KVCacheError, match=r"cannot write block 3 to .*layer000\.kv: No space left on device"):
        model.generate(PROMPT, max_new_tokens=24, min_new_tokens=24, do_sample=False)
    assert len(writes) == 13 and list(tmp_path.iterdir()) == []


def test_path_that_is_not_a_directory(model, tmp_path):
    not_dir = tmp_path / "file"
    not_dir.write_text("x")
    with pytest.raises(KVCacheError, match="is not a directory"):
        TieredCache(model, tier="disk", path=not_dir)
    with pytest.raises(KVCacheError, match="is not a directory"):
        lcplug.patch(model, kv=f"disk:path={not_dir}")
    assert lcplug.patch_state(model) is None


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only directory")
def test_unwritable_directory(model, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        with pytest.raises(KVCacheError, match="cannot create a cache directory"):
            lcplug.patch(model, kv=f"disk:path={locked}")
    finally:
        locked.chmod(0o700)


def test_private_directory_removed_on_close(model, tmp_path):
    cache = _prefilled(model, tmp_path)
    assert stat.S_IMODE(cache.directory.stat().st_mode) == 0o700
    assert sorted(p.name for p in cache.directory.iterdir()) == ["layer000.kv", "layer001.kv", "layer002.kv"]
    cache.close()
    cache.close()  # idempotent
    assert cache.closed and list(tmp_path.iterdir()) == []


def test_directory_removed_on_exception_and_gc(model, tmp_path):
    with pytest.raises(RuntimeError, match="boom"), _prefilled(model, tmp_path):
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    cache = _prefilled(model, tmp_path)
    del cache
    gc.collect()
    assert list(tmp_path.iterdir()) == []


def test_patched_generate_cleans_up_on_exception(model, tmp_path):
    from transformers import LogitsProcessor, LogitsProcessorList

    class Boom(LogitsProcessor):
        def __call__(self, input_ids, scores):
            if input_ids.shape[-1] > PROMPT.shape[-1]:
                raise RuntimeError("boom")
            return scores

    lcplug.patch(model, kv=f"disk:hot_tokens=192,path={tmp_path}")
    with pytest.raises(RuntimeError, match="boom"):
        model.generate(PROMPT, max_new_tokens=4, do_sample=False, logits_processor=LogitsProcessorList([Boom()]))
    assert list(tmp_path.iterdir()) == []
    model.generate(PROMPT, max_new_tokens=2, do_sample=False)  # no cache handed back: closed on return
    assert list(tmp_path.iterdir()) == []


def test_budget_too_small_for_pins(model, tmp_path):
    with pytest.raises(lcplug.ParamError, match="hot blocks cannot hold"):
        TieredCache(model, tier="host", hot_tokens=64, sink_blocks=1, recent_blocks=1)
    with pytest.raises(lcplug.ParamError):
        TieredCache(model, tier="disk", hot_tokens=64, path=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_beam_search_is_refused(model):
    lcplug.patch(model, kv="device")
    with pytest.raises(KVCacheError, match="beam search"):
        model.generate(PROMPT[:, :20], max_new_tokens=3, num_beams=2, do_sample=False)
