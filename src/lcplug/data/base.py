"""Pieces of documents, resumable sources, randomness from counters, and the roles of data plugins.

A *source* is a stream of document **pieces**: a piece is bounded text (or token ids) and says whether
it starts and ends a document, so a document of any size (a whole repository, a book) streams through
bounded memory. A source reads one epoch at a time, in an order seeded per epoch, keeps only the
documents of its data-parallel rank (document d goes to rank d mod world), and can say where it is
(`state_dict`) and start again from there (`load_state_dict`).

Randomness never lives in a generator object: every random choice is drawn from a fresh generator
seeded by (seed, names, counters), so a state made of counters resumes exactly.
"""

from __future__ import annotations

import hashlib
import logging
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

import numpy as np

from ..errors import LcplugError, did_you_mean
from ..plugin import DataPlugin

if TYPE_CHECKING:
    from .tokenize import TextTokenizer

log = logging.getLogger("lcplug.data")
T = TypeVar("T")


class DataError(LcplugError, ValueError):
    """Data that cannot work: a missing path, an empty source, bad weights, a recipe that does not parse."""


# ---- randomness from counters ------------------------------------------------------------------------


def _digest(seed: int, keys: Sequence[Any]) -> bytes:
    return hashlib.blake2b(":".join(map(str, (seed, *keys))).encode(), digest_size=16).digest()


def rng(seed: int, *keys: Any) -> random.Random:
    """A generator seeded by (seed, *keys): the same keys give the same draws on every machine and run."""
    return random.Random(int.from_bytes(_digest(seed, keys), "little"))


def uniform(seed: int, *keys: Any) -> float:
    """One number in [0, 1) from (seed, *keys), cheaper than a generator when one draw is all that is needed."""
    return int.from_bytes(_digest(seed, keys)[:8], "little") / 2**64


def derived_seed(seed: int, *keys: Any) -> int:
    """A 63-bit seed for another component (an evaluation probe, numpy), distinct per keys."""
    return int.from_bytes(_digest(seed, keys)[:8], "little") >> 1


def permutation(n: int, seed: int, *keys: Any) -> np.ndarray:
    """A seeded permutation of range(n) (int64)."""
    return np.random.default_rng(derived_seed(seed, *keys)).permutation(n)


# ---- pieces ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Known:
    """What a token cache recorded for a file-backed text piece: its text's content key, its length in
    characters, and the byte offset in the file just after it."""

    key: bytes
    chars: int
    end: int


@dataclass(frozen=True)
class FileText:
    """Where a text piece comes from in a local file, so a token cache can find its tokens without the text.

    `identity` names the file as it is now (path, device, inode, size, mtime and ctime, from one `stat`)
    and which part of it the piece is (offset, the source's parameters): any change to the file is a
    new identity. `known` is set instead of reading the text when the cache has the identity; `read`
    reads the text all the same (if the cache loses the tokens). `end` is the byte offset after it.
    """

    identity: bytes
    end: int
    read: Callable[[], str]
    known: Known | None = None


class FileFacts(Protocol):
    """What a token cache remembers about local files by their identities, offered to the sources that read them."""

    def known(self, identity: bytes) -> Known | None:
        """The recorded text of a file piece (None: read it), only where its tokens are at hand."""

    def derived(self, key: bytes) -> list[int] | None:
        """A list of integers derived from files' contents (a dependency order) under a key of their identities."""

    def record_derived(self, key: bytes, value: list[int]) -> None:
        """Remember `derived(key)`."""


