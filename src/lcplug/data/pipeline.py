"""The data pipeline: sources -> token streams (tokenize, cut, upsample) -> mixer -> packer -> batches.

`PackedLoader` is an iterator of packed batches (see `lcplug.data.packing`) that streams with bounded
memory, gives the same batches for the same recipe and seed, and resumes exactly: `state_dict()` after
N batches, `load_state_dict()` in a fresh loader, and the next batch is the N+1-th of an uninterrupted
run. Each data-parallel rank reads a disjoint shard of every source (document d of an epoch goes to
rank d mod dp_world); the ranks of one context-parallel group share a data-parallel rank and so get
identical batches, which each then slices (`context_parallel_slice`).

With `cache_dir` in the recipe, every domain's text goes through one `TokenCache` there, so only text
no earlier run (epoch, rank, preview) tokenized with the same tokenizer is tokenized, and local files
whose identity (path, inode, size, mtime, ctime) it recorded are not even read (`cache_verify: true`
reads and hashes them all the same).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .base import DataContext, DataError, log
from .cache import TokenCache
from .mixture import Mixer
from .packing import PADDING, Packer, collate
from .recipe import DataConfig
from .tokenize import TextTokenizer, TokenStream, load_text_tokenizer

STATE_VERSION = 1


def dp_coordinates(rank: int, world: int, cp_size: int = 1) -> tuple[int, int]:
    """(data-parallel rank, data-parallel world) of a global rank when context parallelism is innermost.

    Ranks r and r' with r // cp_size == r' // cp_size form one context-parallel group and read the same
    data; the groups read disjoint shards.
    """
    if cp_size < 1 or world % cp_size:
        raise DataError(f"world size {world} is not a multiple of the context-parallel size {cp_size}")
    if not 0 <= rank < world:
        raise DataError(f"rank {rank} is not in [0, world={world})")
    return rank // cp_size, world // cp_size


class PackedLoader:
    """Packed batches from a `DataConfig` (or a recipe path / `data:` mapping), resumable and rank-aware.

    `tokenizer` overrides the recipe's (a `transformers` tokenizer, a directory, "bytes" or a
    `TextTokenizer`). Stops only when `repeat` is off and every source is exhausted.
    """

    def __init__(
        self,
        config: DataConfig | Mapping[str, Any] | str | Path,
        *,
        tokenizer: Any = None,
        dp_rank: int = 0,
        dp_world: int = 1,
    ):
        if isinstance(config, (str, Path)):
            config = DataConfig.from_recipe(config)
        elif not isinstance(config, DataConfig):
            config = DataConfig.from_dict(config)
        self.config = config
        self.tokenizer: TextTokenizer = load_text_tokenizer(
            config.tokenizer if tokenizer is None else tokenizer, eos_id=config.eos_id, pad_id=config.pad_id
        )
        self.dp_rank, self.dp_world = dp_rank, dp_world
        self.cache = self._cache()
        ctx = DataContext(self.tokenizer, config.seed, dp_rank, dp_world, sources=config.sources)
        self.domains = config.domains()
        streams = []
        for d in self.domains:
            source = ctx.build_source(config.sources[d.source], d.label)
            cut = config.cut(d)
            if source.longest is not None and source.longest > cut:
                raise DataError(
                    f"data source {d.label!r} makes documents of up to {source.longest} tokens, but its domain passes "
                    f"on at most {cut} (data.seq_len / max_doc_tokens): a cut sample would lose its answer; "
                    "shorten its lengths"
                )
            stream = TokenStream(
                source,
                self.tokenizer,
                max_doc_tokens=cut,
                long_share=d.long_share,
                long_threshold=d.long_threshold,
                repeat=config.repeat,
                cache=self.cache,
            )
            streams.append(stream)
        self.mixer = Mixer(self.domains, streams)
        self.packer = Packer(self.mixer, self.tokenizer.pad_id)
        self.step = 0
        self.tokens = {d.label: 0 for d in self.domains}  # tokens per domain in the batches this process made
        self.padding = 0

    def _cache(self) -> TokenCache | None:
        """The recipe's token cache; none for tokenizers without a Rust backend (bytes need none: decoding is all)."""
        if self.config.cache_dir is None:
            return None
        if self.tokenizer.fast is None:
            if not self.tokenizer.is_bytes:
                log.warning("data.cache_dir: %r has no fast (Rust) backend to fingerprint; not cached", self.tokenizer)
            return None
        return TokenCache(self.config.cache_dir, self.tokenizer, verify=self.config.cache_verify)

    def close(self) -> None:
        """Write what the token cache holds in memory (also done at each epoch's end and at exit)."""
        if self.cache is not None:
            self.cache.flush()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        seq_len, batch_size = self.config.shape_at(self.step)
        rows = []
        for _ in range(batch_size):
            row = self.packer.next_row(seq_len)
            if row is None:
                break
            rows.append(row)
        if not rows:
            self.close()
            raise StopIteration
        for row in rows:
            for length, domain in zip(row.lengths, row.domains):
                if domain == PADDING:
                    self.padding += length
                else:
                    self.tokens[self.domains[domain].label] += length
        self.step += 1
        return collate(rows, cross_document=self.config.cross_document)

    @property
    def streams(self) -> list[TokenStream]:
        return self.mixer.streams

    def skipped(self) -> dict[str, dict[str, int]]:
        """What each domain's source skipped (undecodable files, bad records), by reason."""
        return {d.label: dict(s.source.skipped) for d, s in zip(self.domains, self.streams)}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly here (plain Python values: `torch.save`/JSON friendly)."""
        return {
            "version": STATE_VERSION,
            "step": self.step,
            "dp": [self.dp_rank, self.dp_world],
            "domains": [d.label for d in self.domains],
            "packer": self.packer.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a `state_dict` saved by a loader of the same recipe and data-parallel rank."""
        if state.get("version") != STATE_VERSION:
            raise DataError(f"data state version {state.get('version')!r}; this lcplug reads {STATE_VERSION}")
        labels = [d.label for d in self.domains]
        if list(state["domains"]) != labels:
            raise DataError(f"data state is for domains {state['domains']}, this loader has {labels}")
        if list(state["dp"]) != [self.dp_rank, self.dp_world]:
            raise DataError(
                f"data state is for data-parallel rank {state['dp'][0]} of {state['dp'][1]}, "
                f"this loader is rank {self.dp_rank} of {self.dp_world}"
            )
        self.packer.load_state_dict(state["packer"])
        self.step = int(state["step"])
