"""The embedded demo: its shipped base checkpoint, its recipes, and one short pass of the whole retrofit."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import lcplug
from lcplug.train import Recipe, train
from lcplug.train.plan import plan

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "examples" / "demo" / "base"


@pytest.fixture
def at_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the recipes' paths are relative to the repository root


def test_the_shipped_base_is_small_short_context_and_documented():
    size = sum(f.stat().st_size for f in BASE.iterdir())
    assert size <= 20 * 2**20, f"the shipped base is {size / 2**20:.1f} MiB; the limit is 20 MiB"
    model = lcplug.from_pretrained(BASE)
    assert model.config.max_position_embeddings == 512 and lcplug.manifest_of(model) is None
    assert "pretrain_base.py" in (BASE / "README.md").read_text()


def test_the_demo_recipes_validate_and_plan(at_root):
    assert Recipe.from_yaml("recipes/demo-base.yaml").stages[0].steps == 1500
    p = plan("recipes/demo.yaml", world_size=1)
    assert [s.name for s in p.stages] == ["extend"]
    spec = lcplug.manifest_of(p.model_instance)["spec"]
    assert spec["rope"]["name"] == "yarn" and spec["attention"]["name"] == "hybrid"


def test_one_short_pass_of_the_demo_retrofit(at_root, tmp_path):
    raw = Recipe.from_yaml("recipes/demo.yaml").to_dict()
    raw["stages"][0].update(steps=2)
    raw["data"].update(seq_len=1024, batch_size=1)
    raw["data"]["sources"]["passkey"]["lengths"] = [512, 1000]
    raw["eval"].update(lengths=[256, 1024], samples=1)
    raw["output"]["dir"] = str(tmp_path / "demo")
    summary = train(Recipe.from_dict(raw))
    assert set(summary["eval"]) == {"base", "before", "after"}
    final = Path(summary["final"])
    assert {"config.json", "model.safetensors", "README.md", "heatmap_passkey.png", "ppl.png"} <= set(os.listdir(final))
    reloaded = lcplug.from_pretrained(final)
    assert lcplug.manifest_of(reloaded)["spec"]["attention"]["name"] == "hybrid"
