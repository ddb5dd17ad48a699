"""`lcplug.publish` against the fake Hub, and `lcplug.from_pretrained` back from it."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import lcplug
from lcplug import cli, hookimpl
from lcplug.testing import logits


def card_of(hub, repo_id, revision="main"):
    text = hub.repos[repo_id].files(revision)["README.md"].decode()
    _, header, body = text.split("---\n", 2)
    return yaml.safe_load(header), body


def test_round_trip_through_the_hub_gives_identical_logits(hub, saved, patched, batch):
    result = lcplug.publish(saved, "me/tiny-32k", license="apache-2.0", base_model="org/tiny-base")
    files = hub.repos["me/tiny-32k"].files()
    assert {
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
    } <= set(files)
    assert json.loads(files["config.json"])["lcplug"]["spec"] == lcplug.manifest_of(patched)["spec"]
    assert result.commit_oid == hub.repos["me/tiny-32k"].branches["main"] and not result.dry_run
    # the weights went through the LFS batch API, the small files inline in the commit, with the default token
    assert [r.route for r in hub.requests if r.method == "PUT"] == ["lfs-upload"]
    assert hub.calls("commit")[0].headers["authorization"].startswith("Bearer hf_")

    loaded = lcplug.from_pretrained("me/tiny-32k")
    ids, mask = batch
    assert torch.equal(logits(loaded, ids, mask), logits(patched, ids, mask))
    assert lcplug.manifest_of(loaded)["spec"] == lcplug.manifest_of(patched)["spec"]


def test_card_metadata_and_body(hub, saved):
    lcplug.publish(saved, "me/tiny-32k", license="apache-2.0", base_model="org/tiny-base")
    meta, body = card_of(hub, "me/tiny-32k")
    assert meta["library_name"] == "lcplug" and meta["pipeline_tag"] == "text-generation"
    assert meta["license"] == "apache-2.0" and meta["base_model"] == "org/tiny-base"
    assert {"lcplug", "lcplug-attention-sliding-window", "lcplug-rope-yarn"} <= set(meta["tags"])
    assert "need lcplug" in body and "plain transformers" in body
    assert '"window": 5' in body and '"factor": 4.0' in body  # the plugin stack with every parameter
    assert 'lcplug.from_pretrained("me/tiny-32k")' in body


def test_a_training_runs_final_brings_recipe_eval_plots_and_adapter(hub, saved, tmp_path):
    """Publishing `<run>/final` picks up what the runner wrote beside it."""
    from peft import LoraConfig, get_peft_model

    from lcplug.testing import tiny_model

    run = tmp_path / "run"
    saved.rename(run / "final") if run.mkdir() is None else None
    (run / "train_summary.json").write_text("{}")
    recipe = {"name": "tiny", "base": {"model": "org/tiny-base"}, "data": {"mixture": {"code": 0.7, "text": 0.3}}}
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (run / "eval").mkdir()
    result = {"model": "after", "haystack": None, "probes": {"ppl": {"settings": {"seed": 0, "samples": 1}}}}
    result["probes"]["ppl"]["by_length"] = [{"length": 64, "ppl": 12.5, "beyond_max_positions": False}]
    (run / "eval" / "results.json").write_text(json.dumps({"models": [result]}))
    (run / "eval" / "ppl.png").write_bytes(b"\x89PNG\r\n\x1a\n fake plot")
    lora = get_peft_model(tiny_model("qwen3"), LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_pretrained(run / "adapter")

    lcplug.publish(run / "final", "me/run")
    files = hub.repos["me/run"].files()
    assert {"ppl.png", "adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= set(files)
    meta, body = card_of(hub, "me/run")
    assert meta["base_model"] == "org/tiny-base"
    assert "## Recipe" in body and 'Training data mixture: `{"code": 0.7, "text": 0.3}`' in body
    assert "Long-context evaluation" in body and "![perplexity by length and position](ppl.png)" in body
    assert 'subfolder="adapter"' in body


def test_dry_run_lists_files_with_sizes_and_uploads_nothing(hub, saved, patched, tokenizer, capsys):
    result = lcplug.publish(saved, "me/dry", dry_run=True)
    out = capsys.readouterr().out
    assert result.dry_run and result.commit_oid is None
    assert hub.requests == [] and hub.repos == {}
    size = (saved / "model.safetensors").stat().st_size
    assert "model.safetensors" in out and f"{size / 1024:.1f} KiB" in out and "README.md" in out
    assert "nothing uploaded" in out
    # a model object is saved (with its tokenizer) to a temporary directory first
    from_model = lcplug.publish(patched, "me/dry", tokenizer=tokenizer, dry_run=True)
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {name for name, _ in from_model.files}
    assert hub.requests == []


def test_private_flag_and_revision_reach_the_server(hub, saved, patched, batch):
    lcplug.publish(saved, "me/default")
    assert hub.repos["me/default"].private  # private unless asked otherwise
    assert hub.calls("create")[0].json()["visibility"] == "private"

    result = lcplug.publish(saved, "me/public", private=False, revision="v2", commit_message="first cut")
    repo = hub.repos["me/public"]
    assert not repo.private and hub.calls("create")[1].json()["visibility"] == "public"
    assert "model.safetensors" in repo.files("v2") and "model.safetensors" not in repo.files("main")
    assert hub.calls("commit")[-1].path.endswith("/commit/v2") and result.revision == "v2"
    assert repo.commits[repo.branches["v2"]].message == "first cut"
    loaded = lcplug.from_pretrained("me/public", revision="v2")
    ids, mask = batch
    assert torch.equal(logits(loaded, ids, mask), logits(patched, ids, mask))
    # publishing to the branch again finds it there
    lcplug.publish(saved, "me/public", revision="v2")
    assert len(hub.calls("branch")) == 2 and repo.branches.keys() == {"main", "v2"}


def test_the_published_hook_fires(hub, saved, patched):
    seen = []

    class Watcher:
        @hookimpl
        def lcplug_published(self, repo_id, revision, manifest):
            seen.append((repo_id, revision, manifest["spec"]["rope"]["name"]))

    registry = lcplug.get_registry()
    watcher = Watcher()
    registry.pm.register(watcher)
    try:
        lcplug.publish(saved, "me/hooked", revision="dev")
        lcplug.publish(saved, "me/hooked", dry_run=True)  # a dry run publishes nothing, so no hook
    finally:
        registry.pm.unregister(watcher)
    assert seen == [("me/hooked", "dev", "yarn")]


def test_cli_publish(hub, saved, capsys):
    assert cli.main(["publish", str(saved), "me/cli", "--public", "--revision", "dev", "--dry-run"]) == 0
    assert "model.safetensors" in capsys.readouterr().out and hub.requests == []
    assert cli.main(["publish", str(saved), "me/cli", "--license", "mit", "--message", "from the CLI"]) == 0
    assert "published" in capsys.readouterr().err
    repo = hub.repos["me/cli"]
    assert repo.private and repo.commits[repo.branches["main"]].message == "from the CLI"
    assert cli.main(["publish", str(saved), "not-a-repo-id"]) == 2
    assert "repo id 'not-a-repo-id' is not valid; expected 'owner/name'" in capsys.readouterr().err


@pytest.mark.parametrize("content", [None, ["notes.txt", "optimizer.pt"]])
def test_only_checkpoint_files_are_uploaded(hub, tmp_path, saved, content, capsys):
    if content is None:  # an empty directory is not a checkpoint
        empty = tmp_path / "empty"
        empty.mkdir()
        with pytest.raises(lcplug.HubError, match="holds no checkpoint to publish"):
            lcplug.publish(empty, "me/x", dry_run=True)
        return
    for name in content:
        (saved / name).write_text("private")
    (saved / "README.md").write_text("an old card")
    result = lcplug.publish(saved, "me/x", dry_run=True)
    names = {name for name, _ in result.files}
    assert not names & {"notes.txt", "optimizer.pt"}
    assert "not uploaded: README.md, notes.txt, optimizer.pt" in capsys.readouterr().out


def test_a_peft_adapter_on_its_own_is_publishable(hub, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    from lcplug.hub import build_bundle
    from lcplug.testing import tiny_model

    directory = tmp_path / "lora"
    get_peft_model(tiny_model("qwen3"), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(directory)
    bundle = build_bundle(directory, "me/lora")
    assert [u.path_in_repo for u in bundle.uploads] == ["adapter_config.json", "adapter_model.safetensors", "README.md"]
    card = bundle.uploads[-1].source.decode()
    assert 'peft.PeftModel.from_pretrained(model, "me/lora")' in card and "No lcplug patches" in card
