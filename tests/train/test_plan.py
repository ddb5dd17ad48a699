"""`lcplug plan`: every real-model recipe builds on the meta device, stage by stage, with sane numbers.

A plan needs no CP plugin installed (it only divides each sequence by the CP degree); a run checks for it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file

import lcplug
from lcplug.cli import main
from lcplug.testing import tiny_model
from lcplug.train import Recipe
from lcplug.train.memory import GIB, LOGIT_BYTES, Dims, Precision, attention_costs, installed_attention
from lcplug.train.plan import PlanError, plan

ROOT = Path(__file__).resolve().parents[2]
LLAMA = "recipes/llama-3.1-8b-128k-yarn-loza.yaml"
DSA = "recipes/qwen3-dsa.yaml"
PROLONG = "recipes/prolong-64k.yaml"
RECIPES = (LLAMA, DSA, PROLONG)
WORLD = 8


@pytest.fixture(scope="module", autouse=True)
def repo_root():
    """Recipes name their configs from the repository root."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        yield


@pytest.fixture(scope="module")
def plans(repo_root):
    return {path: plan(path, world_size=WORLD) for path in RECIPES}


def stage(p, name):
    return next(s for s in p.stages if s.name == name)


@pytest.mark.parametrize("path", RECIPES)
def test_plan_builds_on_meta_without_weights(plans, path):
    p = plans[path]
    model = p.model_instance
    assert all(t.is_meta for t in model.parameters())
    assert all(t.is_meta for t in model.buffers())
    assert p.stages[-1].train == "all"  # every recipe ends training the whole (finalized) model
    assert sum(p.stages[-1].trainable.values()) == sum(t.numel() for t in model.parameters())
    assert p.world_size == WORLD and p.dp_degree * p.cp_degree == WORLD
    assert not p.warnings, p.warnings  # every stage fits an 80 GiB device
    assert json.loads(json.dumps(p.to_dict()))["stages"][0]["name"] == p.stages[0].name


@pytest.mark.parametrize("path", RECIPES)
def test_tokens_become_steps_of_the_global_batch(plans, path):
    recipe = Recipe.from_yaml(path)
    p = plans[path]
    for cfg, s in zip(recipe.stages, p.stages):
        assert s.tokens_per_step == cfg.seq_len * cfg.batch_size * cfg.grad_accum * p.dp_degree
        assert s.steps == (cfg.steps if cfg.tokens is None else math.ceil(cfg.tokens / s.tokens_per_step))
        assert (s.seq_len, s.lr) == (cfg.seq_len, cfg.lr)


@pytest.mark.parametrize("path", RECIPES)
def test_memory_is_the_formula_over_counts(plans, path):
    """States: frozen weights as loaded (bf16), trainable ones with gradients and two AdamW moments in fp32,
    all sharded over the world; logits: this rank's tokens x vocab x (bf16 + fp32 log-probs + fp32 grad)."""
    p = plans[path]
    for s in p.stages:
        trained = sum(s.trainable.values())
        frozen = p.parameters - trained
        mem = s.memory
        assert mem.weights * WORLD * GIB == pytest.approx(2 * frozen + 4 * trained)
        assert mem.grads * WORLD * GIB == pytest.approx(4 * trained)
        assert mem.optimizer == pytest.approx(2 * mem.grads)
        tokens = s.seq_len * s.batch_size // p.cp_degree
        per_logit = LOGIT_BYTES if s.losses.get("lm") else 2
        assert mem.logits * GIB == pytest.approx(tokens * p.dims.vocab * per_logit)
        layer_inputs = tokens * p.dims.layers * p.dims.hidden * 2  # gradient checkpointing keeps these
        assert mem.activations * GIB >= layer_inputs
        assert 0 < mem.total < p.device_gib


def test_llama_8b_weights_are_15_gib_in_bf16(plans):
    """The frozen calibration stage holds Llama-3.1-8B's weights as loaded: 8.03B x 2 bytes, about 15 GiB."""
    p = plans[LLAMA]
    calibrate = stage(p, "calibrate")
    assert p.base_parameters == 8_030_261_248  # Llama-3.1-8B
    assert calibrate.memory.weights * WORLD == pytest.approx(14.96, abs=0.01)
    assert stage(p, "sparse-64k").memory.weights * WORLD == pytest.approx(2 * 14.96, abs=0.02)  # fp32 masters


