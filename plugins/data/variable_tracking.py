"""`variable-tracking`: RULER's variable tracking, chains of assignments hidden in filler."""

from __future__ import annotations

import itertools
import string
from dataclasses import dataclass
from typing import Any, Literal

from lcplug.data.base import BuilderPlugin, DataContext, DataError, Piece, Source, SyntheticSource, rng
from lcplug.data.synthetic import TaskParams, task_piece
from lcplug.data.tokenize import TextTokenizer
from lcplug.eval.haystack import Haystack
from lcplug.eval.probes import PASSKEY_FILLER, build_prompt, random_key
from lcplug.hookspecs import hookimpl
from lcplug.params import param

INTRO = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
FIRST = "\nVAR {name} = {value}.\n"
HOP = "\nVAR {name} = VAR {previous}.\n"
QUESTION = (
    "\nQuestion: Find all variables that are assigned the value {value} in the text above. Answer: According to "
    "the chain(s) of variable assignment in the text above, {count} variables are assigned the value {value}, "
    "they are:"
)


@dataclass(frozen=True)
class VTParams(TaskParams):
    chains: int = param(
        1, "chains of assignments (one asked, the others distract)", check=lambda v: v >= 1, valid=">= 1"
    )
    hops: int = param(4, "assignments after the first in each chain", check=lambda v: v >= 0, valid=">= 0")
    filler: Literal["repeat", "haystack"] = param("repeat", "repeat: RULER's noise sentences; haystack: real text")
    haystack: str | None = param(None, "text file or directory for filler: haystack (default: the stdlib's source)")


class VTSource(SyntheticSource):
    """Sample k: `chains` chains of `hops`+1 assignments at sorted random depths in filler of a drawn length."""

    def __init__(self, name: str, params: VTParams, tokenizer: TextTokenizer, **kwargs: Any):
        super().__init__(name, **kwargs)
        self.params = params
        self.tokenizer = tokenizer
        self.haystack = Haystack(params.haystack)
        self.longest = max(params.lengths) + 6 * (params.hops + 1) + len(tokenizer.eos)  # " NAME" per variable
        fixed = len(self._parts(rng(self.seed, name, "check"))[1])
        shortest = min(params.lengths)
        if fixed > shortest:
            raise DataError(
                f"data source {name!r}: length {shortest} cannot hold {params.chains} chain(s) of {params.hops} hops "
                f"({fixed} tokens); valid: lengths >= {fixed}"
            )

    def _parts(self, r: Any) -> tuple[list[list[list[int]]], list[int], list[int], list[int]]:
        """Needles per chain, all fixed tokens (prefix, intro, needles, question), question, answer."""
        tok, p = self.tokenizer, self.params
        names: list[str] = []
        while len(names) < p.chains * (p.hops + 1):
            name = "".join(r.choice(string.ascii_uppercase) for _ in range(5))
            if name not in names:
                names.append(name)
        values: list[str] = []
        while len(values) < p.chains:
            value = random_key(r, 5)
            if value not in values:
                values.append(value)
        chains = []
        for c in range(p.chains):
            chain = names[c * (p.hops + 1) : (c + 1) * (p.hops + 1)]
            needles = [tok.encode(FIRST.format(name=chain[0], value=values[c]))]
            needles += [tok.encode(HOP.format(name=n, previous=prev)) for prev, n in itertools.pairwise(chain)]
            chains.append(needles)
        question = tok.encode(QUESTION.format(value=values[0], count=p.hops + 1))
        answer = tok.encode(" " + " ".join(names[: p.hops + 1]))
        intro = tok.encode(INTRO)
        fixed = tok.prefix + intro + [t for chain in chains for needle in chain for t in needle] + question
        return chains, fixed, question, answer

    def sample(self, k: int) -> Piece:
        r = rng(self.seed, self.name, k)
        tok, p = self.tokenizer, self.params
        length = r.choice(p.lengths)
        chains, fixed, question, answer = self._parts(r)
        room = length - len(fixed)
        if p.filler == "repeat":
            unit = tok.encode(PASSKEY_FILLER)
            filler = (unit * (room // len(unit) + 1))[:room]
        else:
            filler = self.haystack.window(tok.base, room, r)
        needles = [
            (depth, needle) for chain in chains for depth, needle in zip(sorted(r.random() for _ in chain), chain)
        ]
        prompt = build_prompt(tok.base, tok.encode(INTRO), filler, needles, question)
        return task_piece(tok, prompt, answer, p.loss, "variable-tracking")


class VariableTracking(BuilderPlugin):
    """Variable tracking (RULER): follow a chain of assignments `VAR B = VAR A` through a long context.

    Each chain's statements keep their order at random depths; the answer lists every variable bound to
    the asked value, so the model has to hop from one assignment to the next across the whole context.
    """

    name = "variable-tracking"
    Params = VTParams

    def build_source(self, ctx: DataContext, name: str) -> Source:
        return VTSource(name, self.params, ctx.tokenizer, seed=ctx.seed, rank=ctx.rank, world=ctx.world)


@hookimpl
def lcplug_register(register):
    register(VariableTracking)
