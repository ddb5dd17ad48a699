"""`megadoc`: related documents (or rephrasings of one) stitched into one long document with long-range recalls."""

from __future__ import annotations

import bisect
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from lcplug.data.base import BuilderPlugin, DataContext, DataError, Piece, Source, rng
from lcplug.hookspecs import hookimpl
from lcplug.params import Params, param

PART = "=== part {n} ===\n"
RECALL = "[recall from part {n}: {line}]\n"
MIN_LINE = 16
"""Characters (stripped) a line needs to be recalled: shorter lines carry little to depend on."""


@dataclass(frozen=True)
class MegadocParams(Params):
    base: Any = param("code", "the source of related documents: a plugin spec or the name of a recipe source")
    max_chars: int = param(
        200_000, "a megadoc stops growing at this many characters", check=lambda v: v >= 1000, valid=">= 1000"
    )
    recalls: int = param(
        8, "verbatim recalls of earlier lines inserted per megadoc", check=lambda v: v >= 0, valid=">= 0"
    )
    min_distance: int = param(
        20_000, "characters at least between a line and its recall", check=lambda v: v >= 0, valid=">= 0"
    )


class MegadocSource(Source):
    """Each megadoc: consecutive base pieces of one group (a repository's files; rephrasings of one document).

    Reading stops at the group's end or at `max_chars`; the first piece of the next group is read and
    given back (the base's state is restored to before it), so the state is just the base's.
    """

    def __init__(self, name: str, params: MegadocParams, ctx: DataContext):
        super().__init__(name, seed=ctx.seed)
        self.params = params
        self.base = ctx.build_source(params.base, f"{name}/base")

    def _parts(self) -> list[tuple[str, str]]:
        """(group, text) of the next megadoc's parts; an error if a whole base epoch gives no text."""
        parts: list[tuple[str, str]] = []
        size = 0
        found = self.base.epoch
        while size < self.params.max_chars:
            before = self.base.state_dict()
            piece = self.base.next()
            if piece is None:
                if parts:
                    break
                if self.base.epoch > found:
                    raise DataError(f"data source {self.name!r}: a whole epoch of its base {self.base.name!r} is empty")
                self.base.new_epoch()
                continue
            if piece.text is None:
                raise DataError(f"data source {self.name!r}: its base {self.base.name!r} gives token ids, not text")
            if not piece.text.strip():
                continue
            if parts and piece.group != parts[0][0]:
                self.base.load_state_dict(before)  # the next megadoc starts with it
                break
            text = piece.text[: self.params.max_chars - size]
            if len(text) < len(piece.text) and "\n" in text:
                text = text[: text.rfind("\n") + 1]
            parts.append((piece.group, text))
            size += len(text)
        return parts

    def megadoc(self, parts: list[tuple[str, str]], r: random.Random) -> str:
        """The parts under numbered headers, with recalls: a line repeated at least `min_distance` later."""
        lines: list[tuple[int, str]] = []  # (part, line) in order
        for n, (_, text) in enumerate(parts, 1):
            lines.append((0, PART.format(n=n)))
            lines += [(n, line + "\n") for line in text.split("\n") if line]
        offsets = [0]
        for _, line in lines:
            offsets.append(offsets[-1] + len(line))
        reach = offsets[-1] - self.params.min_distance  # a recalled line must end by here
        candidates = [
            i for i, (n, line) in enumerate(lines) if n and len(line.strip()) >= MIN_LINE and offsets[i + 1] <= reach
        ]
        inserts: list[tuple[int, str]] = []
        for _ in range(self.params.recalls if candidates else 0):
            src = r.choice(candidates)
            earliest = bisect.bisect_left(offsets, offsets[src + 1] + self.params.min_distance)
            n, line = lines[src]
            inserts.append((r.randint(earliest, len(lines)), RECALL.format(n=n, line=line.strip())))
        out = [line for _, line in lines]
        for at, recall in sorted(inserts, key=lambda x: -x[0]):
            out.insert(at, recall)
        return "".join(out)

    def _pieces(self, position: dict[str, Any]) -> Iterator[tuple[Piece, dict[str, Any]]]:
        if "base" in position:
            self.base.load_state_dict(position["base"])
        k = int(position.get("sample", 0))
        while True:
            parts = self._parts()
            text = self.megadoc(parts, rng(self.seed, self.name, k))
            k += 1
            yield Piece(text=text, group=parts[0][0]), {"base": self.base.state_dict(), "sample": k}


class Megadoc(BuilderPlugin):
    """Megadocs (2603.18534): related documents stitched into one long sequence with long-range dependencies.

    Consecutive pieces of one group of the base source become one document: a repository's files in
    dependency order (the `code` source), or rephrasings of one document (a `text`/`hf` source with a
    `group_field`), up to `max_chars`. `recalls` lines are then repeated verbatim, naming their part, at
    least `min_distance` characters after they first appear: dependencies a model can only get right by
    looking that far back.
    """

    name = "megadoc"
    Params = MegadocParams

    def build_source(self, ctx: DataContext, name: str) -> Source:
        return MegadocSource(name, self.params, ctx)


@hookimpl
def lcplug_register(register):
    register(Megadoc)
