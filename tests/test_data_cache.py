"""The token cache: hits give the very batches of an uncached run, changes invalidate, corruption is survived."""

from __future__ import annotations

import builtins
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lcplug.data import DataContext, DataError, PackedLoader, TokenStream, load_text_tokenizer, train_bpe
from lcplug.data.cache import SUFFIX, TokenCache, tokenizer_fingerprint
from lcplug.data.fileindex import SUFFIX as INDEX_SUFFIX
from lcplug.eval.haystack import stdlib_source

KEYS = ("input_ids", "labels", "position_ids", "doc_ids", "cu_seqlens")


@pytest.fixture(scope="module")
def bpe():
    texts = [p.read_text() for p in sorted((stdlib_source() / "json").glob("*.py"))]
    return train_bpe(texts, vocab_size=700)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """Two code repositories and a text directory (a book in pieces, JSON lines with a repeated record)."""
    for r in range(2):
        for m in range(3):
            path = tmp_path / "code" / f"repo{r}" / f"mod{m}.py"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"from . import mod{(m + 1) % 3}\n" + f"value_{r}_{m} = {r * m} + 1\n" * (30 + 20 * m))
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "book.txt").write_text("".join(f"A line of the book, number {i}.\n" for i in range(300)))
    records = [{"text": f"record {i % 7}: " + "words " * (3 + i % 11)} for i in range(40)]
    (tmp_path / "text" / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return tmp_path


def config(tree: Path, cache: Path | None, **extra) -> dict:
    return {
        "seed": 1,
        "seq_len": 256,
        "batch_size": 2,
        "repeat": False,
        "cache_dir": None if cache is None else str(cache),
        "sources": {
            "code": {"name": "code", "path": str(tree / "code")},
            "text": {"name": "text", "paths": [str(tree / "text")], "piece_bytes": 1024},
        },
        **extra,
    }


def everything(loader: PackedLoader, n: int | None = None) -> list[dict]:
    return [b for _, b in zip(range(n) if n is not None else iter(int, 1), loader)]


def same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in KEYS)


def shards(cache: Path) -> list[Path]:
    return sorted(cache.glob(f"*/*{SUFFIX}"))


@pytest.fixture
def opened(monkeypatch, tree) -> list[str]:
    """The files of the tree's code and plain text that get opened from now on (JSON lines are content-keyed)."""
    seen: list[str] = []
    original = builtins.open

    def counting(file, *args, **kwargs):
        name = os.fspath(file) if isinstance(file, (str, os.PathLike)) else ""
        if name.startswith((str(tree / "code"), str(tree / "text"))) and not name.endswith(".jsonl"):
            seen.append(name)
        return original(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting)
    monkeypatch.setattr(io, "open", counting)  # what pathlib's read_bytes/read_text/open call
    return seen


def test_the_cache_gives_the_ids_of_the_tokenizer(bpe, tmp_path):
    tokenizer = load_text_tokenizer(bpe)
    texts = ["def f(x):\n    return x + 1\n", "", "é and 漢字 too", "def f(x):\n    return x + 1\n", "  spaces "]
    reference = [e.ids for e in bpe.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]
    cache = TokenCache(tmp_path, tokenizer)
    for reads in range(3):  # tokenized (the repeat once), from memory, from the shard in a new cache
        if reads == 2:
            cache.flush()
            cache = TokenCache(tmp_path, tokenizer)
        got = cache.encode_batch(texts)
        assert [g.tolist() for g in got] == reference and all(g.dtype == np.int32 for g in got)
        assert (cache.misses, cache.hits) == [(3, 1), (3, 5), (0, 4)][reads]
    assert len(shards(tmp_path)) == 1


def test_a_warm_cache_gives_the_batches_of_an_uncached_run_without_tokenizing(bpe, tree, tmp_path, monkeypatch):
    reference = everything(PackedLoader(config(tree, None), tokenizer=bpe))
    cold = PackedLoader(config(tree, tmp_path / "cache"), tokenizer=bpe)
    assert same(everything(cold), reference)
    assert cold.cache.misses > 0 and shards(tmp_path / "cache")  # written when each source's epoch ended

    calls = []
    original = type(cold.tokenizer).encode_batch
    monkeypatch.setattr(type(cold.tokenizer), "encode_batch", lambda self, t: calls.append(t) or original(self, t))
    warm = PackedLoader(config(tree, tmp_path / "cache"), tokenizer=bpe)
    assert same(everything(warm), reference)
    assert warm.cache.misses == 0 and warm.cache.hits == cold.cache.hits + cold.cache.misses and not calls


