"""What goes wrong, and how it reads: failed uploads, the token, manifests this lcplug cannot load."""

from __future__ import annotations

import hashlib
import json
import logging
import re

import pytest

import lcplug
from lcplug.errors import ManifestError


def fingerprint(directory):
    return {p.relative_to(directory): hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.rglob("*")}


def test_a_failed_commit_names_the_step_and_leaves_the_folder_intact(hub, saved):
    before = fingerprint(saved)
    hub.fail("commit", 500)
    with pytest.raises(lcplug.HubError) as err:
        lcplug.publish(saved, "me/broken")
    message = str(err.value)
    assert re.fullmatch(
        r"committing \d+ files to 'main' failed for Hub repo 'me/broken': "
        r"HTTP 500 from POST http://127\.0\.0\.1:\d+/api/models/me/broken/commit/main: injected failure of commit",
        message,
    )
    assert fingerprint(saved) == before
    assert set(hub.repos["me/broken"].files()) == {".gitattributes"}  # nothing was committed
    hub.failures.clear()  # and publishing again, once the Hub is back, goes through
    lcplug.publish(saved, "me/broken")
    assert "model.safetensors" in hub.repos["me/broken"].files()


def test_the_token_never_appears_in_logs_output_card_or_files(hub, saved, monkeypatch, caplog, capfd):
    token = hub.token  # the one the fake Hub accepts
    monkeypatch.delenv("HF_TOKEN")
    caplog.set_level(logging.DEBUG)
    for name in ("huggingface_hub", "lcplug", "transformers"):
        caplog.set_level(logging.DEBUG, logger=name)
    monkeypatch.setattr(logging.getLogger("transformers"), "handlers", [caplog.handler])  # it does not propagate
    lcplug.publish(saved, "me/secret", token=token, revision="dev")
    lcplug.from_pretrained("me/secret", revision="dev", token=token)
    hub.fail("commit", 500)
    with pytest.raises(lcplug.HubError) as err:
        lcplug.publish(saved, "me/secret", token=token)
    out, errs = capfd.readouterr()
    assert {r.name.split(".")[0] for r in caplog.records} >= {"huggingface_hub", "transformers"}  # logs were seen
    assert token not in caplog.text and token not in out and token not in errs and token not in str(err.value)
    for name, content in hub.repos["me/secret"].files("dev").items():
        assert token.encode() not in content, name
    assert all(r.headers["authorization"] == f"Bearer {token}" for r in hub.calls("commit"))  # yet it was used


def test_a_wrong_token_is_refused_by_the_hub(hub, saved):
    with pytest.raises(lcplug.HubError, match=r"creating the repo failed for Hub repo 'me/x': .*401"):
        lcplug.publish(saved, "me/x", token="hf_wrong")


def edit_manifest(directory, **changes):
    config = json.loads((directory / "config.json").read_text())
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        node = config["lcplug"]
        for key in parents:
            node = node[key]
        node[leaf] = value
    (directory / "config.json").write_text(json.dumps(config))


def test_a_missing_plugin_names_its_distribution_before_the_weights_download(hub, saved):
    edit_manifest(
        saved,
        plugins__attention={"name": "ring-sparse", "distribution": "lcplug-ringsparse", "version": "2.1"},
        spec__attention={"name": "ring-sparse"},
    )
    lcplug.publish(saved, "me/ring")
    with pytest.raises(ManifestError, match="attention plugin 'ring-sparse' from distribution 'lcplug-ringsparse'"):
        lcplug.from_pretrained("me/ring")
    fetched = {r.path.rsplit("/", 1)[-1] for r in hub.calls("resolve")}
    assert fetched == {"config.json"}  # the weights were never downloaded


def test_a_manifest_from_a_newer_major_lcplug_is_refused(hub, saved):
    edit_manifest(saved, lcplug_version="7.0.0")
    lcplug.publish(saved, "me/future")
    with pytest.raises(
        ManifestError, match=rf"lcplug 7\.0\.0, a newer major version than the installed {lcplug.__version__}"
    ):
        lcplug.from_pretrained("me/future")


def test_a_repo_that_is_not_there(hub):
    with pytest.raises(
        lcplug.HubError,
        match=r"finding revision 'main' \(no local directory of that name\) failed for Hub repo 'me/nothing': HTTP 404",
    ):
        lcplug.from_pretrained("me/nothing")
    hub.repos.clear()
    with pytest.raises(lcplug.HubError, match="revision 'v9'"):
        lcplug.from_pretrained("me/nothing", revision="v9")
