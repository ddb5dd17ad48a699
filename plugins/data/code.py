"""`code`: local code trees, one long document per repository (its files concatenated, dependencies first)."""

from __future__ import annotations

import functools
import hashlib
import heapq
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from lcplug.data.base import DataContext, DataError, FileText, Piece, Source, SourcePlugin, permutation
from lcplug.data.files import file_identity
from lcplug.eval.haystack import SKIPPED_DIRS, stdlib_source
from lcplug.hookspecs import hookimpl
from lcplug.params import Params, param

CODE_EXTENSIONS = ["py", "pyi", "c", "h", "cpp", "hpp", "rs", "go", "java", "js", "ts", "sh", "md", "rst", "toml"]
"""File endings read by default: source files of common languages, and the docs and configs beside them."""

LOOSE = "."
"""The repository of the files directly in the tree's top directory."""

PY_IMPORT = re.compile(r"^[ \t]*(?:from[ \t]+([.\w]+)[ \t]+import[ \t]+\(?([^\n#;)]+)|import[ \t]+([^\n#;]+))", re.M)
C_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]+"([^"\n]+)"', re.M)


@dataclass(frozen=True)
class CodeParams(Params):
    path: str | None = param(None, "a directory of code (default: the running Python's standard library)")
    repos: Literal["subdirs", "root"] = param(
        "subdirs",
        "subdirs: each subdirectory is a repository, the loose top-level files one more; root: the whole tree is one",
    )
    extensions: list[str] = param(CODE_EXTENSIONS, "file name endings to read (without the dot)")
    order: Literal["dependency", "path"] = param(
        "dependency", "file order in a repository: imported modules/included headers first, or by path"
    )
    shuffle: bool = param(True, "repository order seeded per epoch (files keep their order)")
    max_file_bytes: int = param(
        1_000_000, "larger files (generated, minified) are skipped and counted", check=lambda v: v >= 1, valid=">= 1"
    )


@dataclass(frozen=True)
class Repo:
    """A repository: its name (document group) and directory; loose files of the top directory if `loose`."""

    name: str
    path: Path
    loose: bool = False


@dataclass(frozen=True)
class CodeFile:
    """A file of a repository as one `stat` saw it: its path, its header name, and its identity (the
    piece it makes: `file_identity` of the file and its header)."""

    path: str
    name: str
    stat: os.stat_result
    identity: bytes


ORDER_VERSION = 1
"""Part of a cached dependency order's key: bump it when `_dependencies` or `topological_order` change."""


