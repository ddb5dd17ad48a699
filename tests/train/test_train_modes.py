"""What each `train:` mode trains, and what the plugins' training interface does inside a run."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import lcplug
from lcplug.testing import logits, tiny_model
from lcplug.train import LoraConfig, Recipe, StageConfig
from lcplug.train.runner import Run
from lcplug.train.trainables import Trainee, norm_layers, select_trainables

IDS = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))


def _run(raw: dict) -> Run:
    run = Run(Recipe.from_dict(raw), resume=None, max_steps=None)
    run.run()
    return run


@pytest.mark.parametrize("mode", ["merge", "adapter"])
def test_lora_is_merged_or_saved_as_an_adapter(recipe, tmp_path, mode):
    from peft import PeftModel

    raw = recipe(
        stages=[
            {"name": "lora", "train": "lora", "steps": 3, "lr": 1e-2, "lora": {"r": 4, "target_modules": ["q_proj"]}}
        ],
        output={"dir": str(tmp_path / "out"), "lora": mode, "log": ["jsonl"]},
    )
    run = _run(raw)
    out = tmp_path / "out"
    weights = load_file(out / "final" / "model.safetensors")
    assert not any("lora" in name for name in weights)
    reloaded = lcplug.from_pretrained(out / "final").eval()
    if mode == "merge":
        assert not (out / "adapter").exists()
        assert torch.allclose(logits(reloaded, IDS), logits(run.trainee.model.eval(), IDS), atol=1e-5)
        return
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 4
    base = tiny_model("llama", vocab_size=256)
    assert torch.equal(logits(reloaded, IDS), logits(base, IDS))  # final/ is the model without its adapter
    with_adapter = PeftModel.from_pretrained(reloaded, out / "adapter").eval()
    assert not torch.allclose(logits(with_adapter, IDS), logits(base, IDS))


def test_lora_plus_also_trains_embeddings_and_norms():
    model = tiny_model("llama", vocab_size=256)
    lcplug.patch(model, attention="dsa:topk=32,block_size=16,heads=2,dim=8")
    stage = StageConfig(name="s", train="lora+", steps=1, lora=LoraConfig())
    trainee = Trainee(model)
    names = set(select_trainables(trainee, stage, "stages[0]"))
    norms = {f"{n}.weight" for n, m in model.named_modules() if m in norm_layers(model)}
    assert "model.embed_tokens.weight" in names and norms <= names
    assert len(norms) == 2 * 3 + 1  # two per layer, the final norm; the dsa indexer's own k_norm is not the model's
    assert any(".lora_A." in n for n in names) and "model.layers.0.self_attn.q_proj.weight" not in names
    assert not any("indexer" in n for n in names)
    stage.train = "lora"
    assert "model.embed_tokens.weight" not in set(select_trainables(trainee, stage, "stages[0]"))


def test_loza_gate_calibration_lands_in_the_saved_manifest(recipe, tmp_path, base_dir):
    raw = recipe(
        patch={"attention": "loza:mode=calibrate,block=16,local_blocks=2,sparse_fraction=0.34"},
        stages=[{"name": "calibrate", "train": "gates", "steps": 3, "lr": 0.05, "finalize": True}],
    )
    _run(raw)
    final = tmp_path / "out" / "final"
    spec = json.loads((final / "config.json").read_text())["lcplug"]["spec"]["attention"]
    assert spec["mode"] == "sparse" and set(spec["calibration"]) == {"0", "1", "2"} and len(spec["sparse_layers"]) == 1
    assert any(alpha != 1.0 for alpha in spec["calibration"].values())  # the gates moved
    trained, base = load_file(final / "model.safetensors"), load_file(base_dir / "model.safetensors")
    assert all(torch.equal(trained[k], base[k]) for k in base)  # only the gates trained
    assert lcplug.manifest_of(lcplug.from_pretrained(final))["spec"]["attention"]["calibration"] == spec["calibration"]


def test_dsa_indexer_warmup_then_sparse_keeps_the_trained_indexer(recipe, read_metrics, tmp_path, base_dir):
    raw = recipe(
        patch={"attention": "dsa:stage=warmup,topk=32,block_size=16,heads=2,dim=8"},
        stages=[
            {"name": "warmup", "train": "indexer", "losses": {"indexer_kl": 1.0}, "steps": 3, "lr": 1e-2},
            {
                "name": "sparse",
                "patch": {"attention": "dsa:stage=sparse"},
                "train": "all",
                "losses": {"lm": 1.0, "indexer_kl": 0.5},
                "steps": 2,
                "lr": 1e-3,
            },
        ],
    )
    run = _run(raw)
    rows = read_metrics(tmp_path / "out")
    assert all(r["loss"] == r["loss/indexer_kl"] > 0 for r in rows[:3]) and "loss/lm" not in rows[0]
    assert all(r["loss/lm"] > 0 and r["loss/indexer_kl"] > 0 for r in rows[3:])
    final = tmp_path / "out" / "final"
    assert json.loads((final / "config.json").read_text())["lcplug"]["spec"]["attention"]["stage"] == "sparse"
    trained = load_file(final / "model.safetensors")
    fresh = lcplug.patch(tiny_model("llama", vocab_size=256), dict(raw["patch"]))
    indexer = [n for n in trained if ".indexer." in n]
    assert indexer and all(not torch.equal(trained[n], fresh.state_dict()[n]) for n in indexer if n.endswith("wq"))
    assert run.trainee.model.model.layers[0].self_attn.lcplug_attention.compute_loss  # prepare_training switched it on


def test_duo_gates_train_on_lm_plus_l1_and_finalize_into_heads(recipe, read_metrics, tmp_path):
    raw = recipe(
        patch={"attention": "duo:sink=4,recent=8,block_size=16,l1=0.1"},
        stages=[
            {"name": "gates", "train": "gates", "losses": {"lm": 1.0, "duo_l1": 1.0}, "steps": 2, "finalize": True}
        ],
    )
    _run(raw)
    first = read_metrics(tmp_path / "out")[0]
    assert first["loss/duo_l1"] == pytest.approx(0.1 * 3 * 2)  # l1 x sum of 3 layers x 2 KV heads of gates at 1
    assert first["loss"] == pytest.approx(first["loss/lm"] + first["loss/duo_l1"])
    spec = json.loads((tmp_path / "out" / "final" / "config.json").read_text())["lcplug"]["spec"]["attention"]
    assert spec["mode"] == "final" and set(spec["heads"]) == set(spec["calibration"]) == {"0", "1", "2"}


def test_hybrid_offers_its_sparse_variants_groups_and_losses():
    model = tiny_model("llama", num_hidden_layers=4)
    lcplug.patch(model, attention={"name": "hybrid", "sparse": "dsa:block_size=16,topk=32", "ratio": "3:1"})
    plugin = lcplug.patch_state(model).plugins["attention"]
    indexer = plugin.trainable_groups(model)["indexer"]
    assert indexer and all(p.requires_grad for p in indexer)
    assert set(plugin.aux_losses()) == {"indexer_kl"}
