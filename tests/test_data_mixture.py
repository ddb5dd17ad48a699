"""Mixtures: weights and their normalisation, ProLong presets, length upsampling, curriculum, lengths."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from lcplug.data import DataConfig, DataError, Domain, PackedLoader, normalise, parse_domains


def docs_file(path: Path, lengths: list[int], tag: str) -> str:
    """A JSON-lines file of documents of the given lengths (in bytes), each distinct."""
    path.write_text("".join(json.dumps({"text": f"{tag}{i}:".ljust(n, "x")}) + "\n" for i, n in enumerate(lengths)))
    return str(path)


def test_weight_forms_parse_alike():
    expected = [Domain("code", 0.3), Domain("books", 0.7)]
    assert parse_domains("code@0.3, books@0.7") == expected
    assert parse_domains({"code": 0.3, "books": "0.7"}) == expected
    listed = parse_domains(
        [{"source": "code", "weight": 0.3, "max_doc_tokens": 64}, {"source": "books", "weight": 0.7}]
    )
    assert listed[0].max_doc_tokens == 64 and listed[0].label == "code@64"
    for bad, match in (("code=0.3", "source@weight"), ("code@lots", "not a number"), ("code@-1", ">= 0")):
        with pytest.raises(DataError, match=match):
            parse_domains(bad)
    with pytest.raises(DataError, match="unknown key 'wieght'"):
        parse_domains([{"source": "code", "weight": 1, "wieght": 2}])


def test_weights_not_summing_to_one_are_normalised_with_a_warning():
    with pytest.warns(UserWarning, match=r"sum to 100, not 1; normalised to code@0.3, books@0.7"):
        domains = normalise(parse_domains("code@30,books@70"), ["code", "books"])
    assert [d.weight for d in domains] == pytest.approx([0.3, 0.7])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(normalise(parse_domains("code@0.4,books@0.6,web@0"), ["code", "books", "web"])) == 2
    with pytest.raises(DataError, match="unknown data source 'bookz'; did you mean 'books'"):
        normalise(parse_domains("code@0.5,bookz@0.5"), ["code", "books"])
    with pytest.raises(DataError, match="every mixture weight is 0"):
        normalise(parse_domains("code@0"), ["code"])
    with pytest.raises(DataError, match="twice"):
        normalise(parse_domains("code@0.5,code@0.5"), ["code"])


def test_realised_token_shares_follow_the_weights(tmp_path):
    short = docs_file(tmp_path / "short.jsonl", [40] * 300, "s")
    long = docs_file(tmp_path / "long.jsonl", [700] * 40, "l")
    config = {
        "seq_len": 256,
        "batch_size": 4,
        "sources": {"short": {"name": "text", "paths": [short]}, "long": {"name": "text", "paths": [long]}},
        "mixture": "short@0.25,long@0.75",
    }
    loader = PackedLoader(config)
    for _ in range(20):
        next(loader)
    total = sum(loader.tokens.values())
    assert total == 20 * 4 * 256 and loader.padding == 0
    assert loader.tokens["short"] / total == pytest.approx(0.25, abs=0.02)
    equal = PackedLoader({**config, "mixture": None})
    assert [d.weight for d in equal.domains] == [0.5, 0.5]


def test_prolong_presets_map_onto_the_recipe_sources(tmp_path):
    doc = docs_file(tmp_path / "d.jsonl", [100] * 5, "d")
    sources = {name: {"name": "text", "paths": [doc]} for name in ("code", "books", "web")}
    domains = DataConfig(
        sources, mixture={"name": "prolong-64k", "map": {"code-repos": "code", "short": "web"}}, seq_len=64
    ).domains()
    assert {d.label: round(d.weight, 6) for d in domains} == {"code": 0.3, "books": 0.3, "web": 0.4}
    two = {k: v for k, v in sources.items() if k != "books"}
    with pytest.warns(UserWarning, match="domains books have no source"):
        domains = DataConfig(
            two, mixture={"name": "prolong-64k", "map": {"code-repos": "code", "short": "web"}}, seq_len=64
        ).domains()
    assert {d.label: round(d.weight, 4) for d in domains} == {"code": 0.4286, "web": 0.5714}
    mapping = {"code-repos": "code", "books": ["books", "web"], "short": "web"}
    domains = DataConfig(sources, mixture={"name": "prolong-512k", "map": mapping}, seq_len=64).domains()
    weights = {d.label: round(d.weight, 6) for d in domains}
    assert weights == {
        "code": 0.15,
        "code@65536": 0.15,
        "books": 0.025,  # books' 5% at full length and 25% cut at 64K are split with web
        "books@65536": 0.125,
        "web": 0.425,
        "web@65536": 0.125,
    }
    with pytest.raises(DataError, match="map key 'kode'"):
        DataConfig(sources, mixture={"name": "prolong-64k", "map": {"kode": "code"}}, seq_len=64).domains()
    with pytest.raises(DataError, match="is a source, not a mixture"):
        DataConfig(sources, mixture="code", seq_len=64).domains()


def test_length_upsampling_raises_the_long_share_and_keeps_the_mixture(tmp_path):
    lengths = ([1000] + [50] * 47) * 30  # 30% of the tokens in long documents, spread through the file
    path = docs_file(tmp_path / "mixed.jsonl", lengths, "m")
    other = docs_file(tmp_path / "other.jsonl", [60] * 500, "o")

    def realised(long_share):
        weights = {"name": "mixture", "weights": "mixed@0.5,other@0.5", "long_threshold": 500}
        if long_share:
            weights["long_share"] = long_share
        loader = PackedLoader(
            {
                "seq_len": 1024,
                "batch_size": 4,
                "sources": {"mixed": {"name": "text", "paths": [path]}, "other": {"name": "text", "paths": [other]}},
                "mixture": weights,
            }
        )
        for _ in range(40):
            next(loader)
        stats = loader.streams[0].stats
        long = sum(n for bucket, n in stats.length_tokens.items() if 2**bucket >= 512)
        return long / stats.tokens, loader.tokens["mixed"] / sum(loader.tokens.values())

    natural, share = realised(None)
    assert natural == pytest.approx(0.3, abs=0.07) and share == pytest.approx(0.5, abs=0.02)
    upsampled, share = realised(0.7)
    assert upsampled == pytest.approx(0.7, abs=0.08) and share == pytest.approx(0.5, abs=0.02)


def test_curriculum_lengths_over_steps_keep_tokens_per_batch(tmp_path):
    doc = docs_file(tmp_path / "d.jsonl", [300] * 200, "d")
    config = {
        "seq_len": 256,
        "batch_size": 8,
        "curriculum": [{"step": 2, "seq_len": 512}, {"step": 4, "seq_len": 1024, "batch_size": 3}],
        "sources": {"d": {"name": "text", "paths": [doc]}},
    }
    loader = PackedLoader(config)
    shapes = [tuple(next(loader)["input_ids"].shape) for _ in range(6)]
    assert shapes == [(8, 256), (8, 256), (4, 512), (4, 512), (3, 1024), (3, 1024)]
    assert DataConfig.from_dict(config).cut(loader.domains[0]) == 1024  # documents cut at the longest row
    with pytest.raises(DataError, match="steps must increase"):
        DataConfig.from_dict({**config, "curriculum": [{"step": 3, "seq_len": 64}, {"step": 3, "seq_len": 128}]})


def test_training_beyond_the_evaluation_length():
    sources = {"code": "code"}
    assert DataConfig(sources, eval_length=4096).seq_len == 8192
    with pytest.warns(UserWarning, match=r"shorter than data\.eval_length"):
        DataConfig(sources, seq_len=2048, eval_length=4096)
    with pytest.raises(DataError, match=r"data\.seq_len is required"):
        DataConfig(sources)
    with pytest.raises(DataError, match="unknown data key 'seqlen'; did you mean 'seq_len'"):
        DataConfig.from_dict({"sources": sources, "seqlen": 8})
    with pytest.raises(DataError, match=r"data\.batch_size got 0"):
        DataConfig(sources, seq_len=64, batch_size=0)
