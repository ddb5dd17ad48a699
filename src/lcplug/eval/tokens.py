"""One tokenizer interface for every probe: a Hugging Face tokenizer, or bytes when a model has none.

Probes build prompts at the token level (so a length is an exact token count) and decode answers, so
they need three things from a tokenizer: `encode` without special tokens, `decode`, and the `prefix` ids
that start every prompt (a BOS token where the tokenizer adds one). `ByteTokenizer` serves models
trained on raw bytes (vocabulary >= 256, token id = byte value), such as lcplug's demo models;
`HFTokenizer` wraps any `transformers` tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..errors import LcplugError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
"""A checkpoint directory holding any of these ships its own tokenizer."""


class TokenizerError(LcplugError, ValueError):
    """A model cannot be evaluated with the tokenizer at hand (e.g. bytes for a vocabulary below 256)."""


@runtime_checkable
class Tokenizer(Protocol):
    """What probes need: exact token ids of a text, text of ids, and the ids every prompt starts with."""

    prefix: list[int]

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as token ids (0..255), for byte-level models that ship no tokenizer."""

    def __init__(self) -> None:
        self.prefix: list[int] = []

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """Bytes back to text; ids outside 0..255 (a model's special tokens) are dropped, bad UTF-8 replaced."""
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class HFTokenizer:
    """A `transformers` tokenizer behind the probe interface.

    Pieces of a prompt are encoded without special tokens so they can be concatenated exactly; the BOS
    the tokenizer would add to a whole text (if any) becomes `prefix`, so prompts start like real inputs.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.prefix = list(tokenizer("", add_special_tokens=True)["input_ids"])

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({type(self.tokenizer).__name__})"


def as_tokenizer(tokenizer: Any = None) -> Tokenizer:
    """`tokenizer` behind the probe interface: None means bytes; a `transformers` tokenizer is wrapped."""
    if tokenizer is None:
        return ByteTokenizer()
    if isinstance(tokenizer, (ByteTokenizer, HFTokenizer)):
        return tokenizer
    if callable(tokenizer) and hasattr(tokenizer, "decode") and hasattr(tokenizer, "convert_ids_to_tokens"):
        return HFTokenizer(tokenizer)
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    raise TokenizerError(
        f"cannot use {type(tokenizer).__name__} as a tokenizer; give a transformers tokenizer, None (bytes), "
        "or an object with encode, decode and prefix"
    )


def load_tokenizer(model_dir: str | Path, vocab_size: int | None = None) -> Tokenizer:
    """The checkpoint's own tokenizer if it ships one, else bytes (which needs a vocabulary of at least 256)."""
    if any((Path(model_dir) / name).is_file() for name in TOKENIZER_FILES):
        from transformers import AutoTokenizer

        return HFTokenizer(AutoTokenizer.from_pretrained(model_dir))
    check_byte_vocab(vocab_size, str(model_dir))
    return ByteTokenizer()


def check_byte_vocab(vocab_size: int | None, owner: str) -> None:
    """Bytes are token ids only for a vocabulary of at least 256; say so instead of indexing out of range."""
    if vocab_size is not None and vocab_size < 256:
        raise TokenizerError(
            f"{owner} has no tokenizer and a vocabulary of {vocab_size} < 256, so bytes cannot be its tokens; "
            "give a tokenizer"
        )
