"""Download a published checkpoint for `lcplug.from_pretrained`, checking its manifest before the weights.

The revision is pinned to one commit first, then config.json alone is fetched and its manifest
checked (a plugin that is not installed, or a manifest from a newer major lcplug, fails here, before
gigabytes of weights come down), then the snapshot at that same commit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from huggingface_hub.errors import EntryNotFoundError

from ..manifest import check_available
from ..spec import Manifest
from .client import hub_api, hub_step


def download(
    repo_id: str,
    *,
    revision: str | None = None,
    token: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """The local snapshot directory of `repo_id` at `revision` (a branch, tag or commit; default main)."""
    api = hub_api(token)
    with hub_step(f"finding revision {revision or 'main'!r} (no local directory of that name)", repo_id, token):
        commit = api.repo_info(repo_id, revision=revision).sha
    with hub_step("downloading config.json", repo_id, token):
        try:
            config = Path(api.hf_hub_download(repo_id, "config.json", revision=commit, cache_dir=cache_dir))
        except EntryNotFoundError:  # a PEFT adapter on its own has no config.json, and no manifest
            config = None
    if config is not None:
        data = json.loads(config.read_text()).get("lcplug")
        if data is not None:
            check_available(Manifest.from_dict(data))
    with hub_step("downloading the snapshot", repo_id, token):
        return Path(api.snapshot_download(repo_id, revision=commit, cache_dir=cache_dir))
