"""`lcplug.publish`: push a patched checkpoint (a directory, or a model saved on the fly) to the Hub.

The steps are the Hub's own, each named in an error: create the repo (private unless asked otherwise),
create the branch if a revision is given, upload the large files (LFS), then one commit with every
file. A failed step leaves the local directory as it was: publishing never writes into it (the card is
rendered in memory), and a model object is saved to a temporary directory first.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._version import __version__
from .bundle import Bundle, build_bundle
from .client import REPO_ID, HubError, hub_api, hub_step

DEFAULT_BRANCH = "main"


@dataclass(frozen=True)
class PublishResult:
    """What was (or, for a dry run, would be) published: the files with sizes, and the commit."""

    repo_id: str
    revision: str
    private: bool
    files: list[tuple[str, int]]
    dry_run: bool
    commit_url: str | None = None
    commit_oid: str | None = None


def publish(
    model_or_dir: Any,
    repo_id: str,
    *,
    private: bool = True,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    license: str | None = None,
    base_model: str | None = None,
    recipe: str | os.PathLike | Mapping[str, Any] | None = None,
    eval_dir: str | os.PathLike | None = None,
    tokenizer: Any = None,
    dry_run: bool = False,
) -> PublishResult:
    """Upload a checkpoint with its manifest and a model card to the Hub repo `repo_id` ("owner/name").

    `model_or_dir` is a directory saved with `lcplug.save_pretrained` (or a training run's `final/`,
    whose recipe, evaluation and adapter come along), or a model, saved first to a temporary directory
    (with `tokenizer`, if given). `private` applies when the repo is created (an existing repo keeps
    its visibility); `revision` is a branch, created from main if missing; `token` defaults to
    huggingface_hub's usual sources. `dry_run` prints the file list with sizes and uploads nothing.
    The card's `base_model` defaults to the run recipe's base model when that is a Hub id.
    """
    if not REPO_ID.fullmatch(repo_id):
        raise HubError(f"repo id {repo_id!r} is not valid; expected 'owner/name' (letters, digits, '-', '_', '.')")
    branch = revision or DEFAULT_BRANCH
    with _checkpoint_dir(model_or_dir, tokenizer) as directory:
        bundle = build_bundle(
            directory, repo_id, base_model=base_model, license=license, recipe=recipe, eval_dir=eval_dir
        )
        files = [(u.path_in_repo, u.size) for u in bundle.uploads]
        if dry_run:
            print(
                f"dry run: would publish {directory} to {repo_id} (revision {branch}, "
                f"{'private' if private else 'public'}); nothing uploaded"
            )
            print(bundle.table())
            return PublishResult(repo_id, branch, private, files, dry_run=True)
        commit = _push(bundle, repo_id, branch, private=private, message=commit_message, token=token)
    from ..registry import get_registry

    get_registry().hook.lcplug_published(repo_id=repo_id, revision=branch, manifest=bundle.manifest or {})
    return PublishResult(repo_id, branch, private, files, False, commit.commit_url, commit.oid)


@contextmanager
def _checkpoint_dir(model_or_dir: Any, tokenizer: Any) -> Iterator[Path]:
    """The directory to publish: the one given, or a temporary one the model (and tokenizer) is saved to."""
    if isinstance(model_or_dir, (str, os.PathLike)):
        yield Path(model_or_dir)
        return
    from ..checkpoint import save_pretrained

    with tempfile.TemporaryDirectory(prefix="lcplug-publish-") as tmp:
        save_pretrained(model_or_dir, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        yield Path(tmp)


def _push(bundle: Bundle, repo_id: str, branch: str, *, private: bool, message: str | None, token: str | None):
    """The Hub calls, one named step each: create repo, create branch, upload LFS files, commit."""
    api = hub_api(token)
    with hub_step("creating the repo", repo_id, token):
        api.create_repo(repo_id, private=private, exist_ok=True)
    if branch != DEFAULT_BRANCH:
        with hub_step(f"creating branch {branch!r}", repo_id, token):
            api.create_branch(repo_id, branch=branch, exist_ok=True)
    operations = bundle.operations()
    with hub_step("uploading the files", repo_id, token):
        api.preupload_lfs_files(repo_id, additions=operations, revision=branch)
    with hub_step(f"committing {len(operations)} files to {branch!r}", repo_id, token):
        return api.create_commit(
            repo_id,
            operations=operations,
            commit_message=message or _default_message(bundle),
            revision=branch,
        )


def _default_message(bundle: Bundle) -> str:
    spec = (bundle.manifest or {}).get("spec", {})
    stack = ", ".join(f"{kind}: {s['name']}" for kind, s in spec.items() if isinstance(s, Mapping) and "name" in s)
    return f"Upload long-context checkpoint ({stack or 'no patches'}) with lcplug {__version__}"
