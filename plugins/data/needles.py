"""`needles`: passkey, needle-in-a-haystack and multi-key (multi-needle) retrieval samples."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from lcplug.data.base import BuilderPlugin, DataContext, DataError, Piece, Source, SyntheticSource, derived_seed, rng
from lcplug.data.synthetic import DepthTaskParams, pick_depth, task_piece
from lcplug.data.tokenize import TextTokenizer
from lcplug.eval.haystack import Haystack
from lcplug.eval.probes import KEY_NAMES, MultiKeyProbe, NeedleProbe, PasskeyProbe, ProbeError
from lcplug.hookspecs import hookimpl
from lcplug.params import param

PROBES = {"passkey": PasskeyProbe, "needle": NeedleProbe, "multikey": MultiKeyProbe}


@dataclass(frozen=True)
class NeedlesParams(DepthTaskParams):
    task: Literal["passkey", "needle", "multikey"] = param(
        "passkey", "passkey: a key in repeated filler; needle: a number in real text; multikey: named needles"
    )
    keys: int = param(
        4, "needles of a multikey sample (one asked)", check=lambda v: 1 <= v <= len(KEY_NAMES), valid="in [1, 26]"
    )
    digits: int = param(5, "digits of each key", check=lambda v: v >= 1, valid="an integer >= 1")
    haystack: str | None = param(None, "text file or directory of filler text (default: the stdlib's source)")


class NeedlesSource(SyntheticSource):
    """Sample k: a prompt of a drawn length with the asked needle at a drawn depth, then the answer."""

    def __init__(self, name: str, params: NeedlesParams, tokenizer: TextTokenizer, **kwargs: Any):
        super().__init__(name, **kwargs)
        self.params = params
        self.tokenizer = tokenizer
        extra = {"keys": params.keys} if params.task == "multikey" else {}
        self.probe = PROBES[params.task](
            lengths=params.lengths,
            depths=params.depths or [0.5],
            samples=1,
            digits=params.digits,
            seed=derived_seed(self.seed, name, "needles"),
            **extra,
        )
        self.haystack = Haystack(params.haystack)
        self.longest = max(params.lengths) + len(f" {'9' * params.digits}.".encode()) + len(tokenizer.eos)
        try:
            self.probe.check(tokenizer.base)
        except ProbeError as exc:
            raise DataError(f"data source {name!r}: {exc}") from None

    def sample(self, k: int) -> Piece:
        r = rng(self.seed, self.name, k)
        length = r.choice(self.params.lengths)
        trial = self.probe.make_trial(self.tokenizer.base, self.haystack, length, pick_depth(r, self.params.depths), k)
        answer = self.tokenizer.encode(f" {trial.key}.")
        return task_piece(self.tokenizer, trial.prompt, answer, self.params.loss, self.params.task)


class Needles(BuilderPlugin):
    """Passkey, needle-in-a-haystack and multi-key retrieval samples, with length and depth under control.

    Prompts are built by the evaluation probes' own code (same wording, needles placed after a line or
    sentence end), each exactly a drawn `lengths` token long, the asked needle at a drawn depth; the
    answer (the key) follows, and by default only it is trained on.
    """

    name = "needles"
    Params = NeedlesParams

    def build_source(self, ctx: DataContext, name: str) -> Source:
        return NeedlesSource(name, self.params, ctx.tokenizer, seed=ctx.seed, rank=ctx.rank, world=ctx.world)


@hookimpl
def lcplug_register(register):
    register(Needles)
