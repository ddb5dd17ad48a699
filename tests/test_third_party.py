"""A third-party plugin package, installed the way a user installs one, is found, runs, and can be hidden.

`examples/third_party_plugin` is pip-installed (no deps, no build isolation, no index) into a throwaway
`--target` directory; subprocesses put it on PYTHONPATH, so the project's venv is never modified and
lcplug finds the plugin only through the distribution's entry point.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "third_party_plugin"
DISTRIBUTION = "lcplug-example-chunked"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The example installed into `<tmp>/site`; its source (with its tests) copied to `<tmp>/src`.

    Building from a copy keeps setuptools' build/ and egg-info out of the repository.
    """
    root = tmp_path_factory.mktemp("third_party")
    src = root / "src"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index"]
    cmd += ["--disable-pip-version-check", "--quiet", "--target", str(root / "site"), str(src)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return root


def run(installed: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the project's python with the example on PYTHONPATH and no LCPLUG_* selection inherited.

    One torch thread unless the caller's environment says otherwise: on tiny models extra threads only
    contend for the cores (halves this file's time on 2 cores).
    """
    base = {k: v for k, v in os.environ.items() if not k.startswith("LCPLUG_")}
    path = os.pathsep.join(filter(None, [str(installed / "site"), base.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, *args],
        cwd=installed,
        env={"OMP_NUM_THREADS": "1", **base, "PYTHONPATH": path, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"{args} exited {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


PROBE = """
import contextlib, io, json, os, runpy, sys

import torch

import lcplug
from lcplug.registry import get_registry, reset_registry
from lcplug.testing import dense_reference_logits, sample_batch, tiny_model

out = {}

# `python -m lcplug plugins --kind attention --json`, run the way -m runs it
sys.argv = ["lcplug", "plugins", "--kind", "attention", "--json"]
listing = io.StringIO()
with contextlib.redirect_stdout(listing):
    try:
        runpy.run_module("lcplug", run_name="__main__", alter_sys=True)
    except SystemExit as done:
        out["cli_exit"] = done.code
out["cli_rows"] = json.loads(listing.getvalue())
out["api_rows"] = lcplug.list_plugins("attention")

model = tiny_model("llama")
ids, mask = sample_batch(model)
real = mask.bool()
with torch.no_grad():
    before = model(input_ids=ids, attention_mask=mask).logits
    lcplug.patch(model, attention="chunked-local:chunk=8")
    patched = model(input_ids=ids, attention_mask=mask).logits
reference = dense_reference_logits(model, ids, mask)
out["manifest"] = lcplug.manifest_of(model)["plugins"]["attention"]
out["vs_reference"] = (patched[real] - reference[real]).abs().max().item()
out["vs_unpatched"] = (patched[real] - before[real]).abs().max().item()

# each switch applies when the registry loads: reload it once per setting
out["switches"] = {}
for var, value in json.loads(os.environ["SWITCHES"]):
    for name in ("LCPLUG_PLUGINS", "LCPLUG_DISABLE_PLUGINS", "LCPLUG_DISABLE_PLUGIN_AUTOLOAD"):
        os.environ.pop(name, None)
    if var:
        os.environ[var] = value
    reset_registry()
    registry = get_registry()
    out["switches"][f"{var}={value}"] = {"attention": registry.names("attention"), "skipped": registry.skipped}
print(json.dumps(out))
"""

SWITCHES = [
    ("LCPLUG_DISABLE_PLUGIN_AUTOLOAD", "1"),
    ("LCPLUG_DISABLE_PLUGINS", DISTRIBUTION),
    ("LCPLUG_PLUGINS", "nonexistent"),
]


@pytest.fixture(scope="module")
def probe(installed) -> dict:
    """One subprocess (imports cost seconds) runs the CLI, a patch, and every env switch; tests read its answers."""
    settings = [("", ""), ("LCPLUG_PLUGINS", DISTRIBUTION), *SWITCHES]
    done = run(installed, "-c", PROBE, env={"SWITCHES": json.dumps(settings)})
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_cli_lists_the_plugin_with_its_origin(probe):
    assert probe["cli_exit"] in (0, None)
    (row,) = [r for r in probe["cli_rows"] if r["name"] == "chunked-local"]
    assert (row["kind"], row["origin"], row["version"]) == ("attention", DISTRIBUTION, "0.1.0")
    assert [p["name"] for p in row["params"]] == ["chunk", "block_size", "executor"]
    assert {r["name"] for r in probe["cli_rows"]} >= {"full", "sliding-window"}
    assert probe["api_rows"] == probe["cli_rows"]


def test_patch_with_the_plugin_matches_the_reference(probe):
    assert probe["manifest"] == {"name": "chunked-local", "distribution": DISTRIBUTION, "version": "0.1.0"}
    assert probe["vs_reference"] <= 1e-5
    assert probe["vs_unpatched"] > 1e-3  # chunking really changed what tokens see


def test_env_switches_hide_the_plugin_and_keep_first_party_ones(probe):
    seen = probe["switches"]
    assert "chunked-local" in seen["="]["attention"]
    assert "chunked-local" in seen[f"LCPLUG_PLUGINS={DISTRIBUTION}"]["attention"]  # selected by distribution name
    for var, value in SWITCHES:
        names, skipped = seen[f"{var}={value}"]["attention"], seen[f"{var}={value}"]["skipped"]
        assert "chunked-local" not in names, var
        assert {"full", "sliding-window"} <= set(names), var
        assert ["chunked-local", var] in skipped, var


def test_the_packages_own_tests_pass(installed):
    """The example's tests use the conformance kit through the fixtures of lcplug's pytest11 plugin."""
    done = run(installed, "-m", "pytest", str(installed / "src" / "tests"), "-q", "-p", "no:cacheprovider")
    assert " passed" in done.stdout, done.stdout
