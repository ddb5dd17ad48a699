"""Synthetic builders: retrieval tasks with controlled length and depth, paraphrase samples, megadocs."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest

from lcplug.data import DataContext, DataError, PackedLoader, Piece, Source, load_text_tokenizer

BYTES = load_text_tokenizer()


def build(spec, name: str = "task", **ctx) -> Source:
    return DataContext(BYTES, **ctx).build_source(spec, name)


def split(piece: Piece) -> tuple[str, str]:
    """(prompt, trained part) of a byte-level sample."""
    ids = np.asarray(piece.ids, dtype=np.uint8)
    mask = np.asarray(piece.mask, dtype=bool)
    assert mask.any() and not mask[: np.argmax(mask)].any() and mask[np.argmax(mask) :].all()  # the answer, at the end
    return bytes(ids[~mask]).decode(), bytes(ids[mask]).decode()


@pytest.mark.parametrize("task", ["passkey", "needle", "multikey"])
def test_needles_exact_length_depth_and_answer(task):
    source = build({"name": "needles", "task": task, "lengths": [300, 500], "depths": [0.0, 1.0], "keys": 3})
    lengths = set()
    for _ in range(8):
        piece = source.next()
        prompt, answer = split(piece)
        key = re.fullmatch(r" (\d{5})\.", answer).group(1)
        lengths.add(len(prompt))
        found = prompt.find(key)
        assert found > 0 and prompt.count(key) >= 1
        where = found / len(prompt)
        assert where < 0.35 or where > 0.65  # depth 0 or 1: the needle sits at an end, never in the middle
    assert lengths == {300, 500}
    assert source.longest == 500 + len(" 12345.")


def test_needles_are_seeded_and_reject_lengths_too_short():
    spec = {"name": "needles", "lengths": [256]}
    assert build(spec).next().ids == build(spec).next().ids
    assert build(spec).next().ids != build(spec, seed=1).next().ids
    with pytest.raises(DataError, match="too short"):
        build({"name": "needles", "lengths": [40]})


def test_kv_retrieval_asks_for_a_present_key():
    source = build({"name": "kv-retrieval", "lengths": [600], "depths": [0.5]})
    for _ in range(3):
        prompt, answer = split(source.next())
        assert len(prompt) + len(answer) <= source.longest
        assert len(prompt) > 600 - 90  # filled to within one pair
        body = prompt[prompt.index("{") : prompt.index("}") + 1]
        pairs = json.loads(body)
        key = re.search(r'Key: "([^"]+)"', prompt).group(1)
        assert answer == f' "{pairs[key]}"'
        keys = list(pairs)
        assert abs(keys.index(key) / len(keys) - 0.5) < 0.15


def test_variable_tracking_answer_is_the_chain_in_order():
    source = build({"name": "variable-tracking", "lengths": [800], "chains": 2, "hops": 3})
    prompt, answer = split(source.next())
    names = answer.split()
    assert len(names) == 4 and len(prompt) == 800
    value = re.search(r"VAR " + names[0] + r" = (\d+)\.", prompt).group(1)
    assert f"assigned the value {value}" in prompt
    positions = [prompt.index(f"VAR {n} = ") for n in names]
    assert positions == sorted(positions)
    for prev, name in itertools.pairwise(names):
        assert f"VAR {name} = VAR {prev}." in prompt


def test_paraphrase_answer_quotes_the_passage_before_answering(tmp_path: Path):
    lines = [f"line {i:03d} of document {d}: {'x' * (d % 5)} some words here" for d in range(40) for i in range(12)]
    (tmp_path / "docs.jsonl").write_text(
        "".join(json.dumps({"text": "\n".join(lines[d * 12 : (d + 1) * 12])}) + "\n" for d in range(40))
    )
    base = {"name": "text", "paths": [str(tmp_path / "docs.jsonl")]}
    source = build({"name": "paraphrase", "base": base, "lengths": [2000], "passage_chars": 400})
    for _ in range(4):
        piece = source.next()
        prompt, answer = split(piece)
        assert len(piece.ids) <= 2000 and prompt.count("Passage ") >= 3
        cue = re.search(r'contains the line "([^"]+)"', prompt).group(1)
        n, quote, target = re.fullmatch(
            r'Answer: the relevant text is in Passage (\d+): "(.*)"\nSo the line that follows it is: (.*)\n',
            answer,
            re.S,
        ).groups()
        passage = prompt.split(f"Passage {n}:\n")[1].split("\n\nPassage ")[0].split("\n\nQuestion")[0]
        assert quote.endswith(cue) and quote in passage
        passage_lines = passage.split("\n")
        assert passage_lines[passage_lines.index(cue) + 1] == target


def test_megadoc_stitches_one_group_with_distant_recalls(tmp_path: Path):
    rephrasings = [
        {"doc": f"d{d}", "text": "\n".join(f"doc {d} version {v} sentence {i} with enough words" for i in range(40))}
        for d in range(3)
        for v in range(4)
    ]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rephrasings))
    base = {"name": "text", "paths": [str(tmp_path / "r.jsonl")], "group_field": "doc"}
    spec = {"name": "megadoc", "base": base, "recalls": 5, "min_distance": 3000, "max_chars": 50_000}
    source = build(spec)
    seen = []
    for _ in range(3):
        piece = source.next()
        text = piece.text
        seen.append(piece.group)
        assert text.count("=== part ") == 4  # the four rephrasings of one document
        assert {m for m in re.findall(r"doc (\d+) version", text)} == {piece.group[1:]}
        recalls = list(re.finditer(r"\[recall from part (\d+): (.*)\]\n", text))
        assert len(recalls) == 5
        for recall in recalls:
            first = text.index(recall.group(2))
            assert recall.start() - first >= 3000
            part = text[:first].rsplit("=== part ", 1)[1].split(" ===")[0]
            assert part == recall.group(1)
    assert sorted(seen) == ["d0", "d1", "d2"]


def test_builders_resume_exactly(tmp_path: Path):
    text = "".join(f"row {{i}} line {j} and a few more words\n" for j in range(30))
    (tmp_path / "t.jsonl").write_text(
        "".join(json.dumps({"text": text.format(i=i), "g": i // 3}) + "\n" for i in range(30))
    )
    base = {"name": "text", "paths": [str(tmp_path / "t.jsonl")], "group_field": "g"}
    for spec in (
        {"name": "megadoc", "base": base, "recalls": 2, "min_distance": 10, "max_chars": 1000},
        {"name": "paraphrase", "base": base, "lengths": [600], "passage_chars": 200},
        {"name": "kv-retrieval", "lengths": [300]},
    ):
        source = build(spec)
        for _ in range(4):
            source.next()
        resumed = build(spec)
        resumed.load_state_dict(source.state_dict())
        for _ in range(6):
            a, b = source.next(), resumed.next()
            assert (a.text, None if a.ids is None else list(a.ids)) == (b.text, None if b.ids is None else list(b.ids))


def test_a_sample_longer_than_the_rows_is_refused():
    with pytest.raises(DataError, match=r"up to 1031 tokens.*at most 1024"):
        PackedLoader({"seq_len": 1024, "sources": {"keys": {"name": "needles", "lengths": [1024]}}})


def test_a_base_with_nothing_usable_is_an_error(tmp_path: Path):
    (tmp_path / "short.jsonl").write_text("".join(json.dumps({"text": f"x{i}\ny\nz"}) + "\n" for i in range(5)))
    source = build({"name": "paraphrase", "base": {"name": "text", "paths": [str(tmp_path / "short.jsonl")]}})
    with pytest.raises(DataError, match="a whole epoch of its base source 'task/base' gave nothing usable"):
        source.next()
