"""A Hub-compatible HTTP endpoint in a thread, kept in memory: what lcplug's Hub tests publish to and load from.

huggingface_hub stays the real client; only the server is fake, so a test exercises the very requests a
real push and download make. It serves the calls of the installed client (huggingface_hub 1.x/2.x with
Xet disabled, `HF_HUB_DISABLE_XET=1`):

- writes: create repo, create branch, README metadata validation, preupload (upload mode per file), the
  LFS batch API with a single-part PUT, and the NDJSON commit;
- reads: repo info (with `sha` and `siblings`), the recursive tree listing, paths-info, and HEAD/GET of
  `/{repo}/resolve/{revision}/{path}` with the `ETag`, `X-Repo-Commit` and `Content-Length` headers
  `hf_hub_download` checks.

It records every request (`requests`) so a test can see what reached it, can be told to fail a step
(`fail("commit", 500)`), and with `token=` set refuses writes without `Authorization: Bearer <token>`
and hides private repos from anonymous reads, as the Hub does.

    with FakeHub(token="hf_test") as hub:
        HfApi(endpoint=hub.url, token="hf_test").create_repo("me/model")
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import itertools
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.png", "*.model")
"""Paths stored through LFS, as a new Hub repo's `.gitattributes` says; everything else is a regular blob."""

GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS).encode()

