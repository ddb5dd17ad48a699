"""Tokenization of a source's pieces into token documents: batched, cut to a length, length-upsampled.

`TextTokenizer` puts any tokenizer lcplug's probes accept (a `transformers` tokenizer, or bytes for the
byte-level demo models) behind the calls the pipeline needs: batched encoding through the Rust backend's
`encode_batch_fast` where there is one (the expensive step of the whole pipeline), encoding with
character offsets (loss masks of chat turns), and the BOS/EOS/pad ids.

`TokenStream` turns one domain's source into token documents of at most `max_doc_tokens`. It reads
pieces in batches of about `batch_chars` characters and tokenizes each batch in one call; its state is
the source's state at the start of the current batch plus how far into the batch it is, so a resume
re-reads and re-tokenizes that one batch and continues at the same token.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..eval.tokens import ByteTokenizer, HFTokenizer, Tokenizer, as_tokenizer, load_tokenizer
from .base import DataError, Piece, Source, uniform

if TYPE_CHECKING:
    from .cache import TokenCache

MIN_KEEP = 0.1
"""Length upsampling keeps at least this share of short documents, so a source with (almost) no long documents
is read at most ten times over instead of being thinned without end."""


class TextTokenizer:
    """A tokenizer as the data pipeline uses it: batched exact encoding, offsets, special ids.

    `eos_id`/`pad_id` override the tokenizer's own (bytes have neither: documents are then separated by
    the document masks alone and padding uses id 0, always masked out of the loss).
    """

    def __init__(self, tokenizer: Any = None, *, eos_id: int | None = None, pad_id: int | None = None):
        self.base: Tokenizer = as_tokenizer(tokenizer)
        self.hf = self.base.tokenizer if isinstance(self.base, HFTokenizer) else None
        self.fast = getattr(self.hf, "backend_tokenizer", None)
        self.is_bytes = isinstance(self.base, ByteTokenizer)
        self.prefix: list[int] = list(self.base.prefix)
        hf_eos = getattr(self.hf, "eos_token_id", None)
        eos = eos_id if eos_id is not None else hf_eos
        self.eos: list[int] = [] if eos is None else [int(eos)]
        hf_pad = getattr(self.hf, "pad_token_id", None)
        self.pad_id: int = int(pad_id if pad_id is not None else hf_pad if hf_pad is not None else (eos or 0))
        self.tokens_per_char_prior = 1.0 if self.is_bytes else 0.25

    def __repr__(self) -> str:
        return f"TextTokenizer({self.base!r})"

    def encode(self, text: str) -> list[int]:
        """Ids of `text` without special tokens (what the probes' tokenizer gives)."""
        return self.base.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Ids (int32) of each text without special tokens, in one call to the fast backend where there is one."""
        if self.is_bytes:
            return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int32) for t in texts]
        if self.fast is not None:
            return [np.array(e.ids, dtype=np.int32) for e in self.fast.encode_batch_fast(list(texts), False)]
        return [np.array(self.base.encode(t), dtype=np.int32) for t in texts]

    def encode_segments(self, segments: Sequence[tuple[str, bool]]) -> tuple[np.ndarray, np.ndarray]:
        """Ids of the concatenated text and, per token, the flag of the segment its first character is in.

        The whole text is tokenized at once (tokens may span a segment boundary, as they would in use),
        with character offsets where the backend gives them; otherwise segment by segment, which is exact
        for bytes.
        """
        if self.fast is not None:
            text = "".join(s for s, _ in segments)
            enc = self.fast.encode(text, add_special_tokens=False)
            ends = np.cumsum([len(s) for s, _ in segments])
            flags = np.array([f for _, f in segments] or [False], dtype=bool)
            starts = np.array([start for start, _ in enc.offsets], dtype=np.int64)
            which = np.minimum(np.searchsorted(ends, starts, side="right"), len(segments) - 1)
            return np.array(enc.ids, dtype=np.int32), flags[which]
        parts = [(np.array(self.base.encode(s), dtype=np.int32), f) for s, f in segments if s]
        if not parts:
            return np.zeros(0, np.int32), np.zeros(0, bool)
        ids = np.concatenate([p for p, _ in parts])
        return ids, np.concatenate([np.full(len(p), f, dtype=bool) for p, f in parts])


def load_text_tokenizer(spec: Any = None, *, eos_id: int | None = None, pad_id: int | None = None) -> TextTokenizer:
    """A `TextTokenizer` from a recipe value: None or "bytes", a checkpoint/tokenizer directory, or a tokenizer."""
    if isinstance(spec, TextTokenizer):
        return spec
    if spec is None or spec == "bytes":
        return TextTokenizer(None, eos_id=eos_id, pad_id=pad_id)
    if isinstance(spec, str):
        if not Path(spec).is_dir():
            raise DataError(f"tokenizer {spec!r} is not a directory; give a tokenizer/checkpoint directory or 'bytes'")
        base = load_tokenizer(spec)
        if isinstance(base, ByteTokenizer):
            raise DataError(f"tokenizer directory {spec!r} holds no tokenizer files; give another or 'bytes'")
        return TextTokenizer(base.tokenizer, eos_id=eos_id, pad_id=pad_id)
    return TextTokenizer(spec, eos_id=eos_id, pad_id=pad_id)


CHATML_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.content %}{{ m.content }}{% endif %}"
    "{%- if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>{{ c | tojson }}</tool_call>{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""A ChatML template with tool calls, given to tokenizers that `train_bpe` makes."""


def train_bpe(texts: Iterable[str], vocab_size: int = 4096, *, chat_template: str = CHATML_TEMPLATE) -> Any:
    """A small byte-level BPE `PreTrainedTokenizerFast` trained on `texts`: a real tokenizer without a download.

    It has `<s>`/`</s>`/`<pad>` and ChatML's `<|im_start|>`/`<|im_end|>` as special tokens, and a chat
    template, so benchmarks, tests and demos exercise the same code paths as a Hub tokenizer.
    """
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
    rust = RustTokenizer(models.BPE())
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    rust.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    rust.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=rust,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=specials[3:],
    )
    tokenizer.chat_template = chat_template
    return tokenizer


