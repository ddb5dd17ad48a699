"""The `lcplug` command line: listings, the check probe, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from lcplug import ConflictError, KVPlugin, __version__, get_registry, hookimpl
from lcplug.cli import main
from lcplug.registry import reset_registry
from lcplug.testing import tiny_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(path)
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("lcplug: error: ")
    return lines[0]


class NeedsAttention(KVPlugin):
    """A KV plugin that only combines with an attention plugin."""

    name = "needs-attention"

    def check_compatible(self, plugins):
        if "attention" not in plugins:
            raise ConflictError("kv:needs-attention needs an attention plugin in the same spec")


class Leaky(KVPlugin):
    """A KV plugin that changes a weight behind the transaction's back, so unpatch cannot undo it."""

    name = "leaky"

    def install(self, ctx):
        with torch.no_grad():
            ctx.model.get_output_embeddings().weight.mul_(2)


@pytest.fixture
def test_plugins():
    module = types.ModuleType("lcplug_cli_test_plugins")

    @hookimpl
    def lcplug_register(register):
        register(NeedsAttention)
        register(Leaky)

    module.lcplug_register = lcplug_register
    registry = get_registry()
    registry.register_module(module, distribution="tests")
    yield
    registry.unregister("kv", NeedsAttention.name)
    registry.unregister("kv", Leaky.name)
    registry.pm.unregister(module)


def test_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0
    assert out.strip() == f"lcplug {__version__}"