@dataclass
class Piece:
    """A bounded part of one document: text, or token ids with an optional loss mask.

    `first`/`last` say whether it starts/ends its document. `size` is the whole document's size in the
    unit of its pieces (characters for text, tokens for ids), known on the first piece; it lets length
    upsampling decide before anything is tokenized (0: the piece is the whole document). `group` names
    what the document belongs to (a repository, a file), for builders that stitch related documents.
    Text pieces are wrapped in the tokenizer's BOS/EOS at document boundaries; id pieces are taken as
    they are (a builder or chat template already placed its special tokens).

    A text piece read from a local file says where (`file`); when a token cache already has it, its
    `text` is None and `file.known` stands in (only sources given the cache's `FileFacts` make these).
    """

    text: str | None = None
    ids: Sequence[int] | np.ndarray | None = None
    mask: Sequence[int] | np.ndarray | None = None
    first: bool = True
    last: bool = True
    size: int = 0
    group: str = ""
    file: FileText | None = None

    def __post_init__(self) -> None:
        has_text = self.text is not None or (self.file is not None and self.file.known is not None)
        if has_text == (self.ids is not None):
            raise ValueError("a Piece holds exactly one of text (or a file piece a cache knows) or ids")

    @property
    def is_text(self) -> bool:
        return self.ids is None

    @property
    def chars(self) -> int:
        """The text's length in characters (read or recorded)."""
        return len(self.text) if self.text is not None else self.file.known.chars  # type: ignore[union-attr]

    def doc_size(self) -> int:
        """The document's size (characters or tokens) as far as this first piece knows it."""
        if self.size:
            return self.size
        return self.chars if self.is_text else len(self.ids)


# ---- sources -----------------------------------------------------------------------------------------