def test_llama_loza_stages(plans):
    p = plans[LLAMA]
    layers = p.dims.layers
    calibrate, mid, long = p.stages
    assert calibrate.trainable == {"gates": layers}  # one scalar gate per layer, nothing else
    assert p.parameters - p.base_parameters == layers
    assert calibrate.spec["attention"]["mode"] == "calibrate"
    assert calibrate.spec["rope"]["name"] == "llama3"
    assert calibrate.finalized["attention"]["mode"] == "sparse"
    assert len(calibrate.finalized["attention"]["sparse_layers"]) == layers // 2
    for s in (mid, long):
        assert s.trainable == {"model": p.base_parameters}  # the gates are gone after finalize
        assert s.spec["rope"] == {**s.spec["rope"], "name": "yarn", "factor": 16.0}
        assert {(n, keys) for _, keys, n in s.attention} == {(layers // 2, 1024), (layers // 2, s.seq_len)}
    assert mid.memory.activations < long.memory.activations  # twice the tokens per rank
    spec = p.manifest["spec"]
    assert (spec["attention"]["name"], spec["rope"]["name"]) == ("loza", "yarn")
    config = p.model_instance.config
    assert config.max_position_embeddings == 131072 and config.rope_parameters["rope_type"] == "yarn"
    assert "finalize -> attention loza:mode=sparse" in p.table() and "untrained gates" in p.table()


def test_llama_stage_one_rope_is_the_published_one():
    """The 8K config patched with the recipe's llama3 rope is Llama-3.1-8B's published rope."""
    from transformers import AutoConfig, AutoModelForCausalLM

    recipe = Recipe.from_yaml(LLAMA)
    published = AutoConfig.from_pretrained("recipes/configs/llama-3.1-8b.json")
    unextended = AutoConfig.from_pretrained(recipe.base.config)
    assert unextended.rope_parameters["rope_type"] == "default"
    with torch.device("meta"):
        small = unextended.to_dict() | {"num_hidden_layers": 1, "vocab_size": 16}
        model = AutoModelForCausalLM.from_config(type(unextended).from_dict(small))
        lcplug.patch(model, rope=recipe.patch["rope"])
    assert model.config.rope_parameters == published.rope_parameters


def test_qwen3_dsa_stages(plans):
    p = plans[DSA]
    warmup, sparse = p.stages
    indexer = p.parameters - p.base_parameters
    assert warmup.trainable == {"indexer": indexer} and indexer > 0
    assert sparse.trainable == {"model": p.base_parameters, "indexer": indexer}
    assert warmup.spec["attention"]["stage"] == "warmup" and sparse.spec["attention"]["stage"] == "sparse"
    assert warmup.losses == {"indexer_kl": 1.0} and sparse.losses == {"lm": 1.0, "indexer_kl": 1.0}
    assert warmup.attention == [("full + indexer", warmup.seq_len, p.dims.layers)]
    assert sparse.attention == [("indexer top-2048", 2048, p.dims.layers)]
    assert warmup.memory.total < sparse.memory.total  # warm-up keeps no model activations for backward
    assert p.manifest["spec"]["attention"]["stage"] == "sparse"


def test_prolong_rope_theta_is_8e6(plans):
    p = plans[PROLONG]
    assert stage(p, "long-64k").attention == [("full", 65536, p.dims.layers)]
    assert p.model_instance.config.rope_parameters["rope_theta"] == pytest.approx(8e6, rel=1e-12)
    assert p.mixture["code-repos"] == pytest.approx(0.3) and p.mixture["books"] == pytest.approx(0.3)


def test_plan_warns_past_the_device(plans):
    recipe = Recipe.from_yaml(PROLONG)
    recipe.cp.degree = 1  # 64K tokens of fp32 logits on one rank
    p = plan(recipe, world_size=WORLD)
    assert len(p.warnings) == 1 and "exceeds an 80 GiB device" in p.warnings[0]


def test_plan_errors_are_one_line():
    recipe = Recipe.from_yaml(DSA)
    with pytest.raises(PlanError, match="multiple of 2"):
        plan(recipe, world_size=3)
    recipe.base.config = None
    with pytest.raises(PlanError, match=r"'Qwen/Qwen3-8B-Base' is not a local directory .* give base.config"):
        plan(recipe)


def test_plan_runs_a_local_model_on_cpu(recipe):
    """A local checkpoint's own config, real (random) weights on the CPU, and a finalize reading real gates."""
    stages = [
        {"name": "calibrate", "train": "gates", "steps": 2, "finalize": True},
        {"name": "sparse", "train": "all", "tokens": 1000},
    ]
    r = Recipe.from_dict(recipe(patch={"attention": "loza:mode=calibrate,block=16,local_blocks=2"}, stages=stages))
    p = plan(r, device="cpu")
    assert not any(t.is_meta for t in p.model_instance.parameters())
    assert p.stages[0].trainable == {"gates": p.dims.layers}
    assert p.stages[1].steps == math.ceil(1000 / (64 * 2))
    assert "untrained gates" not in p.table()


@pytest.mark.parametrize("path", RECIPES)
def test_recipes_launch_with_the_fsdp_config(path):
    """Each recipe's launch line names an Accelerate config that Accelerate reads: FSDP2 over 8 bf16 processes."""
    text = Path(path).read_text()
    launch = "accelerate launch --config_file recipes/accelerate/fsdp-8gpu.yaml -m lcplug train " + path
    assert launch in text
    config = load_config_from_file("recipes/accelerate/fsdp-8gpu.yaml")
    assert (config.distributed_type.value, config.num_processes, config.fsdp_config["fsdp_version"]) == ("FSDP", 8, 2)
    assert config.mixed_precision == Recipe.from_yaml(path).precision == "bf16"


def test_cli_prints_the_table_and_json(capsys):
    assert main(["plan", DSA, "--world-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "plan: qwen3-dsa on 8 device(s)" in out and "memory per device (GiB)" in out
    assert "indexer-warmup" in out and "sparse" in out
    assert main(["plan", DSA, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["world_size"] == 2 and [s["name"] for s in data["stages"]] == ["indexer-warmup", "sparse"]
    assert data["stages"][1]["memory_gib"]["total"] > 0


def test_cli_error_is_one_line(capsys):
    assert main(["plan", DSA, "--world-size", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lcplug: error: world size 3") and "\n" not in err


def saved_per_layer(family: str, dtype: torch.dtype, spec: str | None, checkpointing: bool) -> tuple[float, float]:
    """Bytes per token autograd keeps for one more decoder layer (3 layers minus 2), and the formula's count."""
    counted = []
    for layers in (2, 3):
        model = tiny_model(family, num_hidden_layers=layers).to(dtype).train()
        if spec:
            lcplug.patch(model, attention=spec)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        own = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen: dict[int, int] = {}

        def pack(t, own=own, seen=seen):
            if t.untyped_storage().data_ptr() not in own:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        ids = torch.randint(3, 100, (1, 256))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, labels=ids)
        counted.append(sum(seen.values()) / ids.numel())
    dims = Dims.of(model)
    compute = 2 if dtype == torch.bfloat16 else 4
    cost = attention_costs(installed_attention(model), dims, 256, compute, {id(p) for p in model.parameters()})[0]
    formula = dims.hidden * compute if checkpointing else dims.layer_bytes(compute) + cost.saved
    return counted[1] - counted[0], formula


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    ("spec", "checkpointing"), [(None, False), (None, True), ("loza:mode=calibrate,block=16,local_blocks=2", False)]
)
def test_activation_formula_is_what_autograd_saves(family, dtype, spec, checkpointing):
    measured, formula = saved_per_layer(family, dtype, spec, checkpointing)
    assert measured == pytest.approx(formula, abs=1)  # a gate's few scalars spread over the tokens


def test_precision_keeps_fp32_masters_under_mixed_precision():
    assert Precision.of("bfloat16", "bf16") == Precision(frozen=2, master=4, compute=2)
    assert Precision.of("float32", "fp32") == Precision(frozen=4, master=4, compute=4)