class CodeSource(Source):
    """Repositories as documents: a header line then the text of each file, in dependency order.

    The state is (repository position in the epoch's order, file index, whether the document started),
    so a resume re-derives the file order of the current repository and continues at its next file.
    Each file is `stat`-ed once per pass; with a token cache (`facts`), a file whose identity the cache
    knows is not read, and a repository whose files' identities it knows is not scanned for imports.
    """

    def __init__(self, name: str, params: CodeParams, **kwargs: Any):
        super().__init__(name, **kwargs)
        self.params = params
        self.root = Path(params.path) if params.path is not None else stdlib_source()
        if not self.root.is_dir():
            raise DataError(f"data source {name!r}: code path {str(self.root)!r} is not a directory")
        self.endings = tuple("." + e.lstrip(".") for e in params.extensions)
        self.repos = self._repos()

    def _repos(self) -> list[Repo]:
        if self.params.repos == "root":
            return [Repo(self.root.name, self.root)]
        subdirs = sorted(
            p for p in self.root.iterdir() if p.is_dir() and p.name not in SKIPPED_DIRS and not p.name.startswith(".")
        )
        return [Repo(LOOSE, self.root, loose=True), *(Repo(p.name, p) for p in subdirs)]

    def files(self, repo: Repo) -> list[CodeFile]:
        """The repository's regular files with the configured endings, by path (in a subdirectory repository,
        hidden files and directories and SKIPPED_DIRS are left out)."""
        found: list[tuple[str, str]] = []  # (path relative to the repository, path)
        if repo.loose:
            found = [(e.name, e.path) for e in os.scandir(repo.path)]
        else:
            for top, dirs, names in os.walk(repo.path):
                dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS and not d.startswith(".")]
                rel = os.path.relpath(top, repo.path).replace(os.sep, "/")
                prefix = "" if rel == "." else rel + "/"
                found += [(prefix + n, os.path.join(top, n)) for n in names if not n.startswith(".")]
        out = []
        for rel, path in sorted(found):
            if not rel.endswith(self.endings):
                continue
            try:
                st = os.stat(path)
            except OSError:
                continue  # vanished or a broken link: not a file of the repository
            if stat.S_ISREG(st.st_mode):  # regular files only: a pipe or socket would block
                name = rel if repo.loose else f"{repo.name}/{rel}"
                out.append(CodeFile(path, name, st, file_identity(path, st, "code", name)))
        return out

    def _read(self, file: CodeFile) -> str | None:
        """A file's piece (its header and text), or None (skipped and counted) if it is too large or not UTF-8."""
        if file.stat.st_size > self.params.max_file_bytes:
            self.skip("too large", file.path)
            return None
        try:
            with open(file.path, "rb") as f:
                text = f.read().decode("utf-8")
        except UnicodeDecodeError:
            self.skip("undecodable", file.path)
            return None
        except OSError as exc:
            self.skip("unreadable", f"{file.path} ({exc.strerror})")
            return None
        return f"--- {file.name} ---\n" + text + ("" if text.endswith("\n") else "\n")

    def ordered(self, repo: Repo) -> list[CodeFile]:
        """The repository's files in the configured order (dependencies first where they are detectable).

        The dependency order depends on the files' contents only through their identities, so with a
        token cache it is recorded under a key of them and a later pass reads no file to order them."""
        files = self.files(repo)
        if self.params.order == "path" or len(files) < 2:
            return files
        base = repo.path if repo.loose or self.params.repos == "root" else repo.path.parent
        spec = f"code order {ORDER_VERSION}\0{self.params.repos}\0{self.params.max_file_bytes}\0{base}".encode()
        key = hashlib.blake2b(spec + b"".join(f.identity for f in files), digest_size=16).digest()
        order = self.facts.derived(key) if self.facts is not None else None
        if order is None or sorted(order) != list(range(len(files))):
            rels = [PurePosixPath(os.path.relpath(f.path, base).replace(os.sep, "/")) for f in files]
            order = topological_order(_dependencies(rels, [_peek(f, self.params.max_file_bytes) for f in files]))
            if self.facts is not None:
                self.facts.record_derived(key, order)
        return [files[i] for i in order]

    def _piece(self, file: CodeFile, *, first: bool, size: int, group: str) -> Piece | None:
        """The piece of one file: without its text where the token cache knows it; None if skipped."""
        if file.stat.st_size > self.params.max_file_bytes:
            self.skip("too large", file.path)
            return None
        known = self.facts.known(file.identity) if self.facts is not None else None
        text = None if known is not None else self._read(file)
        if known is None and text is None:
            return None
        where = FileText(file.identity, file.stat.st_size, functools.partial(self._reread, file), known)
        return Piece(text=text, first=first, last=False, size=size, group=group, file=where)

    def _reread(self, file: CodeFile) -> str:
        return self._read(file) or ""

    def _pieces(self, position: dict[str, Any]) -> Iterator[tuple[Piece, dict[str, Any]]]:
        n = len(self.repos)
        order = permutation(n, self.seed, self.name, "repos", self.epoch) if self.params.shuffle else range(n)
        k, i, started = int(position.get("repo", 0)), int(position.get("file", 0)), bool(position.get("started"))
        while k < n:
            if self.mine(k):
                repo = self.repos[order[k]]
                files = self.ordered(repo)
                size = sum(f.stat.st_size for f in files[i:]) if not started else 0
                for j in range(i, len(files)):
                    piece = self._piece(files[j], first=not started, size=size, group=repo.name)
                    if piece is None:
                        continue
                    started = True
                    yield piece, {"repo": k, "file": j + 1, "started": True}
                if started:  # closes the document (its EOS), once its last readable file is known
                    yield Piece(text="", first=False, last=True, group=repo.name), {"repo": k + 1}
            k, i, started = k + 1, 0, False


def _peek(file: CodeFile, limit: int) -> str:
    """A file's text for import scanning ('' if unreadable; the reading pass counts the skip)."""
    if file.stat.st_size > limit:
        return ""
    try:
        with open(file.path, "rb") as f:
            return f.read().decode("utf-8")
    except (UnicodeDecodeError, OSError):
        return ""


# ---- dependency order -----------------------------------------------------------------------------


def _module_name(rel: PurePosixPath) -> str | None:
    if rel.suffix not in (".py", ".pyi"):
        return None
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts) if parts and all(p.isidentifier() for p in parts) else None