class Source(ABC):
    """A resumable, sharded stream of one source's pieces, one epoch at a time.

    Subclasses write one generator, `_pieces(position)`, that reads from a position (an empty dict at the
    start of an epoch) and yields each piece with the position just after it. The base class keeps the
    live generator, the epoch, the skip counters and the state; `mine(d)` says whether document `d` (its
    index in this epoch's order) belongs to this rank, so a subclass can skip others' documents without
    reading them.
    """

    longest: int | None = None
    """The most tokens one document can have, where a builder knows it: the pipeline refuses to cut such
    documents (a cut sample would lose its answer)."""
    facts: FileFacts | None = None
    """Set by the token stream that reads this source when it has a token cache: sources of local files
    then give the pieces it knows without reading them (`Piece.file`)."""

    def __init__(self, name: str, *, seed: int = 0, rank: int = 0, world: int = 1):
        if world < 1 or not 0 <= rank < world:
            raise DataError(f"data source {name!r}: rank {rank} is not in [0, world={world})")
        self.name = name
        self.seed = seed
        self.rank = rank
        self.world = world
        self.epoch = 0
        self.skipped: dict[str, int] = {}
        self._position: dict[str, Any] = {}
        self._live: Iterator[tuple[Piece, dict[str, Any]]] | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, rank={self.rank}/{self.world}, epoch={self.epoch})"

    @abstractmethod
    def _pieces(self, position: dict[str, Any]) -> Iterator[tuple[Piece, dict[str, Any]]]:
        """This rank's pieces of the current epoch from `position`, each with the position after it."""

    def mine(self, doc: int) -> bool:
        """Whether document `doc` of this epoch's order is this rank's (round robin over data-parallel ranks)."""
        return doc % self.world == self.rank

    def skip(self, reason: str, what: str) -> None:
        """Count (and log) something unusable, e.g. an undecodable file: skipped, never a crash mid-epoch."""
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        log.warning("data source %r: skipped %s (%s)", self.name, what, reason)

    def next(self) -> Piece | None:
        """The next piece of this epoch, or None when the epoch is over (then `new_epoch` starts another)."""
        if self._live is None:
            self._live = self._pieces(dict(self._position))
        item = next(self._live, None)
        if item is None:
            self._live = None
            return None
        piece, self._position = item
        return piece

    def new_epoch(self) -> None:
        """Start the next epoch from its beginning (its order is seeded by the epoch number)."""
        self.epoch += 1
        self._position = {}
        self._live = None

    def state_dict(self) -> dict[str, Any]:
        """Where the stream is: the epoch, the position after the last piece, the skip counts."""
        return {"epoch": self.epoch, "position": dict(self._position), "skipped": dict(self.skipped)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a `state_dict`: the next piece is the one that followed it."""
        self.epoch = int(state["epoch"])
        self._position = dict(state["position"])
        self.skipped = dict(state.get("skipped", {}))
        self._live = None


def cycle(source: Source, owner: str, convert: Callable[[Piece], T | None]) -> Iterator[T]:
    """What `convert` makes of a source's pieces (None: unusable), epoch after epoch, for builders.

    An error if a whole epoch gives nothing usable (counted from the first epoch that starts after this
    began, so a resume in the middle of an epoch is no false alarm).
    """
    found = source.epoch
    while True:
        piece = source.next()
        if piece is None:
            if source.epoch > found:
                raise DataError(f"{owner}: a whole epoch of its base source {source.name!r} gave nothing usable")
            source.new_epoch()
            continue
        item = convert(piece)
        if item is not None:
            found = source.epoch
            yield item


class SyntheticSource(Source):
    """A source of generated samples: sample k is a pure function of (seed, name, k), so it never ends.

    Subclasses write `sample(k) -> Piece`; ranks take k = rank, rank + world, ...
    """

    @abstractmethod
    def sample(self, k: int) -> Piece:
        """Sample number `k`, a whole document."""

    def _pieces(self, position: dict[str, Any]) -> Iterator[tuple[Piece, dict[str, Any]]]:
        k = int(position.get("sample", self.rank))
        while True:
            yield self.sample(k), {"sample": k + self.world}
            k += self.world


# ---- what sources and builders are built from ------------------------------------------------------


@dataclass
class DataContext:
    """What a data plugin needs to build its source: the tokenizer, the seed, this rank's shard."""

    tokenizer: TextTokenizer
    seed: int = 0
    rank: int = 0
    world: int = 1
    sources: Mapping[str, Any] = field(default_factory=dict)
    """The recipe's named source specs, so a builder's `base` can name one of them."""

    def build_source(self, spec: Any, name: str) -> Source:
        """A source from a spec (a plugin name, a compact string, a mapping, or a recipe source's name)."""
        from ..registry import get_registry
        from ..spec import parse_plugin_spec

        if isinstance(spec, str) and spec in self.sources:
            spec = self.sources[spec]
        plugin_spec = parse_plugin_spec("data", spec)
        cls = get_registry().get("data", plugin_spec.name)
        if not issubclass(cls, SourcePlugin):
            raise DataError(f"data plugin {plugin_spec.name!r} is a {cls.role}, not a source; {source_names()}")
        plugin = cls.build(plugin_spec.params)
        return plugin.build_source(self, name)


class SourcePlugin(DataPlugin):
    """Base of data sources and synthetic builders: builds a `Source` for one name in a recipe."""

    role: ClassVar[str] = "source"

    def build_source(self, ctx: DataContext, name: str) -> Source:
        raise NotImplementedError  # abstract: each source plugin defines it


class BuilderPlugin(SourcePlugin):
    """Base of synthetic builders (retrieval tasks, paraphrase samples, megadocs): sources of made samples."""

    role: ClassVar[str] = "builder"


@dataclass(frozen=True)
class Domain:
    """One entry of a mixture: a source, its share of tokens, and how its documents are cut and upsampled.

    `max_doc_tokens` cuts longer documents into independent ones (default: the training length), so a
    source can feed long sequences and short ones (ProLong's `code@512K` and `code@64K`). `long_share`
    (Fu et al.) raises the share of tokens from documents of at least `long_threshold` tokens, keeping
    the source's share of the mixture.
    """

    source: str
    weight: float
    max_doc_tokens: int | None = None
    long_share: float | None = None
    long_threshold: int = 4096

    @property
    def label(self) -> str:
        """Unique within a mixture: the source, plus the cut length when the same source appears twice."""
        return self.source if self.max_doc_tokens is None else f"{self.source}@{self.max_doc_tokens}"


class MixturePlugin(DataPlugin):
    """Base of mixtures: map the recipe's sources to weighted domains."""

    role: ClassVar[str] = "mixture"

    def domains(self, sources: Sequence[str]) -> list[Domain]:
        raise NotImplementedError  # abstract: each mixture plugin defines it


def source_names() -> str:
    """`valid: ...` listing of the installed source and builder plugins, for errors."""
    from ..registry import get_registry

    names = [c.name for c in get_registry().plugins("data") if issubclass(c, SourcePlugin)]
    return f"valid sources: {', '.join(names)}"


def unknown(kind: str, name: str, valid: Sequence[str]) -> DataError:
    """An error naming an unknown name and the closest valid ones."""
    return DataError(f"unknown {kind} {name!r}; {did_you_mean(name, valid)}")
