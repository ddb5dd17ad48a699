"""Bad input fails before any compute: no model weights loaded, no step run, nothing written to output.dir."""

from __future__ import annotations

import json

import pytest

from lcplug.train import RecipeError, train


def _fails(raw: dict, tmp_path, message: str) -> None:
    with pytest.raises(RecipeError, match=message) as info:
        train(_recipe_of(raw))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def _recipe_of(raw: dict):
    from lcplug.train import Recipe

    return Recipe.from_dict(raw)


def test_missing_base_model(recipe, tmp_path):
    _fails(recipe(base={"model": str(tmp_path / "nowhere")}), tmp_path, r"base.model: '.*nowhere' is not a directory")


def test_bytes_need_a_vocabulary_of_256(recipe, tmp_path):
    from lcplug.testing import tiny_model

    tiny_model("llama").save_pretrained(tmp_path / "small")  # vocabulary 128
    _fails(recipe(base={"model": str(tmp_path / "small")}), tmp_path, "tokenizer: .*vocabulary of 128 < 256")


def test_a_model_without_a_tokenizer_needs_one_named(recipe, tmp_path):
    _fails(recipe(tokenizer=None), tmp_path, "tokenizer: cannot load one from .*set tokenizer: bytes")


@pytest.mark.parametrize(
    ("patch", "train", "message"),
    [
        (
            {"attention": "sliding-window:window=32,block_size=16"},
            "gates",
            "stages\\[0\\].train: stage 'main' trains no",
        ),
        ({"attention": "sliding-window:window=32,block_size=16"}, "sinks", "offer no 'sinks' parameters"),
        ({"attention": "loza:mode=sparse,block=16"}, "gates", "groups they offer: none"),
        ({}, "indexer", "offer no 'indexer' parameters"),
    ],
)
def test_a_stage_that_trains_nothing(recipe, tmp_path, patch, train, message):
    _fails(recipe(patch=patch, stages=[{"name": "main", "train": train, "steps": 1}]), tmp_path, message)


def test_lora_targets_the_model_lacks(recipe, tmp_path):
    stages = [{"name": "main", "train": "lora", "steps": 1, "lora": {"target_modules": ["qq_proj"]}}]
    _fails(recipe(stages=stages), tmp_path, r"stages\[0\].lora.target_modules: Target modules \{'qq_proj'\} not found")


def test_a_spec_the_model_cannot_take(recipe, tmp_path):
    patch = {"attention": "loza:mode=sparse,block=16,sparse_layers=7"}
    _fails(
        recipe(patch=patch), tmp_path, "patch: attention:loza: parameter 'sparse_layers' names layer 7, out of range"
    )


def test_a_later_stage_is_rehearsed_too(recipe, tmp_path):
    stages = [
        {"name": "a", "steps": 1},
        {"name": "b", "train": "gates", "patch": {"attention": "duo:mode=final,sink=4,recent=8"}, "steps": 1},
    ]
    _fails(recipe(stages=stages), tmp_path, r"stages\[1\].patch: attention:duo: parameter 'heads' lacks layer 0")


def test_documents_longer_than_seq_len(recipe, tmp_path):
    data = {"seq_len": 64, "sources": {"needles": {"name": "needles", "lengths": [256]}}}
    _fails(recipe(data=data), tmp_path, r"stages\[0\].seq_len: data source 'needles' makes documents of up to")


def test_data_that_runs_out(recipe, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"text": "x" * 64}) for _ in range(3)) + "\n")
    data = {"seq_len": 64, "batch_size": 2, "repeat": False, "sources": {"t": {"name": "text", "paths": [str(rows)]}}}
    stages = [{"name": "a", "steps": 1}, {"name": "b", "steps": 2}]
    _fails(recipe(data=data, stages=stages), tmp_path, r"stages\[1\]: the data runs out after 1 of the 2 batches")


def test_fp16_needs_cuda(recipe, tmp_path):
    _fails(recipe(precision="fp16"), tmp_path, "precision: fp16 needs a CUDA device")


def test_context_parallelism_needs_its_plugin_when_a_run_starts():
    from lcplug.train.recipe import CPConfig
    from lcplug.train.runner import context_parallel

    assert context_parallel(CPConfig(degree=1, strategy="ring")) == {}
    assert context_parallel(CPConfig(degree=2, strategy="ring")) == {"cp": {"name": "ring", "degree": 2}}
    with pytest.raises(RecipeError, match=r"cp\.strategy 'rign': no cp plugin installed by that name.*'ring'"):
        context_parallel(CPConfig(degree=2, strategy="rign"))


def test_sharded_weight_launches_are_refused_not_saved_wrong():
    from accelerate.utils import DistributedType

    from lcplug.train.runner import check_sharding

    check_sharding(DistributedType.MULTI_GPU)
    check_sharding(DistributedType.NO)
    with pytest.raises(RecipeError, match=r"launch: .*FSDP shards the weights"):
        check_sharding(DistributedType.FSDP)
