"""`kv-retrieval`: key-value retrieval over a JSON object of random UUIDs (Liu et al., "Lost in the Middle")."""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from typing import Any

from lcplug.data.base import BuilderPlugin, DataContext, DataError, Piece, Source, SyntheticSource, rng
from lcplug.data.synthetic import DepthTaskParams, pick_depth, task_piece
from lcplug.data.tokenize import TextTokenizer
from lcplug.hookspecs import hookimpl

INTRO = "Extract the value corresponding to the specified key in the JSON object below.\n\nJSON data:\n{"
QUESTION = '}}\n\nKey: "{key}"\nCorresponding value:'
ANSWER = ' "{value}"'


@dataclass(frozen=True)
class KVParams(DepthTaskParams):
    """Depth, length and count controls shared with the other needle-style builders; nothing of its own."""


def _uuid(r: random.Random) -> str:
    return str(uuid.UUID(int=r.getrandbits(128), version=4))


class KVSource(SyntheticSource):
    """Sample k: as many UUID pairs as fit the drawn length, the asked pair at the drawn depth among them."""

    def __init__(self, name: str, params: KVParams, tokenizer: TextTokenizer, **kwargs: Any):
        super().__init__(name, **kwargs)
        self.params = params
        self.tokenizer = tokenizer
        self.longest = max(params.lengths) + len(ANSWER.format(value="0" * 36).encode()) + len(tokenizer.eos)
        r = rng(self.seed, name, "check")
        shortest = min(params.lengths)
        fixed = self._fixed(_uuid(r)) + len(self._pair(_uuid(r), _uuid(r), first=True))
        if fixed > shortest:
            raise DataError(
                f"data source {name!r}: length {shortest} cannot hold one key-value pair ({fixed} tokens); "
                f"valid: lengths >= {fixed}"
            )

    def _pair(self, key: str, value: str, *, first: bool) -> list[int]:
        return self.tokenizer.encode(("" if first else ", ") + f'"{key}": "{value}"')

    def _fixed(self, key: str) -> int:
        tok = self.tokenizer
        return len(tok.prefix) + len(tok.encode(INTRO)) + len(tok.encode(QUESTION.format(key=key)))

    def sample(self, k: int) -> Piece:
        r = rng(self.seed, self.name, k)
        length = r.choice(self.params.lengths)
        asked_key, asked_value = _uuid(r), _uuid(r)
        room = length - self._fixed(asked_key) - len(self._pair(asked_key, asked_value, first=False))
        pairs: list[tuple[str, str]] = []
        while True:
            key, value = _uuid(r), _uuid(r)
            cost = len(self._pair(key, value, first=False))
            if cost > room:
                break
            room -= cost
            pairs.append((key, value))
        at = round(pick_depth(r, self.params.depths) * len(pairs))
        pairs.insert(at, (asked_key, asked_value))
        tok = self.tokenizer
        prompt = tok.prefix + tok.encode(INTRO)
        for i, (key, value) in enumerate(pairs):
            prompt += self._pair(key, value, first=i == 0)
        prompt += tok.encode(QUESTION.format(key=asked_key))
        return task_piece(tok, prompt, tok.encode(ANSWER.format(value=asked_value)), self.params.loss, "kv-retrieval")


class KVRetrieval(BuilderPlugin):
    """Key-value retrieval: a JSON object of random UUID pairs, one key asked, its value the answer.

    Pairs fill each drawn length (to within one pair) and the asked pair sits at the drawn depth among
    them; nothing but exact matching of a 36-character key finds it, so it tests precise long-range lookup.
    """

    name = "kv-retrieval"
    Params = KVParams

    def build_source(self, ctx: DataContext, name: str) -> Source:
        return KVSource(name, self.params, ctx.tokenizer, seed=ctx.seed, rank=ctx.rank, world=ctx.world)


@hookimpl
def lcplug_register(register):
    register(KVRetrieval)
