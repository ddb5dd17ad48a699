"""Talking to the Hub: one HfApi per call site, and one way to turn a failed Hub call into an LcplugError.

huggingface_hub does the HTTP; this module only decides how lcplug names itself to the Hub and how a
failure reads: which step failed, for which repo, with the server's answer on one line, and never the
token (scrubbed from the message even if a server echoed it).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

from huggingface_hub import HfApi, get_token

from .._version import __version__
from ..errors import LcplugError

REPO_ID = re.compile(r"[\w.\-]+/[\w.\-]+")
"""A Hub model repo id, 'owner/name'."""


class HubError(LcplugError, OSError):
    """A Hub call (create, upload, commit, download) failed, or its input cannot be published."""


def hub_api(token: str | None) -> HfApi:
    """An HfApi for lcplug; `token=None` means huggingface_hub's usual sources (HF_TOKEN, `hf auth login`).

    The endpoint is huggingface_hub's own (`HF_ENDPOINT`, read when huggingface_hub is imported).
    """
    return HfApi(token=token, library_name="lcplug", library_version=__version__)


@contextmanager
def hub_step(step: str, repo_id: str, token: str | None) -> Iterator[None]:
    """Run Hub calls as one named step; any failure becomes a HubError naming the step and the repo.

    Every exception is translated (HTTP errors, connection errors, bad repo ids), with the original
    chained for `--debug`, because the client library's error classes differ between its versions.
    """
    try:
        yield
    except LcplugError:
        raise
    except Exception as exc:
        detail = _describe(exc)
        secret = token or get_token()
        if secret:
            detail = detail.replace(secret, "***")
        raise HubError(f"{step} failed for Hub repo {repo_id!r}: {detail}") from exc


def _describe(exc: Exception) -> str:
    """One line: for an HTTP error the status, the request and the server's message; else the error itself."""
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    if status is None:
        return " ".join(str(exc).split()) or type(exc).__name__
    request = response.request
    server = getattr(exc, "server_message", None) or ""
    return f"HTTP {status} from {request.method} {request.url}" + (f": {' '.join(server.split())}" if server else "")