def test_later_epochs_read_the_shard_the_first_wrote(bpe, tree, tmp_path):
    tokenizer = load_text_tokenizer(bpe)

    def stream(cache: TokenCache | None) -> TokenStream:
        source = DataContext(tokenizer).build_source({"name": "code", "path": str(tree / "code")}, "code")
        return TokenStream(source, tokenizer, max_doc_tokens=10**6, batch_chars=500, cache=cache)

    cache = TokenCache(tmp_path, tokenizer)
    plain, cached = stream(None), stream(cache)
    for _ in range(6):  # three epochs of two repositories
        assert np.array_equal(plain.next_doc().ids, cached.next_doc().ids)
    assert cached.source.epoch >= 2 and cache.misses == 6 and cache.hits >= 12  # 3 files x 2 repositories, once
    assert len(shards(tmp_path)) == 1  # written when the first epoch ended; nothing new since


def test_a_changed_file_or_tokenizer_misses(bpe, tree, tmp_path):
    cache = tmp_path / "cache"
    everything(PackedLoader(config(tree, cache), tokenizer=bpe))
    mod = tree / "code" / "repo1" / "mod2.py"
    mod.write_text(mod.read_text().replace("value_1_2 = 2", "value_1_2 = 3", 1))  # same size, new content
    loader = PackedLoader(config(tree, cache), tokenizer=bpe)
    assert same(everything(loader), everything(PackedLoader(config(tree, None), tokenizer=bpe)))
    assert loader.cache.misses == 1 and loader.cache.hits > 0  # only the edited file is tokenized again

    other = train_bpe([p.read_text() for p in sorted((stdlib_source() / "json").glob("*.py"))], vocab_size=500)
    retrained = PackedLoader(config(tree, cache), tokenizer=other)
    assert same(everything(retrained), everything(PackedLoader(config(tree, None), tokenizer=other)))
    assert retrained.cache.hits == 0 and len({p.parent for p in shards(cache)}) == 2  # a directory per tokenizer


def corrupt_truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-7])


def corrupt_token(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x5A  # inside the last entry's tokens: header and sizes still check out
    path.write_bytes(bytes(data))


def corrupt_magic(path: Path) -> None:
    path.write_bytes(b"garbage!" + path.read_bytes()[8:])


@pytest.mark.parametrize("damage", [corrupt_truncated, corrupt_token, corrupt_magic])
def test_a_corrupt_shard_is_removed_with_a_warning_and_never_read(bpe, tree, tmp_path, damage):
    cache = tmp_path / "cache"
    reference = everything(PackedLoader(config(tree, cache), tokenizer=bpe))
    shard, *others = shards(cache)
    damage(shard)
    with pytest.warns(UserWarning, match="is corrupt or mismatched"):
        loader = PackedLoader(config(tree, cache), tokenizer=bpe)
        assert same(everything(loader), reference)
    assert loader.cache.misses > 0 and loader.cache.hits > 0  # only the damaged shard's text is tokenized again
    rebuilt = set(shards(cache)) - set(others)
    assert shard not in rebuilt and len(rebuilt) == 1


def test_a_shard_of_another_tokenizer_is_refused(bpe, tree, tmp_path):
    cache = tmp_path / "cache"
    everything(PackedLoader(config(tree, cache), tokenizer=bpe))
    shard = shards(cache)[0]
    other = train_bpe([p.read_text() for p in sorted((stdlib_source() / "json").glob("*.py"))], vocab_size=500)
    moved = cache / tokenizer_fingerprint(load_text_tokenizer(other)) / shard.name
    moved.parent.mkdir()
    shutil.copy(shard, moved)  # the first tokenizer's tokens in the second's directory
    with pytest.warns(UserWarning, match=f"written for format 1 / tokenizer {shard.parent.name}"):
        loader = PackedLoader(config(tree, cache), tokenizer=other)
    assert same(everything(loader), everything(PackedLoader(config(tree, None), tokenizer=other)))
    assert loader.cache.hits == 0 and not moved.exists()


def test_resume_with_a_cache(bpe, tree, tmp_path):
    cache = tmp_path / "cache"
    recipe = config(tree, cache, repeat=True)
    whole = everything(PackedLoader(config(tree, None, repeat=True), tokenizer=bpe), 16)
    for stop in (2, 7):
        loader = PackedLoader(recipe, tokenizer=bpe)
        assert same(everything(loader, stop), whole[:stop])
        state = json.loads(json.dumps(loader.state_dict()))
        loader.close()
        resumed = PackedLoader(recipe, tokenizer=bpe)
        resumed.load_state_dict(state)
        assert same(everything(resumed, 16 - stop), whole[stop:]), f"resumed after {stop} batches"
        assert resumed.cache.hits > 0


def test_bad_cache_settings(bpe, tree, tmp_path):
    with pytest.raises(DataError, match=r"data.cache_dir got 3; valid: a directory path"):
        PackedLoader(config(tree, None, cache_dir=3), tokenizer=bpe)
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="cannot create"):
        PackedLoader(config(tree, tmp_path / "file"), tokenizer=bpe)
    loader = PackedLoader(config(tree, tmp_path / "bytes-cache"), tokenizer="bytes")
    everything(loader)
    assert loader.cache is None and not (tmp_path / "bytes-cache").exists()  # bytes need no cache


