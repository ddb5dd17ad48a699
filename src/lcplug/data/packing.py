"""Packing token documents into fixed-length rows with document boundaries, and batches of rows.

A row of length L holds documents back to back; one that does not fit continues at the start of the next
row (a new segment there: every row is a sample of its own). A batch is a dict of tensors:

- `input_ids` (B, L) and `labels` (B, L): -100 where the loss is masked (padding, non-assistant turns,
  prompts of synthetic tasks) and, with documents kept apart, on each segment's first token, so no
  token is predicted from another document's last one;
- `position_ids` (B, L): restarting at 0 for each segment (`lcplug.positions.packed_position_ids`),
  which is what keeps documents apart: with `attention_mask=None` and no KV cache, transformers' own
  mask functions detect packed sequences from these ids, and lcplug's attention patterns read the same
  ids (`model_inputs(batch)` gives exactly that call, `use_cache=False` included);
- `doc_ids` (B, L), `cu_seqlens` (the flash-attention varlen boundaries over the flattened batch) and
  `max_seqlen`: the boundaries as metadata for document masks and context parallelism.

With `cross_document=True` the position ids run 0..L-1 over the whole row and each row is one segment:
attention then crosses documents (the classic concatenate-and-chunk).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..positions import ShardLayout, packed_position_ids, shard_indices
from .mixture import Mixer
from .tokenize import TokenDoc

IGNORE_INDEX = -100
"""The label transformers' losses skip."""


PADDING = -1
"""The domain of a row's padding segment."""


@dataclass
class Row:
    """One packed row: ids, which tokens are trained on, and its segments' lengths and domains."""

    ids: np.ndarray
    mask: np.ndarray
    lengths: list[int]
    domains: list[int]


class Packer:
    """Fills rows of any length from the mixer; the part of a document that does not fit is carried over.

    Its state is the mixer's plus the carried-over tokens (at most one document cut, so bounded by the
    longest document a domain allows).
    """

    def __init__(self, mixer: Mixer, pad_id: int):
        self.mixer = mixer
        self.pad_id = pad_id
        self._carry: TokenDoc | None = None

    def next_row(self, length: int) -> Row | None:
        """A row of `length` tokens (the tail padded once every source is exhausted), or None when none is left."""
        ids = np.full(length, self.pad_id, dtype=np.int32)
        mask = np.zeros(length, dtype=bool)
        lengths: list[int] = []
        domains: list[int] = []
        n = 0
        while n < length:
            doc, self._carry = (self._carry, None) if self._carry is not None else (self.mixer.next_doc(), None)
            if doc is None:
                break
            take = min(len(doc), length - n)
            ids[n : n + take] = doc.ids[:take]
            mask[n : n + take] = True if doc.mask is None else doc.mask[:take]
            lengths.append(take)
            domains.append(doc.domain)
            n += take
            if take < len(doc):
                rest = None if doc.mask is None else doc.mask[take:]
                self._carry = TokenDoc(doc.ids[take:], rest, doc.domain)
        if n == 0:
            return None
        if n < length:
            lengths.append(length - n)
            domains.append(PADDING)
        return Row(ids, mask, lengths, domains)

    def state_dict(self) -> dict[str, Any]:
        carry = self._carry
        return {
            "mixer": self.mixer.state_dict(),
            "carry": None
            if carry is None
            else {
                "ids": carry.ids.tolist(),
                "mask": None if carry.mask is None else carry.mask.tolist(),
                "domain": carry.domain,
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.mixer.load_state_dict(state["mixer"])
        carry = state["carry"]
        self._carry = (
            None
            if carry is None
            else TokenDoc(
                np.asarray(carry["ids"], dtype=np.int32),
                None if carry["mask"] is None else np.asarray(carry["mask"], dtype=bool),
                int(carry["domain"]),
            )
        )


def collate(rows: Sequence[Row], *, cross_document: bool = False) -> dict[str, Any]:
    """A batch of rows of one length: model inputs plus boundary metadata (see the module docstring)."""
    length = len(rows[0].ids)
    ids = np.stack([r.ids for r in rows]).astype(np.int64)
    labels = np.where(np.stack([r.mask for r in rows]), ids, IGNORE_INDEX)
    seg_lengths = [[length] for _ in rows] if cross_document else [r.lengths for r in rows]
    flat_lengths = [n for lens in seg_lengths for n in lens]
    # every row's segments add up to `length`, so one call over the whole batch gives each row's positions
    position_ids = packed_position_ids(flat_lengths).view(len(rows), length)
    if not cross_document:
        labels[position_ids.numpy() == 0] = IGNORE_INDEX  # a segment's first token: no token of its document before it
    doc_ids = np.concatenate([np.repeat(np.arange(len(lens)), lens) for lens in seg_lengths]).reshape(len(rows), length)
    bounds = np.concatenate([[0], np.cumsum(flat_lengths)]).astype(np.int32)
    return {
        "input_ids": torch.from_numpy(ids),
        "labels": torch.from_numpy(labels),
        "position_ids": position_ids,
        "doc_ids": torch.from_numpy(doc_ids),
        "cu_seqlens": torch.from_numpy(bounds),
        "max_seqlen": max(flat_lengths),
    }


def model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """What to call a transformers causal LM with: ids, labels, position ids, and `use_cache=False`.

    Without `use_cache=False` a model builds a KV cache even in training, and transformers then skips
    its packed-sequence detection: documents would silently attend to each other.
    """
    return {
        "input_ids": batch["input_ids"],
        "labels": batch["labels"],
        "position_ids": batch["position_ids"],
        "use_cache": False,
    }


def context_parallel_slice(
    batch: Mapping[str, Any], rank: int, world: int, layout: ShardLayout = "contiguous"
) -> dict[str, Any]:
    """The part of a batch that context-parallel `rank` of `world` holds.

    Labels are shifted before slicing (`shift_labels`, what transformers' loss takes instead of `labels`),
    since a rank's last token is predicted from the next rank's first; ids, shifted labels, position ids
    and doc ids are sliced with `lcplug.positions.shard_indices`, so every rank keeps global positions and
    document ids, and `cu_seqlens`/`max_seqlen` still describe whole rows.
    """
    idx = shard_indices(batch["input_ids"].shape[-1], rank, world, layout)
    labels = batch["labels"]
    shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)
    out = {key: batch[key].index_select(-1, idx) for key in ("input_ids", "position_ids", "doc_ids")}
    out["shift_labels"] = shifted.index_select(-1, idx)
    out["cu_seqlens"] = batch["cu_seqlens"]
    out["max_seqlen"] = batch["max_seqlen"]
    return out
