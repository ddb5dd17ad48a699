"""A whole run and what it writes: metrics, TensorBoard, rotated checkpoints, eval rows, final/ that reloads."""

from __future__ import annotations

import json
import math

import torch
import yaml

import lcplug
from lcplug.cli import main
from lcplug.testing import logits
from lcplug.train import Recipe, train
from lcplug.train.runner import Run

SINKS = {"attention": "sliding-window:window=32,sinks=4,block_size=16,learnable_sink=true"}


def test_run_writes_metrics_checkpoints_eval_and_a_final_model_that_reloads(recipe, read_metrics, tmp_path):
    raw = recipe(
        patch=SINKS,
        stages=[
            {"name": "all", "train": "all", "steps": 4, "lr": 1e-3, "schedule": {"warmup": 2}},
            {"name": "sinks", "train": "sinks", "steps": 3, "lr": 1e-2, "grad_accum": 2},
        ],
        eval={"probes": ["ppl"], "lengths": [64], "samples": 1, "every": 3},
        output={"dir": str(tmp_path / "out"), "checkpoint_every": 2, "keep": 2},
    )
    run = Run(Recipe.from_dict(raw), resume=None, max_steps=None)
    summary = run.run()
    out = tmp_path / "out"

    rows = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 8))
    assert [r["stage"] for r in rows] == ["all"] * 4 + ["sinks"] * 3
    assert rows[0]["lr"] == 5e-4 and rows[1]["lr"] == 1e-3  # warm-up over 2 steps
    assert [r["tokens"] for r in rows] == [128, 256, 384, 512, 768, 1024, 1280]  # grad_accum 2 doubles a step
    assert all(math.isfinite(r[k]) for r in rows for k in ("loss", "loss/lm", "grad_norm", "tokens_per_s"))
    evals = [r for r in read_metrics(out) if "eval/ppl@64" in r]
    assert [(r["step"], r["stage"]) for r in evals] == [
        (0, "base"),
        (0, "before"),
        (3, "all"),
        (6, "sinks"),
        (7, "after"),
    ]

    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000004", "step-00000006"]
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert yaml.safe_load((out / "recipe.yaml").read_text())["stages"][1]["seq_len"] == 64
    assert sorted(p.name for p in (out / "eval").iterdir()) == ["ppl.png", "results.json", "table.txt"]
    card = (out / "final" / "README.md").read_text()
    assert "lcplug-attention-sliding-window" in card and "![perplexity by length and position](ppl.png)" in card
    assert (out / "final" / "ppl.png").is_file()
    saved = json.loads((out / "train_summary.json").read_text())
    assert saved["status"] == "complete" and saved["steps"] == 7 and saved == json.loads(json.dumps(summary))
    assert [s["train"] for s in saved["stages"]] == ["all", "sinks"]
    assert saved["stages"][1]["trainable_parameters"] == 3 * 4  # one sink logit per head and layer

    reloaded = lcplug.from_pretrained(out / "final")
    assert lcplug.manifest_of(reloaded)["spec"]["attention"]["learnable_sink"] is True
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits(reloaded.eval(), ids), logits(run.trainee.model.eval(), ids))


def test_max_steps_stops_with_a_checkpoint_and_the_cli_resumes(recipe, read_metrics, tmp_path, capsys):
    raw = recipe(
        stages=[{"name": "main", "steps": 4, "lr": 1e-3}], eval={"probes": "ppl", "lengths": [64], "samples": 1}
    )
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["train", str(path), "--max-steps", "2"]) == 0
    out = tmp_path / "out"
    assert json.loads((out / "train_summary.json").read_text())["status"] == "stopped"
    assert not (out / "final").exists() and (out / "checkpoints" / "step-00000002").is_dir()

    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({**raw, "stages": [{"name": "renamed", "steps": 4}]}))
    assert main(["train", str(other), "--resume", "auto"]) == 2
    assert "is in stage 'main', which is not stages[0] of this recipe" in capsys.readouterr().err

    assert main(["train", str(path)]) == 2  # a fresh run would mix with the stopped one's checkpoints
    assert "holds checkpoints of an earlier run (newest: step-00000002); continue it with --resume auto" in (
        capsys.readouterr().err
    )

    assert main(["train", str(path), "--resume", "auto"]) == 0
    rows = read_metrics(out)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert [(r["step"], r["stage"]) for r in rows if "eval/ppl@64" in r] == [
        (0, "base"),
        (4, "after"),
    ]  # no patch: no "before"
    assert (out / "final" / "config.json").is_file()


def test_cli_errors_are_one_line_with_exit_2(recipe, tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe(stages=[{"name": "main", "train": "loraa", "steps": 1}])))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "lcplug: error: stages[0].train: got 'loraa'; " + err.split("got 'loraa'; ")[1].strip()
    ]
    assert main(["train", str(path), "--resume", str(tmp_path / "nope")]) == 2
    assert "--resume: expected 'auto' or a checkpoint directory" in capsys.readouterr().err


def test_resume_after_a_finalized_stage_repeats_the_losses(recipe, read_metrics, tmp_path):
    stages = [
        {"name": "calibrate", "train": "gates", "steps": 2, "lr": 0.05, "finalize": True},
        {"name": "lora", "train": "lora", "steps": 3, "lr": 1e-3, "lora": {"r": 2, "target_modules": ["v_proj"]}},
    ]
    patch = {"attention": "loza:mode=calibrate,block=16,local_blocks=2"}
    straight = recipe(patch=patch, stages=stages, output={"dir": str(tmp_path / "a"), "log": ["jsonl"]})
    train(Recipe.from_dict(straight))
    stopped = Recipe.from_dict({**straight, "output": {"dir": str(tmp_path / "b"), "log": ["jsonl"]}})
    assert train(stopped, max_steps=3)["status"] == "stopped"  # one step into the LoRA stage, gates finalized
    assert train(stopped, resume="auto")["status"] == "complete"
    assert [r["loss"] for r in read_metrics(tmp_path / "b")] == [r["loss"] for r in read_metrics(tmp_path / "a")]


def test_a_fresh_run_into_the_same_directory_starts_a_fresh_log(recipe, read_metrics, tmp_path):
    raw = recipe()
    for _ in range(2):
        train(Recipe.from_dict(raw))
        assert [r["step"] for r in read_metrics(tmp_path / "out") if "loss" in r] == [1, 2, 3]
