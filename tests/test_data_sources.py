"""Data sources: code trees in dependency order, text / JSON lines / Parquet, HF datasets, chat sessions, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lcplug.data import DataContext, DataError, PackedLoader, Piece, Source, load_text_tokenizer, train_bpe
from lcplug.eval.haystack import stdlib_source
from lcplug.plugins.data.code import C_INCLUDE, PY_IMPORT, lines_with, topological_order


def read_all(source: Source) -> list[Piece]:
    out = []
    while (piece := source.next()) is not None:
        out.append(piece)
    return out


def documents(pieces: list[Piece]) -> list[list[Piece]]:
    docs: list[list[Piece]] = []
    for piece in pieces:
        if piece.first:
            docs.append([])
        docs[-1].append(piece)
    assert all(doc[-1].last for doc in docs)
    return docs


def build(spec, name: str = "src", tokenizer=None, **ctx) -> Source:
    return DataContext(load_text_tokenizer(tokenizer), **ctx).build_source(spec, name)


@pytest.fixture(scope="module")
def bpe():
    texts = [p.read_text() for p in sorted((stdlib_source() / "json").glob("*.py"))]
    return train_bpe(texts, vocab_size=600)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """Two repositories (a Python package, a C library), loose files, an undecodable file, a hidden directory."""
    files = {
        "pkg/__init__.py": "from .b import B\n",
        "pkg/a.py": "from pkg.b import helper\n",
        "pkg/b.py": "B = 1\ndef helper():\n    return B\n",
        "pkg/c.py": "import pkg.a\nfrom . import b as bee\n",
        "lib/x.c": '#include "x.h"\nint main(void) { return X; }\n',
        "lib/x.h": "#define X 0\n",
        "loose.py": "import os\n",
        ".git/config.py": "hidden = True\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    (tmp_path / "pkg" / "bad.py").write_bytes(b"\xff\xfe\x00not utf-8\x80")
    return tmp_path


def headers(doc: list[Piece]) -> list[str]:
    return [p.text.splitlines()[0] for p in doc if p.text]


def test_code_repository_is_one_document_in_dependency_order(tree):
    source = build({"name": "code", "path": str(tree), "shuffle": False})
    docs = {doc[0].group: doc for doc in documents(read_all(source))}
    assert set(docs) == {".", "lib", "pkg"}  # the hidden directory is no repository
    assert headers(docs["pkg"]) == [
        "--- pkg/b.py ---",
        "--- pkg/__init__.py ---",
        "--- pkg/a.py ---",
        "--- pkg/c.py ---",
    ]
    assert headers(docs["lib"]) == ["--- lib/x.h ---", "--- lib/x.c ---"]
    assert headers(docs["."]) == ["--- loose.py ---"]
    assert source.skipped == {"undecodable": 1}
    whole = "".join(p.text for p in docs["pkg"])
    assert "def helper():\n    return B\n" in whole
    assert docs["pkg"][0].size == sum(p.stat().st_size for p in (tree / "pkg").glob("*.py"))  # known before reading


def test_code_path_order_and_seeded_repository_order(tmp_path):
    for i in range(12):
        (tmp_path / f"r{i:02d}").mkdir()
        (tmp_path / f"r{i:02d}" / "m.py").write_text(f"x = {i}\n")
    spec = {"name": "code", "path": str(tmp_path)}
    first, again = build(spec), build(spec)
    order = [p.group for p in read_all(first) if p.first]
    assert order == [p.group for p in read_all(again) if p.first]  # the same seed, the same order
    assert sorted(order) == [f"r{i:02d}" for i in range(12)] and order != sorted(order)
    first.new_epoch()
    assert [p.group for p in read_all(first) if p.first] != order  # each epoch its own order
    assert [p.group for p in read_all(build(spec, seed=1)) if p.first] != order


def test_code_defaults_to_the_standard_library():
    source = build("code")
    assert source.root == stdlib_source()
    piece = source.next()
    assert piece.first and piece.text.startswith("--- ") and piece.size > len(piece.text)


def test_topological_order_breaks_cycles_at_the_lowest_index():
    assert topological_order([{1}, {0}, set()]) == [2, 0, 1]
    assert topological_order([{2}, set(), {1}]) == [1, 2, 0]


def test_import_scan_on_lines_with_the_keyword_matches_a_scan_of_the_whole_text():
    texts = [p.read_text() for p in sorted((stdlib_source() / "importlib").rglob("*.py"))]
    texts += ["import a, b as c\nx = 'no import here'  # import\n  from .m import (x,\n y)\nimport", "", "import"]
    texts += ['#include "a.h"\n  # include "b/c.h" // include\nint x;\n#include <d.h>']
    for text in texts:
        assert PY_IMPORT.findall(lines_with(text, "import")) == PY_IMPORT.findall(text)
        assert C_INCLUDE.findall(lines_with(text, "include")) == C_INCLUDE.findall(text)
    assert sum(len(PY_IMPORT.findall(t)) for t in texts) > 50  # the stdlib files do import things


def test_text_jsonl_parquet_with_bad_records_counted(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text("plain text document\n")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"text": "json one"}) + "\n{not json\n\n" + json.dumps({"body": "x"}) + "\n"
        + json.dumps({"text": "json two"}) + "\n"
    )  # fmt: skip
    pq.write_table(pa.table({"text": ["parquet one", None, "parquet two"]}), tmp_path / "c.parquet")
    (tmp_path / "d.txt").write_bytes(b"\xff\xfe\xfa")
    (tmp_path / "e.txt").write_text("")
    source = build({"name": "text", "paths": [str(tmp_path)]})
    texts = sorted(p.text for p in read_all(source))
    assert texts == ["json one", "json two", "parquet one", "parquet two", "plain text document\n"]
    assert source.skipped == {
        "bad JSON line": 1,
        "no text field 'text'": 2,  # the JSON record without it, the Parquet null
        "undecodable": 1,
        "empty": 1,
    }


def test_text_big_file_streams_in_pieces(tmp_path):
    text = "".join(f"line {i} é\n" for i in range(1000))
    (tmp_path / "big.txt").write_text(text)
    pieces = read_all(build({"name": "text", "paths": [str(tmp_path / "big.txt")], "piece_bytes": 1024}))
    assert len(pieces) > 5 and "".join(p.text for p in pieces) == text
    assert [p.first for p in pieces] == [True] + [False] * (len(pieces) - 1)
    assert [p.last for p in pieces] == [False] * (len(pieces) - 1) + [True]
    assert all(p.text.endswith("\n") for p in pieces)


def test_text_resumes_mid_file_and_mid_jsonl(tmp_path):
    (tmp_path / "big.txt").write_text("".join(f"row {i}\n" for i in range(600)))
    (tmp_path / "r.jsonl").write_text("".join(json.dumps({"text": f"rec {i}"}) + "\n" for i in range(7)))
    spec = {"name": "text", "paths": [str(tmp_path)], "piece_bytes": 1024}
    whole = read_all(build(spec))
    for stop in range(1, len(whole)):
        source = build(spec)
        for _ in range(stop):
            source.next()
        resumed = build(spec)
        resumed.load_state_dict(source.state_dict())
        assert [p.text for p in read_all(resumed)] == [p.text for p in whole[stop:]]


def test_missing_path_and_unmatched_pattern_are_errors(tmp_path):
    with pytest.raises(DataError, match=r"nope\.txt' does not exist"):
        build({"name": "text", "paths": [str(tmp_path / "nope.txt")]})
    with pytest.raises(DataError, match="matches no file"):
        build({"name": "text", "paths": [str(tmp_path / "*.jsonl")]})
    with pytest.raises(DataError, match="is not a directory"):
        build({"name": "code", "path": str(tmp_path / "missing")})


def test_a_source_with_nothing_usable_is_an_error_before_training(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\xfa")
    loader = PackedLoader({"seq_len": 64, "sources": {"broken": {"name": "text", "paths": [str(tmp_path)]}}})
    with pytest.raises(DataError, match=r"'broken' is empty.*1 undecodable"):
        next(loader)


def test_hf_dataset_saved_streaming_and_resumed(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [f"hf row {i}" for i in range(10)]
    datasets.Dataset.from_dict({"text": rows, "n": list(range(10))}).save_to_disk(tmp_path / "saved")
    mapped = read_all(build({"name": "hf", "path": str(tmp_path / "saved")}))
    assert sorted(p.text for p in mapped) == sorted(rows) and [p.text for p in mapped] != rows  # shuffled
    halves = [read_all(build({"name": "hf", "path": str(tmp_path / "saved")}, rank=r, world=2)) for r in (0, 1)]
    assert sorted(p.text for half in halves for p in half) == sorted(rows)
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    spec = {"name": "hf", "path": "json", "data_files": [str(tmp_path / "rows.jsonl")], "streaming": True}
    source = build(spec)
    head = [source.next().text for _ in range(4)]
    resumed = build(spec)
    resumed.load_state_dict(source.state_dict())
    assert head + [p.text for p in read_all(resumed)] == rows
    with pytest.raises(DataError, match="no column 'body'"):
        build({"name": "hf", "path": str(tmp_path / "saved"), "field": "body"})


SESSION = {
    "tools": [{"type": "function", "function": {"name": "search", "parameters": {}}}],
    "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Find the answer."},
        {"role": "assistant", "content": "Searching.", "tool_calls": [{"name": "search", "arguments": {"q": "x"}}]},
        {"role": "tool", "content": "RESULT-FROM-TOOL"},
        {"role": "assistant", "content": "It is 42."},
    ],
}


def test_chat_sessions_use_the_template_and_mask_non_assistant_turns(tmp_path, bpe):
    path = tmp_path / "sessions.jsonl"
    path.write_text(json.dumps(SESSION) + "\n" + json.dumps({"messages": "not a list"}) + "\n")
    source = build({"name": "chat", "paths": [str(path)]}, tokenizer=bpe)
    (piece,) = read_all(source)
    assert source.skipped == {"no message list 'messages'": 1}
    rendered = bpe.apply_chat_template(SESSION["messages"], tools=SESSION["tools"], tokenize=False)
    assert list(piece.ids) == bpe(rendered, add_special_tokens=False)["input_ids"]  # tokenized whole, as in use
    trained = bpe.decode(np.asarray(piece.ids)[np.asarray(piece.mask)])
    assert "Searching." in trained and "It is 42." in trained and '"search"' in trained
    for context in ("You are terse.", "Find the answer.", "RESULT-FROM-TOOL", "<|im_start|>assistant"):
        assert context not in trained
    everything = read_all(build({"name": "chat", "paths": [str(path)], "train_on": "all"}, tokenizer=bpe))[0]
    assert all(everything.mask)


def test_chat_without_a_template_renders_plainly_for_bytes(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps(SESSION) + "\n")
    (piece,) = read_all(build({"name": "chat", "paths": [str(path)]}))
    text = bytes(np.asarray(piece.ids, dtype=np.uint8)).decode()
    assert text.startswith("<|system|>\nTools: ") and "<|tool|>\nRESULT-FROM-TOOL\n" in text
    trained = bytes(np.asarray(piece.ids, dtype=np.uint8)[np.asarray(piece.mask)]).decode()
    assert trained == 'Searching.<tool_call>{"name": "search", "arguments": {"q": "x"}}</tool_call>\nIt is 42.\n'


def test_batched_fast_encoding_equals_the_tokenizer(bpe):
    texts = [p.read_text() for p in sorted((stdlib_source() / "email").glob("*.py"))[:5]]
    tokenizer = load_text_tokenizer(bpe)
    encoded = tokenizer.encode_batch(texts)
    assert [ids.tolist() for ids in encoded] == [bpe(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert tokenizer.prefix == [] and tokenizer.eos == [bpe.eos_token_id] and tokenizer.pad_id == bpe.pad_token_id
