"""`paraphrase`: retrieval samples whose answer first quotes the relevant passage (Xiong et al. 2023, 2312.11193)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from lcplug.data.base import BuilderPlugin, DataContext, DataError, Piece, Source, cycle, rng
from lcplug.data.synthetic import TaskParams, task_piece
from lcplug.data.tokenize import TextTokenizer
from lcplug.hookspecs import hookimpl
from lcplug.params import param

INTRO = "Read the passages below, then answer the question after them.\n\n"
PASSAGE = "Passage {n}:\n{text}\n\n"
QUESTION = (
    'Question: which passage contains the line "{cue}"? Quote the relevant lines first, then give the line '
    "that follows it.\n"
)
ANSWER = 'Answer: the relevant text is in Passage {n}: "{quote}"\nSo the line that follows it is: {target}\n'
MIN_CUE = 16
MAX_LINE = 120
"""Characters (stripped) of a cue and of the lines around it: shorter cues are rarely unique, longer lines would
make the question and answer too big to budget."""
ATTEMPTS = 100


@dataclass(frozen=True)
class ParaphraseParams(TaskParams):
    base: Any = param("code", "the source passages come from: a plugin spec or the name of a recipe source")
    passage_chars: int = param(
        800, "characters of a passage at most (cut at a line end)", check=lambda v: v >= 200, valid="an integer >= 200"
    )


@dataclass
class Passage:
    lines: list[str]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def _cue(lines: list[str], j: int) -> bool:
    """Whether line j can be asked about: long enough to be unique, it and its neighbours short, a next line."""
    near = lines[max(j - 1, 0) : j + 2]
    return len(lines[j].strip()) >= MIN_CUE and bool(lines[j + 1].strip()) and all(len(s) <= MAX_LINE for s in near)


class ParaphraseSource(Source):
    """Sample k: passages from the base source up to a drawn length, a cue line of one, the answer quoting it.

    The base source is sharded over ranks (disjoint passages); this builder's state is the base's state
    and the sample count, so it resumes exactly.
    """

    def __init__(self, name: str, params: ParaphraseParams, ctx: DataContext):
        super().__init__(name, seed=ctx.seed)
        self.params = params
        self.tokenizer: TextTokenizer = ctx.tokenizer
        self.base = ctx.build_source(params.base, f"{name}/base")
        tok = self.tokenizer
        filled = QUESTION.format(cue="x" * MAX_LINE) + ANSWER.format(n=99, quote="x" * MAX_LINE, target="x" * MAX_LINE)
        self.overhead = len(tok.prefix) + len(tok.encode(INTRO + filled)) + len(tok.eos)
        self.longest = max(params.lengths)

    def passage(self, piece: Piece) -> Passage | None:
        """The first `passage_chars` of a base piece, if it has a line that can be a cue."""
        if piece.text is None:
            raise DataError(f"data source {self.name!r}: its base {self.base.name!r} gives token ids, not text")
        text = piece.text[: self.params.passage_chars]
        if len(piece.text) > len(text) and "\n" in text:
            text = text[: text.rfind("\n")]
        lines = text.split("\n")
        return Passage(lines) if any(_cue(lines, j) for j in range(len(lines) - 1)) else None

    def _sample(self, k: int, passages: Iterator[Passage]) -> Piece:
        r = rng(self.seed, self.name, k)
        length = r.choice(self.params.lengths)
        for _ in range(ATTEMPTS):
            piece = self._compose(self._gather(passages, length - self.overhead), r, length)
            if piece is not None:
                return piece
        raise DataError(
            f"data source {self.name!r}: {ATTEMPTS} tries found no passage fitting a {length}-token sample; "
            "give longer lengths"
        )

    def _gather(self, passages: Iterator[Passage], budget: int) -> list[Passage]:
        """Passages while they fit `budget` tokens (at least one; the one that overflows is dropped)."""
        chosen: list[Passage] = []
        used = 0
        for passage in passages:
            cost = len(self.tokenizer.encode(PASSAGE.format(n=len(chosen) + 1, text=passage.text)))
            if used + cost > budget:
                if not chosen:  # too long alone: keep the lines that fit (at least three)
                    lines = passage.lines
                    while cost > budget and len(lines) > 3:
                        lines = lines[: max(3, len(lines) * 3 // 4)]
                        cost = len(self.tokenizer.encode(PASSAGE.format(n=1, text="\n".join(lines))))
                    chosen.append(Passage(lines))
                break
            chosen.append(passage)
            used += cost
        return chosen

    def _compose(self, passages: list[Passage], r: random.Random, length: int) -> Piece | None:
        """The sample (at most `length` tokens) asking about a unique short line, or None if there is none."""
        context = "".join(PASSAGE.format(n=i + 1, text=p.text) for i, p in enumerate(passages))
        choices = [
            (i, j)
            for i, p in enumerate(passages)
            for j in range(len(p.lines) - 1)
            if _cue(p.lines, j) and context.count(p.lines[j].strip()) == 1
        ]
        if not choices:
            return None
        i, j = r.choice(choices)
        tok = self.tokenizer
        while True:
            lines = passages[i].lines
            cue = lines[j].strip()
            context = "".join(PASSAGE.format(n=n + 1, text=p.text) for n, p in enumerate(passages))
            prompt = tok.prefix + tok.encode(INTRO + context + QUESTION.format(cue=cue))
            quote = "\n".join(lines[max(j - 1, 0) : j + 1])
            answer = tok.encode(ANSWER.format(n=i + 1, quote=quote, target=lines[j + 1].strip()))
            if len(prompt) + len(answer) + len(tok.eos) <= length:
                return task_piece(tok, prompt, answer, self.params.loss, "paraphrase")
            if len(passages) > 1:  # drop the passage furthest from the asked one
                drop = 0 if i == len(passages) - 1 else len(passages) - 1
                passages = passages[:drop] + passages[drop + 1 :]
                i -= drop < i
            elif len(lines) > 3:  # one passage: keep the asked lines only
                start = max(j - 1, 0)
                passages = [Passage(lines[start : j + 2])]
                j -= start
            else:
                return None

    def _pieces(self, position: dict[str, Any]) -> Iterator[tuple[Piece, dict[str, Any]]]:
        if "base" in position:
            self.base.load_state_dict(position["base"])
        passages = cycle(self.base, f"data source {self.name!r}", self.passage)
        k = int(position.get("sample", 0))
        while True:
            piece = self._sample(k, passages)
            k += 1
            yield piece, {"base": self.base.state_dict(), "sample": k}


class Paraphrase(BuilderPlugin):
    """Paraphrase-style retrieval: passages, a question about one line, an answer that quotes before answering.

    Following "Make Your LLM Fully Utilize the Context"/paraphrasing (2312.11193), the answer first
    quotes the relevant lines (naming the passage), then gives the line that follows the cue, so the
    model learns to locate and restate evidence before using it. Passages come from any text source
    (`base`, default the stdlib code); samples fill a drawn length, loss on the answer by default.
    """

    name = "paraphrase"
    Params = ParaphraseParams

    def build_source(self, ctx: DataContext, name: str) -> Source:
        return ParaphraseSource(name, self.params, ctx)


@hookimpl
def lcplug_register(register):
    register(Paraphrase)
