"""The recipe schema: defaults, the resolved round trip, and one error per kind of mistake (field path named)."""

from __future__ import annotations

import pytest
import yaml

from lcplug.train import Recipe, RecipeError
from lcplug.train.recipe import merge_spec


def test_minimal_recipe_resolves_defaults(recipe):
    r = Recipe.from_dict(recipe(name=None) | {"name": "demo", "output": {}})
    stage = r.stages[0]
    assert (stage.seq_len, stage.batch_size, stage.grad_accum, stage.losses) == (64, 2, 1, {"lm": 1.0})
    assert (stage.schedule.warmup, stage.schedule.decay, stage.schedule.min_lr_ratio) == (0, "cosine", 0.1)
    assert r.output.dir == "out/demo" and r.output.log == ["jsonl", "tensorboard"] and r.output.lora == "merge"
    assert r.data_config(stage).seq_len == 64
    assert r.precision == "fp32" and r.cp.degree == 1 and r.eval.probes == []


def test_stage_overrides_data_shape_and_tokens_resolve_to_steps(recipe):
    stages = [{"name": "s", "tokens": 1000, "seq_len": 128, "batch_size": 3, "lr": "1e-3"}]
    r = Recipe.from_dict(recipe(stages=stages))
    stage = r.stages[0]
    assert r.data_config(stage).seq_len == 128 and r.data_config(stage).batch_size == 3
    assert stage.lr == 1e-3  # YAML 1.1 reads 1e-3 as a string; the schema coerces it
    assert stage.total_steps(128 * 3) == 3  # 1000 tokens / 384 per step, rounded up


def test_round_trip_of_the_resolved_recipe(recipe, tmp_path):
    r = Recipe.from_dict(recipe(tokenizer=None, patch={"attention": "sliding-window:window=32,block_size=16"}))
    path = tmp_path / "resolved.yaml"
    path.write_text(yaml.safe_dump(r.to_dict(), sort_keys=False))
    again = Recipe.from_yaml(path)
    assert again.to_dict() == r.to_dict() and again.tokenizer is None


def test_from_yaml_names_the_recipe_after_its_file(recipe, tmp_path):
    raw = recipe()
    del raw["name"]
    path = tmp_path / "my-retrofit.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert Recipe.from_yaml(path).name == "my-retrofit"


def _stage(**changes):
    return [{"name": "main", "steps": 3, **changes}]