def test_python_m_lcplug_version():
    proc = subprocess.run([sys.executable, "-m", "lcplug", "--version"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"lcplug {__version__}"


def test_plugins_human(capsys):
    code, out, _ = run(capsys, "plugins")
    assert code == 0
    for text in ("attention:", "rope:", "adapter:", "sliding-window  (lcplug", "yarn  (lcplug"):
        assert text in out
    assert "window: int = 1024" in out
    assert "factor: float (required)" in out  # yarn's factor has no default
    assert "original_max_position_embeddings: int | None = none" in out


def test_plugins_json(capsys):
    code, out, _ = run(capsys, "plugins", "--json")
    assert code == 0
    rows = {(row["kind"], row["name"]): row for row in json.loads(out)}
    assert {("attention", "sliding-window"), ("rope", "yarn"), ("adapter", "generic")} <= set(rows)
    window = {p["name"]: p for p in rows["attention", "sliding-window"]["params"]}["window"]
    assert window["default"] == 1024 and window["help"]
    assert rows["rope", "yarn"]["origin"] == "lcplug"
    assert rows["rope", "yarn"]["version"] == __version__


def test_plugins_kind_filter(capsys):
    code, out, _ = run(capsys, "plugins", "--kind", "rope", "--json")
    assert code == 0
    assert {row["kind"] for row in json.loads(out)} == {"rope"}
    code, out, _ = run(capsys, "plugins", "--kind", "rope")
    assert code == 0
    assert "yarn" in out and "sliding-window" not in out


def test_plugins_kind_without_plugins(capsys, monkeypatch):
    registry = get_registry()
    monkeypatch.setattr(registry, "_classes", {key: cls for key, cls in registry._classes.items() if key[0] != "cp"})
    code, out, _ = run(capsys, "plugins", "--kind", "cp")
    assert code == 0
    assert out.strip() == "no cp plugins installed"


def test_plugins_bad_kind(capsys):
    code, out, err = run(capsys, "plugins", "--kind", "ropee")
    assert code == 2
    assert out == ""
    assert "did you mean 'rope'" in one_error_line(err)


def test_plugins_lists_skipped_entry_points(capsys, monkeypatch):
    monkeypatch.setenv("LCPLUG_DISABLE_PLUGINS", "rope-yarn")
    reset_registry()
    try:
        code, out, _ = run(capsys, "plugins")
    finally:
        reset_registry()  # reloads without the variable on next use
    assert code == 0
    assert "yarn  (lcplug" not in out
    assert "skipped entry points: rope-yarn (LCPLUG_DISABLE_PLUGINS)" in out


def test_check_full_attention_is_exact(capsys, checkpoint):
    code, out, _ = run(capsys, "check", str(checkpoint), "--attention", "full", "--json")
    assert code == 0
    report = json.loads(out)
    (probe,) = report["probes"]
    assert probe["applied"] and probe["parity_expected"]
    assert probe["max_abs_diff"] == 0
    assert probe["round_trip"] is True
    assert report["passed"] and report["left_padding"] > 0
    assert report["manifest"]["spec"]["attention"] == {"name": "full"}


def test_check_sliding_window_changes_logits(capsys, checkpoint):
    code, out, _ = run(capsys, "check", str(checkpoint), "--attention", "sliding-window:window=4", "--json")
    assert code == 0
    report = json.loads(out)
    (probe,) = report["probes"]
    assert probe["applied"] and not probe["parity_expected"]
    assert probe["max_abs_diff"] > 0
    assert probe["round_trip"] is True
    assert report["manifest"]["spec"]["attention"]["window"] == 4


def test_check_human_report_probes_each_plugin_then_all(capsys, checkpoint):
    argv = ["check", str(checkpoint), "--attention", "sliding-window:window=4", "--rope", "yarn:factor=8"]
    code, out, _ = run(capsys, *argv, "--layers", "0-1")
    assert code == 0
    labels = [line.split("  ")[0] for line in out.splitlines()[2:5]]  # after the title and the table head
    assert labels == ["attention sliding-window:window=4", "rope yarn:factor=8", "combined"]
    assert out.count("bit-identical") == 3
    assert '"layers": [\n      0,\n      1\n    ]' in out
    assert out.rstrip().endswith("PASS")


def test_check_plugin_that_cannot_apply_alone(capsys, checkpoint, test_plugins):
    code, out, _ = run(capsys, "check", str(checkpoint), "--attention", "full", "--kv", "needs-attention", "--json")
    assert code == 0
    probes = {p["label"]: p for p in json.loads(out)["probes"]}
    assert not probes["kv needs-attention"]["applied"]
    assert "needs an attention plugin" in probes["kv needs-attention"]["error"]
    assert probes["combined"]["applied"] and probes["combined"]["round_trip"]


def test_check_fails_when_unpatch_is_not_bit_identical(capsys, checkpoint, test_plugins):
    code, out, _ = run(capsys, "check", str(checkpoint), "--kv", "leaky")
    assert code == 1
    assert "NOT bit-identical" in out
    assert "FAIL: kv leaky: unpatch did not restore bit-identical logits" in out


def test_check_unknown_plugin_suggests_the_closest(capsys, checkpoint):
    code, out, err = run(capsys, "check", str(checkpoint), "--attention", "slidng-window")
    assert code == 2
    assert out == ""
    assert "'sliding-window'" in one_error_line(err)


def test_check_bad_param_names_it(capsys, checkpoint):
    code, _, err = run(capsys, "check", str(checkpoint), "--attention", "sliding-window:window=0")
    assert code == 2
    assert "'window'" in one_error_line(err)


def test_check_missing_model_dir(capsys, tmp_path):
    code, _, err = run(capsys, "check", str(tmp_path / "nope"), "--attention", "full")
    assert code == 2
    assert "nope" in one_error_line(err)


def test_check_needs_a_plugin(capsys, checkpoint):
    code, _, err = run(capsys, "check", str(checkpoint))
    assert code == 2
    assert "--attention" in one_error_line(err)


def test_usage_error_is_one_line(capsys):
    code, _, err = run(capsys, "check")
    assert code == 2
    assert "MODEL_DIR" in one_error_line(err)


def test_debug_shows_traceback(capsys, checkpoint):
    code, _, err = run(capsys, "--debug", "check", str(checkpoint), "--attention", "slidng-window")
    assert code == 2
    assert "Traceback (most recent call last)" in err
    assert err.strip().splitlines()[-1].startswith("lcplug: error: unknown attention plugin")