def test_a_warm_pass_reads_no_file_it_knows(bpe, tree, tmp_path, opened):
    cache = tmp_path / "cache"
    reference = everything(PackedLoader(config(tree, None), tokenizer=bpe))
    assert same(everything(PackedLoader(config(tree, cache), tokenizer=bpe)), reference)
    assert opened and list(cache.glob(f"*/*{INDEX_SUFFIX}"))  # read once, identities recorded
    opened.clear()
    warm = PackedLoader(config(tree, cache), tokenizer=bpe)
    assert same(everything(warm), reference)
    assert opened == [] and warm.cache.misses == 0  # no file read, no import scan, nothing tokenized

    verified = PackedLoader(config(tree, cache, cache_verify=True), tokenizer=bpe)
    assert same(everything(verified), reference)
    assert len(set(opened)) == 7 and verified.cache.misses == 0  # every code and text file read and hashed


def test_an_edited_file_is_read_again_and_changes_the_batches(bpe, tree, tmp_path, opened):
    cache = tmp_path / "cache"
    before = everything(PackedLoader(config(tree, cache), tokenizer=bpe))
    mod = tree / "code" / "repo1" / "mod2.py"
    text = mod.read_text()
    mod.write_text(text.replace("value_1_2 = 2", "value_1_2 = 3", 1))  # same size, new mtime and content
    opened.clear()
    after = everything(PackedLoader(config(tree, cache), tokenizer=bpe))
    repo = sorted(str(p) for p in mod.parent.iterdir())  # its repository's import scan reads the others once
    assert sorted(opened) == sorted([*repo, str(mod)])  # and only it is read as a piece; nothing else
    assert same(after, everything(PackedLoader(config(tree, None), tokenizer=bpe))) and not same(after, before)


def test_a_touched_identical_file_is_read_hashed_and_still_right(bpe, tree, tmp_path, opened):
    cache = tmp_path / "cache"
    before = everything(PackedLoader(config(tree, cache), tokenizer=bpe))
    mod, book = tree / "code" / "repo0" / "mod1.py", tree / "text" / "book.txt"
    for path in (mod, book):
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    opened.clear()
    touched = PackedLoader(config(tree, cache), tokenizer=bpe)
    assert same(everything(touched), before)
    scanned = {str(p) for p in mod.parent.iterdir()}  # its repository's order is derived again
    assert set(opened) == scanned | {str(book)} and touched.cache.misses == 0  # same text: no tokenizing
    opened.clear()
    assert same(everything(PackedLoader(config(tree, cache), tokenizer=bpe)), before) and opened == []


def test_resume_with_a_warm_cache_reads_nothing(bpe, tree, tmp_path, opened):
    cache = tmp_path / "cache"
    everything(PackedLoader(config(tree, cache), tokenizer=bpe))
    whole = everything(PackedLoader(config(tree, None, repeat=True), tokenizer=bpe), 16)
    opened.clear()
    loader = PackedLoader(config(tree, cache, repeat=True), tokenizer=bpe)
    assert same(everything(loader, 7), whole[:7])
    resumed = PackedLoader(config(tree, cache, repeat=True), tokenizer=bpe)
    resumed.load_state_dict(json.loads(json.dumps(loader.state_dict())))
    assert same(everything(resumed, 9), whole[7:]) and opened == []


def test_a_corrupt_index_is_removed_and_its_files_read_again(bpe, tree, tmp_path, opened):
    cache = tmp_path / "cache"
    reference = everything(PackedLoader(config(tree, cache), tokenizer=bpe))
    indexes = list(cache.glob(f"*/*{INDEX_SUFFIX}"))  # one per source, written as its epoch ended
    for index in indexes:
        data = bytearray(index.read_bytes())
        data[-40] ^= 0x01  # one bit
        index.write_bytes(bytes(data))
    opened.clear()
    with pytest.warns(UserWarning, match="token cache index .* is corrupt or mismatched"):
        loader = PackedLoader(config(tree, cache), tokenizer=bpe)
    assert same(everything(loader), reference) and opened and loader.cache.misses == 0
    assert not any(index.exists() for index in indexes)


def test_bad_cache_verify(bpe, tree):
    with pytest.raises(DataError, match=r"data.cache_verify got 'yes'; valid: true or false"):
        PackedLoader(config(tree, None, cache_verify="yes"), tokenizer=bpe)