# ---- token documents ------------------------------------------------------------------------------


@dataclass
class TokenDoc:
    """A document (or a cut of one) as tokens: ids, an optional loss mask, and the domain it came from."""

    ids: np.ndarray
    mask: np.ndarray | None = None
    domain: int = 0

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class DocStats:
    """What one stream produced in this process (not resumable state): documents, tokens, their lengths.

    Lengths are whole documents' lengths in tokens (exact for token ids, estimated from the size in
    characters for text, so a document counts before it has been read to its end), in power-of-two
    buckets: bucket b holds lengths in [2**b, 2**(b+1)); counted per document and per token produced.
    """

    docs: int = 0
    tokens: int = 0
    length_docs: dict[int, int] = field(default_factory=dict)
    length_tokens: dict[int, int] = field(default_factory=dict)

    def add(self, doc_tokens: int, tokens: int, starts: bool) -> None:
        """`tokens` produced of a document of `doc_tokens`; `starts`: they are its beginning."""
        bucket = max(doc_tokens, 1).bit_length() - 1
        if starts:
            self.docs += 1
            self.length_docs[bucket] = self.length_docs.get(bucket, 0) + 1
        self.tokens += tokens
        self.length_tokens[bucket] = self.length_tokens.get(bucket, 0) + tokens


@dataclass
class _Item:
    """A tokenized piece of the current batch: its ids (with BOS/EOS where it starts/ends a text document),
    whether it starts/ends its document, and the document's (estimated) length in tokens."""

    ids: np.ndarray
    mask: np.ndarray | None
    first: bool
    last: bool
    doc_tokens: int