ERRORS = [
    ({"base": None}, "base: required"),
    ({"base": {"dtype": "float32"}}, "base.model: required"),
    ({"base": "x"}, "base: expected a mapping"),
    ({"base": {"model": "m", "dtype": "fp32"}}, "base.dtype: got 'fp32'; valid: float32, bfloat16, float16"),
    ({"stages": None}, "stages: required"),
    ({"stages": []}, "stages: got []; valid: a list of at least one stage"),
    ({"stagez": []}, "stagez: unknown key; did you mean 'stages'?"),
    ({"stages": _stage(train="loraa")}, "stages[0].train: got 'loraa'; valid: all, lora, lora+, gates, indexer, sinks"),
    ({"stages": _stage(train="loraa")}, "(did you mean 'lora'"),
    ({"stages": _stage(lrr=1)}, "stages[0].lrr: unknown key; did you mean 'lr'"),
    ({"stages": _stage(tokens=100)}, "stages[0]: give exactly one of steps or tokens"),
    ({"stages": [{"name": "main"}]}, "stages[0]: give exactly one of steps or tokens"),
    ({"stages": _stage(steps=0)}, "stages[0].steps: got 0; valid: an integer >= 1"),
    ({"stages": _stage(steps="ten")}, "stages[0].steps: got 'ten'"),
    ({"stages": _stage(lr=-1)}, "stages[0].lr: got -1; valid: a number > 0"),
    ({"stages": [{"steps": 1}]}, "stages[0].name: required"),
    ({"stages": [*_stage(), *_stage()]}, "stages[1].name: 'main' already names stages[0]"),
    ({"stages": _stage(schedule={"decay": "cos"})}, "stages[0].schedule.decay: got 'cos'; valid: cosine, linear"),
    ({"stages": _stage(schedule={"decay": "cosin"})}, "(did you mean 'cosine'?)"),
    ({"stages": _stage(schedule={"min_lr_ratio": 2})}, "stages[0].schedule.min_lr_ratio: got 2"),
    ({"stages": _stage(schedule={"warmpu": 2})}, "stages[0].schedule.warmpu: unknown key; did you mean 'warmup'?"),
    ({"stages": _stage(lora={"r": 4})}, "stages[0].lora: only used with train: lora or lora+"),
    ({"stages": _stage(train="lora", lora={"r": 0})}, "stages[0].lora.r: got 0; valid: an integer >= 1"),
    (
        {"stages": [*_stage(train="lora"), {"name": "b", "steps": 1, "train": "lora", "lora": {"r": 4}}]},
        "stages[1].lora: differs from stages[0].lora",
    ),
    ({"stages": _stage(losses={"lm": -1})}, "stages[0].losses: got {'lm': -1}"),
    ({"stages": _stage(losses={"lm": 0})}, "stages[0].losses: got {'lm': 0}"),
    ({"stages": _stage(losses={"lm": 1, "foo": 1})}, "stages[0].losses: unknown loss 'foo'; valid: lm"),
    ({"stages": _stage(seq_len=1)}, "stages[0].seq_len: got 1; valid: an integer >= 2"),
    ({"stages": _stage(patch={"attention": "slidng-window"})}, "stages[0].patch: unknown attention plugin"),
    ({"stages": _stage(patch="sliding-window")}, "stages[0].patch: got 'sliding-window'"),
    ({"precision": "fp8"}, "precision: got 'fp8'; valid: fp32, bf16, fp16"),
    ({"gradient_checkpointing": "maybe"}, "gradient_checkpointing: got 'maybe'"),
    ({"output": {"lora": "merged"}}, "output.lora: got 'merged'; valid: merge, adapter, both (did you mean 'merge'?)"),
    ({"output": {"log": ["jsonl", "wandb"]}}, "output.log: got ['jsonl', 'wandb']; valid: jsonl, tensorboard"),
    ({"output": {"keep": 0}}, "output.keep: got 0; valid: an integer >= 1"),
    ({"output": {"checkpoint_every": -1}}, "output.checkpoint_every: got -1"),
    ({"eval": {"probes": ["passkeys"]}}, "eval.probes: unknown probe 'passkeys'; did you mean 'passkey'?"),
    ({"eval": {"every": 5}}, "eval.every: evaluating every N steps needs eval.probes"),
    ({"eval": {"probes": "ppl", "lengths": [0]}}, "eval.lengths: got [0]; valid: integers >= 1"),
    ({"cp": {"degree": 0}}, "cp.degree: got 0"),
    ({"patch": {"attention": "slidng-window"}}, "patch: unknown attention plugin 'slidng-window'; did you mean"),
    ({"patch": {"attention": "sliding-window:window=0"}}, "patch: attention:sliding-window: parameter 'window' got 0"),
    ({"patch": {"cp": "ring"}}, "patch.cp: give context parallelism as cp:"),
    ({"data": None}, "data: required"),
    ({"data": {"sources": {"code": "code"}}}, "data.seq_len is required"),
    ({"data": {"seq_len": 64, "sources": {"code": "code"}, "seqlen": 3}}, "unknown data key 'seqlen'"),
    (
        {"tokenizer": "bytes", "data": {"seq_len": 64, "tokenizer": "tok/", "sources": {"code": "code"}}},
        "data.tokenizer: 'tok/' differs from tokenizer 'bytes'",
    ),
    ({"publish": {"repo_id": "noslash"}}, "publish.repo_id: got 'noslash'; valid: 'owner/name'"),
    ({"seed": -1}, "seed: got -1; valid: an integer >= 0"),
]


@pytest.mark.parametrize(
    ("changes", "message"), ERRORS, ids=[m.split(":")[0] + f"-{i}" for i, (_, m) in enumerate(ERRORS)]
)
def test_schema_errors_name_the_field_in_one_line(recipe, changes, message):
    with pytest.raises(RecipeError) as info:
        Recipe.from_dict(recipe(**changes))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_loss_lists_what_the_plugins_offer(recipe):
    dsa = {"attention": "dsa:topk=32,block_size=16,heads=2,dim=8"}
    with pytest.raises(RecipeError, match=r"unknown loss 'indexer_kll'; valid: lm, indexer_kl .*did you mean"):
        Recipe.from_dict(recipe(patch=dsa, stages=_stage(losses={"indexer_kll": 1})))
    duo = {"attention": "duo:sink=4,recent=8,block_size=16"}
    r = Recipe.from_dict(recipe(patch=duo, stages=_stage(train="gates", losses={"lm": 1, "duo_l1": 1})))
    assert r.stages[0].losses == {"lm": 1.0, "duo_l1": 1.0}


def test_recipe_file_errors(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        Recipe.from_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: [unclosed\n")
    with pytest.raises(RecipeError, match="is not valid YAML"):
        Recipe.from_yaml(bad)


def test_a_stage_patch_changes_params_of_the_same_plugin_and_replaces_another():
    current = {"attention": {"name": "dsa", "topk": 32, "block_size": 16, "stage": "warmup"}, "rope": "yarn:factor=2"}
    merged = merge_spec(current, {"attention": "dsa:stage=sparse"})
    assert merged["attention"] == {"name": "dsa", "topk": 32, "block_size": 16, "stage": "sparse"}
    assert merged["rope"] == {"name": "yarn", "factor": "2"}
    assert merge_spec(current, {"attention": "full", "rope": None}) == {"attention": {"name": "full"}}
