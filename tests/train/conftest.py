"""Fixtures of the training tests: a saved tiny byte-level model, a small code tree, and recipe dicts."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from lcplug.testing import tiny_model

SRC = Path(__file__).resolve().parents[2] / "src" / "lcplug"


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory) -> Path:
    """A tiny Llama (vocabulary 256, so bytes are its tokens) saved as a checkpoint directory."""
    path = tmp_path_factory.mktemp("base")
    tiny_model("llama", vocab_size=256).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def code_dir(tmp_path_factory) -> Path:
    """A code tree of two small 'repositories' copied from lcplug's own source."""
    root = tmp_path_factory.mktemp("code")
    for repo, names in {"a": ["errors.py", "layers.py"], "b": ["manifest.py", "positions.py"]}.items():
        (root / repo).mkdir()
        for name in names:
            (root / repo / name).write_text((SRC / name).read_text())
    return root


@pytest.fixture(scope="session")
def rows_file(tmp_path_factory) -> Path:
    """JSON lines of 200 ASCII records of exactly 64 characters: with bytes and seq_len 64, one record per row."""
    path = tmp_path_factory.mktemp("rows") / "rows.jsonl"
    lines = [json.dumps({"text": "".join(chr(97 + (i * 7 + j * j) % 26) for j in range(64))}) for i in range(200)]
    path.write_text("\n".join(lines) + "\n")
    return path


def make_recipe(base_dir: Path, code_dir: Path, out: Path, **changes: Any) -> dict[str, Any]:
    """A small valid recipe dict (one `train: all` stage of 3 steps on code) with top-level `changes`."""
    recipe: dict[str, Any] = {
        "name": "tiny",
        "base": {"model": str(base_dir)},
        "tokenizer": "bytes",
        "data": {"seq_len": 64, "batch_size": 2, "sources": {"code": {"name": "code", "path": str(code_dir)}}},
        "stages": [{"name": "main", "train": "all", "steps": 3, "lr": 1e-3}],
        "output": {"dir": str(out), "log": ["jsonl"]},
    }
    recipe.update(copy.deepcopy(changes))
    return recipe


@pytest.fixture
def recipe(base_dir, code_dir, tmp_path):
    """`recipe(**changes)`: `make_recipe` writing into this test's tmp_path/out."""
    return lambda **changes: make_recipe(base_dir, code_dir, tmp_path / "out", **changes)


@pytest.fixture
def read_metrics():
    """`read_metrics(out)`: the rows of out/metrics.jsonl."""
    return lambda out: [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