class TokenStream:
    """One domain's source as token documents of at most `max_doc_tokens`, resumable to the token.

    Length upsampling (Fu et al. 2024): with `long_share`, documents of at least `long_threshold` tokens
    are always kept and shorter ones kept with probability q, chosen so that the long documents' share
    of this source's tokens reaches `long_share` (q = f(1-t) / (t(1-f)) for a natural long share f,
    estimated as the stream goes, with a prior of one threshold of tokens on each side). The decision is
    made on a document's first piece from its size, so dropped documents are never tokenized: sizes in
    characters are turned into tokens with the stream's measured tokens-per-character ratio. It only
    ever raises the long share (a source already above the target is kept whole), and keeps at least
    `MIN_KEEP` of the short documents (a source with no long ones cannot reach any target).

    With a `cache` (`lcplug.data.cache`), text is tokenized only where the cache misses, which gives the
    same ids, so batches and states are the same with and without it; it is flushed at each epoch's end.
    """

    def __init__(
        self,
        source: Source,
        tokenizer: TextTokenizer,
        *,
        max_doc_tokens: int,
        long_share: float | None = None,
        long_threshold: int = 4096,
        repeat: bool = True,
        batch_chars: int = 1 << 18,
        batch_pieces: int = 512,
        cache: TokenCache | None = None,
    ):
        if max_doc_tokens < 1:
            raise DataError(f"data source {source.name!r}: max_doc_tokens={max_doc_tokens}; valid: an integer >= 1")
        if long_share is not None and not 0 < long_share < 1:
            raise DataError(f"data source {source.name!r}: long_share={long_share}; valid: a number in (0, 1)")
        self.source = source
        self.tokenizer = tokenizer
        self.max_doc_tokens = max_doc_tokens
        self.long_share = long_share
        self.long_threshold = long_threshold
        self.repeat = repeat
        self.batch_chars = batch_chars
        self.batch_pieces = batch_pieces
        self.cache = cache
        if cache is not None:
            source.facts = cache  # a file source then gives what the cache knows without reading it
        self.stats = DocStats()
        self._counters: dict[str, Any] = {
            "chars": 0,  # characters and tokens of text tokenized so far: the tokens-per-char ratio
            "tokens": 0,
            "long": 0,  # estimated tokens of long / short documents seen (kept or not)
            "short": 0,
            "docs": 0,  # documents started, over all epochs: the key of each keep decision
            "keep": True,  # whether the document in progress is kept
            "doc_tokens": 0,  # its estimated length
            "epoch_pieces": 0,  # pieces read in this epoch: none at its end means an empty source
            "exhausted": False,
        }
        self._start: dict[str, Any] = {"source": source.state_dict(), "counters": dict(self._counters)}
        self._batch: list[_Item] | None = None  # None: the batch at `_start` is not read yet
        self._index = 0
        self._offset = 0

    @property
    def name(self) -> str:
        return self.source.name

    # ---- reading and tokenizing a batch --------------------------------------------------------------
    def _tokens_per_char(self) -> float:
        c = self._counters
        prior_chars = 4096
        return (c["tokens"] + self.tokenizer.tokens_per_char_prior * prior_chars) / (c["chars"] + prior_chars)

    def _keep(self, piece: Piece) -> bool:
        """Start the document `piece` begins: estimate its length, and decide whether length upsampling keeps it."""
        c = self._counters
        c["docs"] += 1
        size = piece.doc_size()
        tokens = size if piece.ids is not None else round(size * self._tokens_per_char())
        c["doc_tokens"] = tokens
        if self.long_share is None:
            return True
        t, prior = self.long_share, self.long_threshold
        f = (c["long"] + prior) / (c["long"] + c["short"] + 2 * prior)
        if tokens >= self.long_threshold:
            c["long"] += tokens
            return True
        c["short"] += tokens
        q = 1.0 if f >= t else max(MIN_KEEP, f * (1 - t) / (t * (1 - f)))
        return uniform(self.source.seed, self.source.name, "keep", c["docs"]) < q

    def _fill(self) -> None:
        """Read the next batch of kept pieces from the source and tokenize its text in one call."""
        c = self._counters
        self._start = {"source": self.source.state_dict(), "counters": dict(c)}
        pieces: list[Piece] = []
        lengths: list[int] = []
        size = 0
        while not c["exhausted"] and size < self.batch_chars and len(pieces) < self.batch_pieces:
            piece = self.source.next()
            if piece is None:
                if c["epoch_pieces"] == 0:
                    raise self._empty()
                if self.cache is not None:
                    self.cache.flush()
                if not self.repeat:
                    c["exhausted"] = True
                    break
                self.source.new_epoch()
                c["epoch_pieces"] = 0
                continue
            c["epoch_pieces"] += 1
            if piece.first:
                c["keep"] = self._keep(piece)
            if c["keep"]:
                pieces.append(piece)
                lengths.append(c["doc_tokens"])
                size += piece.chars if piece.is_text else len(piece.ids)
        encoded = iter(self._encode([p for p in pieces if p.is_text]))
        items = []
        for piece, doc_tokens in zip(pieces, lengths):
            if piece.is_text:
                ids = next(encoded)
                c["chars"] += piece.chars
                c["tokens"] += len(ids)
                head = self.tokenizer.prefix if piece.first else []
                tail = self.tokenizer.eos if piece.last else []
                if head or tail:
                    ids = np.concatenate([np.array(head, np.int32), ids, np.array(tail, np.int32)])
                items.append(_Item(ids, None, piece.first, piece.last, doc_tokens))
            else:
                ids = np.asarray(piece.ids, dtype=np.int32)
                mask = None if piece.mask is None else np.asarray(piece.mask, dtype=bool)
                if mask is not None and mask.shape != ids.shape:
                    raise DataError(
                        f"data source {self.name!r}: a piece's mask has {len(mask)} entries for {len(ids)} ids"
                    )
                items.append(_Item(ids, mask, piece.first, piece.last, doc_tokens))
        self._batch, self._index, self._offset = items, 0, 0

    def _encode(self, pieces: list[Piece]) -> list[np.ndarray]:
        """The ids of text pieces: through the cache, or the tokenizer (pieces then always hold their text)."""
        if not pieces:
            return []
        if self.cache is not None:
            return self.cache.encode_pieces(pieces)
        return self.tokenizer.encode_batch([p.text for p in pieces])  # type: ignore[misc]

    def _empty(self) -> DataError:
        src = self.source
        skipped = ", ".join(f"{n} {why}" for why, n in sorted(src.skipped.items()))
        shard = f" for data-parallel rank {src.rank} of {src.world}" if src.world > 1 else ""
        return DataError(
            f"data source {src.name!r} is empty{shard}: a whole epoch gave no document"
            + (f" (skipped: {skipped})" if skipped else "")
        )

    # ---- token documents -------------------------------------------------------------------------------
    def next_doc(self) -> TokenDoc | None:
        """The next token document (at most `max_doc_tokens`), or None once a non-repeating source is done."""
        while True:
            ids: list[np.ndarray] = []
            masks: list[np.ndarray | None] = []
            n = 0
            ended = False
            while n < self.max_doc_tokens:
                if self._batch is None or self._index >= len(self._batch):
                    if self._batch is not None and self._counters["exhausted"]:
                        break
                    self._fill()
                    if not self._batch:
                        break
                    continue
                item = self._batch[self._index]
                take = min(len(item.ids) - self._offset, self.max_doc_tokens - n)
                self.stats.add(item.doc_tokens, take, item.first and self._offset == 0)
                ids.append(item.ids[self._offset : self._offset + take])
                masks.append(None if item.mask is None else item.mask[self._offset : self._offset + take])
                self._offset += take
                n += take
                if self._offset == len(item.ids):
                    self._index += 1
                    self._offset = 0
                    if item.last:
                        ended = True
                        break
            if n:
                return TokenDoc(np.concatenate(ids), _join_masks(ids, masks))
            if not ended:
                return None

    # ---- resume ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The source's state and counters at the start of the current batch, and the position inside it."""
        return {
            "start": {"source": self._start["source"], "counters": dict(self._start["counters"])},
            "read": self._batch is not None,
            "index": self._index,
            "offset": self._offset,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Re-read (and re-tokenize) the batch the state points into, then continue at its token."""
        self.source.load_state_dict(state["start"]["source"])
        self._counters = dict(state["start"]["counters"])
        self._batch = None
        self._index = self._offset = 0
        if state["read"]:
            self._fill()
            self._index, self._offset = int(state["index"]), int(state["offset"])
        else:
            self._start = {"source": self.source.state_dict(), "counters": dict(self._counters)}


def _join_masks(ids: list[np.ndarray], masks: list[np.ndarray | None]) -> np.ndarray | None:
    """One mask for concatenated parts; None when no part has one (everything is trained on)."""
    if all(m is None for m in masks):
        return None
    return np.concatenate([np.ones(len(i), bool) if m is None else m for i, m in zip(ids, masks)])