def _dependencies(rels: list[PurePosixPath], texts: list[str]) -> list[set[int]]:
    """For each file, the files it imports (Python) or includes (C-family), by index."""
    names = [_module_name(rel) for rel in rels]
    modules: dict[str, int] = {}
    suffixes: dict[str, int | None] = {}  # a module by each dotted suffix of its name, unless ambiguous
    for i, name in enumerate(names):
        if name is None:
            continue
        modules[name] = i
        parts = name.split(".")
        for start in range(1, len(parts)):
            key = ".".join(parts[start:])
            suffixes[key] = i if key not in suffixes else None
    by_path: dict[str, int | None] = {}  # a file by each suffix of its path, unless ambiguous (C-family only)
    if any(name is None for name in names):
        for i, rel in enumerate(rels):
            parts = rel.parts
            for start in range(len(parts)):
                key = "/".join(parts[start:])
                by_path[key] = i if key not in by_path else None
    deps: list[set[int]] = []
    for i, (rel, name, text) in enumerate(zip(rels, names, texts)):
        found: set[int] = set()
        if name is not None:
            package = name if rel.stem == "__init__" else name.rpartition(".")[0]
            for target in _python_targets(text, package):
                parts = target.split(".")
                for end in range(len(parts), 0, -1):
                    key = ".".join(parts[:end])
                    hit = modules.get(key, suffixes.get(key))
                    if hit is not None:
                        found.add(hit)
        else:
            for header in C_INCLUDE.findall(lines_with(text, "include")):
                local = (rel.parent / header).as_posix()
                hit = by_path.get(local, by_path.get(header))
                if hit is not None:
                    found.add(hit)
        found.discard(i)
        deps.append(found)
    return deps


def lines_with(text: str, word: str) -> str:
    """The lines of `text` that contain `word`, joined: all a regex whose matches stay within one line and
    contain `word` needs to see, found at `str.find` speed (scanning every line start in the regex engine
    made the dependency order a third of a cached pass)."""
    lines = []
    at = text.find(word)
    while at >= 0:
        end = text.find("\n", at)
        end = len(text) if end < 0 else end
        lines.append(text[text.rfind("\n", 0, at) + 1 : end])
        at = text.find(word, end)
    return "\n".join(lines)


def _python_targets(text: str, package: str) -> Iterator[str]:
    """Dotted names a Python file imports (relative imports resolved against its package)."""
    for base, names, plain in PY_IMPORT.findall(lines_with(text, "import")):
        if plain:
            for item in plain.split(","):
                yield item.split(" as ")[0].strip()
            continue
        level = len(base) - len(base.lstrip("."))
        rest = base[level:]
        if level:
            anchor = package.split(".") if package else []
            anchor = anchor[: len(anchor) - (level - 1)] if level > 1 else anchor
            base = ".".join([*anchor, rest] if rest else anchor)
        if not base:
            continue
        yield base
        for item in names.split(","):
            sub = item.split(" as ")[0].strip()
            if sub.isidentifier():
                yield f"{base}.{sub}"


def topological_order(deps: list[set[int]]) -> list[int]:
    """Indices with each one after its dependencies; ties (and cycles, broken at the lowest index) by index."""
    n = len(deps)
    waiting = [len(d) for d in deps]
    users: list[list[int]] = [[] for _ in range(n)]
    for i, d in enumerate(deps):
        for j in d:
            users[j].append(i)
    ready = [i for i in range(n) if not waiting[i]]
    heapq.heapify(ready)
    done = [False] * n
    out: list[int] = []
    while len(out) < n:
        if not ready:  # a cycle: release its lowest index
            heapq.heappush(ready, next(i for i in range(n) if not done[i]))
        i = heapq.heappop(ready)
        if done[i]:
            continue
        done[i] = True
        out.append(i)
        for u in users[i]:
            waiting[u] -= 1
            if waiting[u] == 0 and not done[u]:
                heapq.heappush(ready, u)
    return out


class Code(SourcePlugin):
    """Local code trees: each repository one long document, files concatenated, dependencies first.

    With `repos: subdirs` (default) each subdirectory of `path` is a repository and the loose files at the
    top one more; the default `path` is the running Python's standard library (each package a
    repository), a long, license-clean code corpus on every machine. Python imports (relative ones
    resolved) and C `#include "..."` order a module after what it uses; cycles are broken by path.
    Files that are too large or not UTF-8 are skipped and counted.
    """

    name = "code"
    Params = CodeParams

    def build_source(self, ctx: DataContext, name: str) -> Source:
        return CodeSource(name, self.params, seed=ctx.seed, rank=ctx.rank, world=ctx.world)


@hookimpl
def lcplug_register(register):
    register(Code)