_REPO = r"(?P<repo>[^/]+/[^/]+)"
ROUTES: tuple[tuple[str, str, re.Pattern[str]], ...] = tuple(
    (method, name, re.compile(pattern))
    for method, name, pattern in (
        ("POST", "create", r"/api/repos/create"),
        ("POST", "validate-yaml", r"/api/validate-yaml"),
        ("GET", "info", rf"/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?"),
        ("POST", "preupload", rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)"),
        ("POST", "commit", rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)"),
        ("POST", "branch", rf"/api/models/{_REPO}/branch/(?P<rev>[^/]+)"),
        ("GET", "tree", rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?"),
        ("POST", "paths-info", rf"/api/models/{_REPO}/paths-info/(?P<rev>[^/]+)"),
        ("POST", "lfs-batch", rf"/{_REPO}\.git/info/lfs/objects/batch"),
        ("PUT", "lfs-upload", r"/lfs/(?P<oid>[0-9a-f]{64})"),
        ("HEAD", "resolve", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)"),
        ("GET", "resolve", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)"),
    )
)
"""(method, step name, path pattern on the raw path); the groups are URL-unquoted before use."""

WRITES = frozenset({"create", "preupload", "commit", "branch", "lfs-batch"})


@dataclass(frozen=True)
class Request:
    """One request as the server saw it (header names lower-cased)."""

    method: str
    route: str | None
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Commit:
    oid: str
    files: dict[str, bytes]
    message: str


@dataclass
class Repo:
    """A model repo: its visibility, branches (name -> commit oid) and every commit by oid."""

    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        oid = self.branches.get(revision, revision)
        return self.commits.get(oid)

    def files(self, revision: str = "main") -> dict[str, bytes]:
        """The files at `revision` (a branch or a commit oid)."""
        commit = self.resolve(revision)
        if commit is None:
            raise KeyError(f"{self.repo_id} has no revision {revision!r}")
        return commit.files


class HubError(Exception):
    """An error response: status, the Hub's `X-Error-Code`, a message, and any extra fields of the JSON body."""

    def __init__(self, status: int, message: str, code: str | None = None, commit: str | None = None, **extra: Any):
        super().__init__(message)
        self.status, self.code, self.commit, self.extra = status, code, commit, extra


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob, which is what the Hub reports as a regular file's oid and ETag."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def is_lfs(path: str) -> bool:
    return any(fnmatch.fnmatch(path.rsplit("/", 1)[-1], p) for p in LFS_PATTERNS)


def file_oid(path: str, data: bytes) -> str:
    """The oid the Hub reports for a file's content (preupload, ETag): sha256 for LFS files, else the git oid."""
    return hashlib.sha256(data).hexdigest() if is_lfs(path) else git_blob_oid(data)


class FakeHub:
    """The server and its state. Use as a context manager, or call `start()` and `close()`."""

    def __init__(self, token: str | None = None):
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.requests: list[Request] = []
        self.failures: dict[str, int] = {}
        self._lock = threading.Lock()
        self._counter = itertools.count()
        self._server: ThreadingHTTPServer | None = None

    # ---- lifecycle ---------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("FakeHub is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            server_state = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True).start()
        return self

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- test controls -----------------------------------------------------------------------------

    def fail(self, route: str, status: int = 500) -> None:
        """Answer every request of `route` (a step name of ROUTES, e.g. "commit") with `status` until cleared."""
        if route not in {name for _, name, _ in ROUTES}:
            raise ValueError(f"unknown route {route!r}; valid: {sorted({name for _, name, _ in ROUTES})}")
        self.failures[route] = status

    def calls(self, route: str) -> list[Request]:
        """The requests of one step, in order."""
        return [r for r in self.requests if r.route == route]

    # ---- the Hub's behaviour -----------------------------------------------------------------------

    def handle(self, request: Request, groups: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        """Answer one routed request: (status, headers, body). Raises HubError for error responses."""
        if request.route in self.failures:
            raise HubError(self.failures[request.route], f"injected failure of {request.route}")
        authorized = self.token is None or request.headers.get("authorization") == f"Bearer {self.token}"
        if request.route in WRITES and not authorized:
            raise HubError(401, "Invalid credentials in Authorization header")
        if request.route == "create":
            return self._create(request)
        if request.route == "validate-yaml":
            return _json({"errors": [], "warnings": []})
        if request.route == "lfs-upload":
            return self._lfs_upload(request, groups["oid"])
        repo = self.repos.get(groups["repo"])
        if repo is None or (repo.private and not authorized):
            raise HubError(404, "Repository not found", "RepoNotFound")
        handler = getattr(self, "_" + request.route.replace("-", "_"))
        return handler(request, repo, groups)

    def _create(self, request: Request) -> tuple[int, dict[str, str], bytes]:
        payload = request.json()
        repo_id = f"{payload['organization']}/{payload['name']}"
        if repo_id in self.repos:
            raise HubError(409, "You already created this model repo", url=f"{self.url}/{repo_id}")
        repo = Repo(repo_id, private=payload.get("visibility", "public") != "public" or bool(payload.get("private")))
        self._add_commit(repo, "main", {".gitattributes": GITATTRIBUTES}, "initial commit")
        self.repos[repo_id] = repo
        return _json({"url": f"{self.url}/{repo_id}", "name": repo_id})

    def _info(self, request: Request, repo: Repo, groups: dict[str, str]):
        commit = self._revision(repo, groups.get("rev") or "main")
        return _json(
            {
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "sha": commit.oid,
                "private": repo.private,
                "siblings": [{"rfilename": path} for path in sorted(commit.files)],
            }
        )

    def _preupload(self, request: Request, repo: Repo, groups: dict[str, str]):
        commit = self._revision(repo, groups["rev"])
        files = []
        for entry in request.json()["files"]:
            path, existing = entry["path"], commit.files.get(entry["path"])
            files.append(
                {
                    "path": path,
                    "uploadMode": "lfs" if is_lfs(path) else "regular",
                    "shouldIgnore": False,
                    "oid": None if existing is None else file_oid(path, existing),
                }
            )
        return _json({"files": files, "commitOid": commit.oid})

    def _lfs_batch(self, request: Request, repo: Repo, groups: dict[str, str]):
        objects = []
        for obj in request.json()["objects"]:
            entry: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.lfs:
                entry["actions"] = {"upload": {"href": f"{self.url}/lfs/{obj['oid']}", "expires_in": 3600}}
            objects.append(entry)
        return _json({"transfer": "basic", "objects": objects})

    def _lfs_upload(self, request: Request, oid: str):
        if hashlib.sha256(request.body).hexdigest() != oid:
            raise HubError(400, f"uploaded content does not hash to {oid}")
        self.lfs[oid] = request.body
        return 200, {}, b""

    def _revision(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def _commit(self, request: Request, repo: Repo, groups: dict[str, str]):
        branch = groups["rev"]
        if branch not in repo.branches:
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        files = dict(self._revision(repo, branch).files)
        lines = [json.loads(line) for line in request.body.splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        for line in lines:
            value = line["value"]
            if line["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif line["key"] == "lfsFile":
                if value["oid"] not in self.lfs:
                    raise HubError(400, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                files[value["path"]] = self.lfs[value["oid"]]
            elif line["key"] == "deletedFile":
                files.pop(value["path"], None)
        commit = self._add_commit(repo, branch, files, header["summary"])
        return _json({"commitUrl": f"{self.url}/{repo.repo_id}/commit/{commit.oid}", "commitOid": commit.oid})

    def _branch(self, request: Request, repo: Repo, groups: dict[str, str]):
        branch = groups["rev"]
        if branch in repo.branches:
            raise HubError(409, f"Reference {branch} already exists")
        start = (request.json() if request.body else {}).get("startingPoint") or "main"
        repo.branches[branch] = self._revision(repo, start).oid
        return _json({})

    def _tree(self, request: Request, repo: Repo, groups: dict[str, str]):
        commit = self._revision(repo, groups["rev"])
        prefix = (groups.get("path") or "").strip("/")
        paths = [p for p in sorted(commit.files) if not prefix or p.startswith(prefix + "/")]
        return _json([_tree_entry(p, commit.files[p]) for p in paths])

    def _paths_info(self, request: Request, repo: Repo, groups: dict[str, str]):
        commit = self._revision(repo, groups["rev"])
        form = parse_qs(request.body.decode())
        wanted = form.get("paths", []) or json.loads(request.body or b"{}").get("paths", [])
        return _json([_tree_entry(p, commit.files[p]) for p in wanted if p in commit.files])

    def _resolve(self, request: Request, repo: Repo, groups: dict[str, str]):
        commit = self._revision(repo, groups["rev"])
        data = commit.files.get(groups["path"])
        if data is None:
            raise HubError(404, "Entry not found", "EntryNotFound", commit=commit.oid)
        headers = {"ETag": f'"{file_oid(groups["path"], data)}"', "X-Repo-Commit": commit.oid, "Accept-Ranges": "bytes"}
        return 200, headers, data

    def _add_commit(self, repo: Repo, branch: str, files: dict[str, bytes], message: str) -> Commit:
        with self._lock:
            oid = hashlib.sha1(f"{repo.repo_id}:{next(self._counter)}".encode()).hexdigest()
        commit = Commit(oid, files, message)
        repo.commits[oid] = commit
        repo.branches[branch] = oid
        return commit


def _tree_entry(path: str, data: bytes) -> dict[str, Any]:
    entry: dict[str, Any] = {"type": "file", "path": path, "size": len(data), "oid": git_blob_oid(data)}
    if is_lfs(path):
        entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
    return entry


def _json(value: Any) -> tuple[int, dict[str, str], bytes]:
    return 200, {"Content-Type": "application/json"}, json.dumps(value).encode()


class _Handler(BaseHTTPRequestHandler):
    """Routes a request to the FakeHub and writes its answer; HTTP/1.1 with a Content-Length on every reply."""

    protocol_version = "HTTP/1.1"
    server_state: FakeHub

    def do_GET(self) -> None:
        self._serve()

    def do_HEAD(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_PUT(self) -> None:
        self._serve()

    def log_message(self, format: str, *args: Any) -> None:  # the request log replaces stderr lines
        pass

    def _serve(self) -> None:
        hub = self.server_state
        split = urlsplit(self.path)
        route, groups = None, {}
        for method, name, pattern in ROUTES:
            m = pattern.fullmatch(split.path)
            if method == self.command and m:
                route, groups = name, {k: unquote(v) for k, v in m.groupdict().items() if v is not None}
                break
        request = Request(
            self.command,
            route,
            unquote(split.path),
            parse_qs(split.query),
            {k.lower(): v for k, v in self.headers.items()},
            self._body(),
        )
        hub.requests.append(request)
        try:
            if route is None:
                raise HubError(404, f"no such endpoint: {self.command} {split.path}")
            status, headers, body = hub.handle(request, groups)
        except HubError as err:
            status, body = err.status, json.dumps({"error": str(err), **err.extra}).encode()
            headers = {"Content-Type": "application/json", "X-Error-Message": str(err)}
            if err.code:
                headers["X-Error-Code"] = err.code
            if err.commit:
                headers["X-Repo-Commit"] = err.commit
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))
